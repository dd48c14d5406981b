//! AVX2 tile decoder: the 32 lanes of a tile as four vectors of eight `u32` states.
//!
//! READ ME FIRST
//! - This computes exactly what the scalar reference `decode_tile` computes, step by step; only the order of
//!   independent operations differs. Lanes still take their words in ascending lane order: vector 0 (lanes
//!   0..8) first, then vector 1, ..., and inside a vector in ascending lane order.
//! - Renormalization is ryg_rans's SIMD technique: compare, `movemask` (one bit per lane that needs a word),
//!   `popcount` (how many words the vector takes), and a permutation table that moves the next consecutive
//!   words of the stream into the lanes that need them.
//! - Every step reads 8 words per vector from `words[pos..pos + 8]` whatever the mask says, so the caller
//!   guarantees `pos + 32 <= words.len()` at the start of a step (checked here: the kernel stops early
//!   otherwise and the caller finishes the tile from a zero-padded copy of the last words).
//! - Table lookups are gathers of `dtable[x & (2^P - 1)]`: always in bounds, since the table has `2^P` entries.

use std::arch::x86_64::*;

use super::fast::BLOCK;
use super::tile::{LANES, STATE_LOWER};

/// `PERMUTE[m]`: for an 8-lane mask `m` of lanes that need a word, lane `i` (if its bit is set) takes word
/// `popcount(m & ((1 << i) - 1))` of the next eight, i.e. the words go to the needing lanes in ascending order.
/// Lanes whose bit is clear get index 0; their value is discarded by the blend.
static PERMUTE: [[u32; 8]; 256] = permute_table();

const fn permute_table() -> [[u32; 8]; 256] {
    let mut table = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut rank = 0;
        let mut lane = 0;
        while lane < 8 {
            if m & (1 << lane) != 0 {
                table[m][lane] = rank;
                rank += 1;
            }
            lane += 1;
        }
        m += 1;
    }
    table
}

/// Whether this CPU can run [`decode_steps`].
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("popcnt")
}

/// Decodes up to `block.len()` steps of one tile.
///
/// - `states`: the 32 lane states, updated in place (inactive lanes' values are meaningless but harmless).
/// - `active`: number of active lanes; lanes `>= active` take no words.
/// - `words`, `pos`: the word stream and the read position, advanced by the words consumed.
/// - `block[i][lane]`: the joint symbol that lane decoded at step `i` (also written for inactive lanes).
///
/// Returns the number of steps decoded: `block.len()`, or fewer if a step could not start with
/// `pos + 32 <= words.len()`.
///
/// # Safety
/// The CPU must support AVX2 and POPCNT ([`available`]), and `dtable.len() == 1 << precision` with
/// `1 <= precision <= 12`.
#[target_feature(enable = "avx2,popcnt")]
pub(crate) unsafe fn decode_steps(
    states: &mut [u32; LANES],
    active: usize,
    words: &[u16],
    pos: &mut usize,
    dtable: &[u32],
    precision: u32,
    block: &mut [[u8; LANES]],
) -> usize {
    debug_assert_eq!(dtable.len(), 1 << precision);
    let zero = _mm256_setzero_si256();
    let slot_mask = _mm256_set1_epi32(((1u32 << precision) - 1) as i32);
    let freq_mask = _mm256_set1_epi32(0xfff);
    let one = _mm256_set1_epi32(1);
    let byte_mask = _mm256_set1_epi32(0xff);
    let shift_p = _mm_cvtsi32_si128(precision as i32);
    // After the two packs below the 32 bytes sit in the order of 32-bit groups [0, 2, 4, 6, 1, 3, 5, 7]
    // (packs work within 128-bit halves); this permutation restores lane order.
    let unpack_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // active_v[v] lane i: all ones if lane 8v + i is active.
    let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut active_v = [zero; 4];
    for (v, a) in active_v.iter_mut().enumerate() {
        let limit = _mm256_set1_epi32(active as i32 - 8 * v as i32);
        // lane i active <=> i < active - 8v (signed compare: both sides are small)
        *a = _mm256_cmpgt_epi32(limit, lane_index);
    }
    let sp = states.as_mut_ptr() as *mut __m256i;
    let mut x = [
        _mm256_loadu_si256(sp),
        _mm256_loadu_si256(sp.add(1)),
        _mm256_loadu_si256(sp.add(2)),
        _mm256_loadu_si256(sp.add(3)),
    ];
    let table = dtable.as_ptr() as *const i32;
    let mut p = *pos;
    let mut done = 0;
    for out in block.iter_mut() {
        if p + LANES > words.len() {
            break;
        }
        let mut sym = [zero; 4];
        for v in 0..4 {
            // Decode: e = dtable[x & (2^P - 1)] = symbol | (freq - 1) << 8 | (slot - cum) << 20,
            // then x = freq * (x >> P) + (slot - cum).
            let slot = _mm256_and_si256(x[v], slot_mask);
            let e = _mm256_i32gather_epi32::<4>(table, slot);
            let freq = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32::<8>(e), freq_mask), one);
            let bias = _mm256_srli_epi32::<20>(e);
            x[v] = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srl_epi32(x[v], shift_p)), bias);
            sym[v] = _mm256_and_si256(e, byte_mask);

            // Renormalize: lanes with x < 2^16 (i.e. x >> 16 == 0; an unsigned test, states reach 2^32 - 1)
            // take the next words in ascending lane order: x = x << 16 | word.
            let need = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(x[v]), zero), active_v[v]);
            let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as u32;
            // Eight words from p (p + 32 <= words.len() was checked for the whole step), widened to u32.
            let next = _mm256_cvtepu16_epi32(_mm_loadu_si128(words.as_ptr().add(p) as *const __m128i));
            let perm = _mm256_loadu_si256(PERMUTE.get_unchecked(m as usize).as_ptr() as *const __m256i);
            let fed = _mm256_or_si256(_mm256_slli_epi32::<16>(x[v]), _mm256_permutevar8x32_epi32(next, perm));
            x[v] = _mm256_blendv_epi8(x[v], fed, need);
            p += m.count_ones() as usize;
        }
        // Symbols are < 256: two saturating packs turn 4 x 8 u32 into 32 bytes, then restore lane order.
        let packed = _mm256_packus_epi16(_mm256_packus_epi32(sym[0], sym[1]), _mm256_packus_epi32(sym[2], sym[3]));
        let ordered = _mm256_permutevar8x32_epi32(packed, unpack_order);
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, ordered);
        done += 1;
    }
    for (v, xv) in x.iter().enumerate() {
        _mm256_storeu_si256(sp.add(v), *xv);
    }
    *pos = p;
    done
}

// The kernel relies on the state interval of the format: a word enters when x < 2^16.
const _: () = assert!(STATE_LOWER == 1 << 16);

/// Writes one full block of [`BLOCK`] = 32 decoded steps into the row tile output, for joint symbols of one, two
/// or four weights (`bits >= 2`); returns `false` (writing nothing) for 1-bit weights, which the caller handles.
///
/// `block[step][lane]` is transposed to `[lane][step]` with the perfect-shuffle transpose (four rounds of byte
/// interleaves pairing register `i` with `i + 8`, inside each 128-bit half), then each lane's 32 joint symbols are
/// split into `k` weights and stored at `rows_out[lane * cols + first_col ..]`.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn write_block(
    block: &[[u8; LANES]; BLOCK],
    active: usize,
    bits: u32,
    cols: usize,
    first_col: usize,
    rows_out: &mut [u8],
) -> bool {
    let k = (8 / bits) as usize;
    if k > 4 {
        return false;
    }
    // Two 16-step halves; in each, register i ends as: low half = lane i, high half = lane 16 + i.
    let mut halves = [[_mm256_setzero_si256(); 16]; 2];
    for (h, regs) in halves.iter_mut().enumerate() {
        for (i, r) in regs.iter_mut().enumerate() {
            *r = _mm256_loadu_si256(block[16 * h + i].as_ptr() as *const __m256i);
        }
        for _ in 0..4 {
            let prev = *regs;
            for i in 0..8 {
                regs[2 * i] = _mm256_unpacklo_epi8(prev[i], prev[i + 8]);
                regs[2 * i + 1] = _mm256_unpackhi_epi8(prev[i], prev[i + 8]);
            }
        }
    }
    let mask = _mm_set1_epi8(((1u32 << bits) - 1) as i8);
    let shift = _mm_cvtsi32_si128(bits as i32);
    for lane in 0..active {
        let (i, upper) = (lane % 16, lane >= 16);
        // Steps 0..16 from the first half, 16..32 from the second, of this lane's 128-bit half.
        let row = if upper {
            _mm256_permute2x128_si256::<0x31>(halves[0][i], halves[1][i])
        } else {
            _mm256_permute2x128_si256::<0x20>(halves[0][i], halves[1][i])
        };
        let start = lane * cols + first_col;
        let dst = &mut rows_out[start..start + BLOCK * k];
        let p = dst.as_mut_ptr() as *mut __m128i;
        if k == 1 {
            _mm256_storeu_si256(p as *mut __m256i, row);
        } else if k == 4 {
            // Joint symbol j = w0 | w1 << 2 | w2 << 4 | w3 << 6: w_t = (j >> 2 t) & 3 (as for two weights, the
            // 16-bit shift's bits from the neighbouring byte land at bit 8 - 2 t or above, which the mask clears);
            // the pairs (w0, w1) and (w2, w3) interleaved by bytes, then the two by 16-bit halves.
            for (h, v) in [_mm256_castsi256_si128(row), _mm256_extracti128_si256::<1>(row)].into_iter().enumerate() {
                let w0 = _mm_and_si128(v, mask);
                let w1 = _mm_and_si128(_mm_srli_epi16::<2>(v), mask);
                let w2 = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
                let w3 = _mm_and_si128(_mm_srli_epi16::<6>(v), mask);
                let (lo01, hi01) = (_mm_unpacklo_epi8(w0, w1), _mm_unpackhi_epi8(w0, w1));
                let (lo23, hi23) = (_mm_unpacklo_epi8(w2, w3), _mm_unpackhi_epi8(w2, w3));
                _mm_storeu_si128(p.add(4 * h), _mm_unpacklo_epi16(lo01, lo23));
                _mm_storeu_si128(p.add(4 * h + 1), _mm_unpackhi_epi16(lo01, lo23));
                _mm_storeu_si128(p.add(4 * h + 2), _mm_unpacklo_epi16(hi01, hi23));
                _mm_storeu_si128(p.add(4 * h + 3), _mm_unpackhi_epi16(hi01, hi23));
            }
        } else {
            // Joint symbol j = w0 | w1 << bits: w0 = j & mask, w1 = (j >> bits) & mask (the 16-bit shift pulls
            // the neighbouring byte's low bits into bits >= 8 - bits >= bits, which the mask clears).
            for (h, v) in [_mm256_castsi256_si128(row), _mm256_extracti128_si256::<1>(row)].into_iter().enumerate() {
                let w0 = _mm_and_si128(v, mask);
                let w1 = _mm_and_si128(_mm_srl_epi16(v, shift), mask);
                _mm_storeu_si128(p.add(2 * h), _mm_unpacklo_epi8(w0, w1));
                _mm_storeu_si128(p.add(2 * h + 1), _mm_unpackhi_epi8(w0, w1));
            }
        }
    }
    true
}

/// Merges the split blocks of one row with their low words in place (what `split::merge_symbols` does a block at a
/// time): block `b` of `row` (16 high parts in interleaved order) with `low[first + b * LANES]`.
///
/// The even positions' bytes are gathered into the first eight columns and the odd into the last eight with one
/// byte shuffle; the low word's bytes are spread two to a byte by another, and each byte's 2-bit field is shifted
/// down and masked (16-bit shifts: the bits they pull in from the neighbouring byte land above bit 1, which the
/// mask clears).
///
/// # Safety
/// The CPU must support AVX2 ([`available`]) and `row.len()` must be a multiple of 16. (An index past `low` panics:
/// it needs more than `first + (row.len() / 16 - 1) * LANES` entries.)
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn merge_row(row: &mut [u8], low: &[u32], first: usize) {
    let gather = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    let spread = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3);
    // Which shift each byte of the spread low word takes: columns 0..8 the fields at bits 4c (0 or 4 within its
    // byte), columns 8..16 those at 4c + 2 (2 or 6).
    let at0 = _mm_setr_epi8(-1, 0, -1, 0, -1, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    let at4 = _mm_setr_epi8(0, -1, 0, -1, 0, -1, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0);
    let at2 = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, -1, 0, -1, 0, -1, 0, -1, 0);
    let at6 = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, -1, 0, -1, 0, -1);
    let three = _mm_set1_epi8(3);
    for (b, block) in row.chunks_exact_mut(16).enumerate() {
        let lo = low[first + b * LANES];
        let p = block.as_mut_ptr() as *mut __m128i;
        let high = _mm_and_si128(_mm_shuffle_epi8(_mm_loadu_si128(p), gather), three);
        let t = _mm_shuffle_epi8(_mm_cvtsi32_si128(lo as i32), spread);
        let fields = _mm_or_si128(
            _mm_or_si128(_mm_and_si128(t, at0), _mm_and_si128(_mm_srli_epi16::<4>(t), at4)),
            _mm_or_si128(_mm_and_si128(_mm_srli_epi16::<2>(t), at2), _mm_and_si128(_mm_srli_epi16::<6>(t), at6)),
        );
        _mm_storeu_si128(p, _mm_or_si128(_mm_slli_epi16::<2>(high), _mm_and_si128(fields, three)));
    }
}
