//! AVX-512 tile decoder: the 32 lanes of a tile as two vectors of sixteen `u32` states.
//!
//! Chosen only by `Kernel::Avx512`: on the AMD EPYC of BENCHMARKS.md it is about 20% slower than the AVX2
//! kernel (16-wide gathers and `vpexpandd` cost more there than twice the 8-wide work).
//!
//! READ ME FIRST
//! - The same computation as the AVX2 kernel (src/rans/avx2.rs) and the scalar reference; only the
//!   renormalization is simpler: `vpexpandd` places the next consecutive words into exactly the lanes whose mask
//!   bit is set, in ascending lane order, so no permutation table is needed.
//! - Words: each vector reads 16 words from `words[pos..pos + 16]`; the caller's bound `pos + 32 <= len` at the
//!   start of a step covers both vectors (the first takes at most 16, so the second reads below `pos + 32`).

use std::arch::x86_64::*;

use super::tile::{LANES, STATE_LOWER};

/// Whether this CPU can run [`decode_steps`] (and the AVX2 block writer used with it).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && super::avx2::available()
}

/// Decodes up to `block.len()` steps of one tile; same contract as `avx2::decode_steps`.
///
/// # Safety
/// The CPU must support AVX-512F and POPCNT ([`available`]), and `dtable.len() == 1 << precision` with
/// `1 <= precision <= 12`.
#[target_feature(enable = "avx512f,popcnt")]
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
    let slot_mask = _mm512_set1_epi32(((1u32 << precision) - 1) as i32);
    let freq_mask = _mm512_set1_epi32(0xfff);
    let one = _mm512_set1_epi32(1);
    let byte_mask = _mm512_set1_epi32(0xff);
    let lower = _mm512_set1_epi32(STATE_LOWER as i32);
    let shift_p = _mm_cvtsi32_si128(precision as i32);
    // Lanes 16v + i with 16v + i < active.
    let active_bits = if active >= LANES { u32::MAX } else { (1u32 << active) - 1 };
    let active_m: [__mmask16; 2] = [active_bits as __mmask16, (active_bits >> 16) as __mmask16];
    let sp = states.as_mut_ptr() as *const __m512i;
    let mut x = [_mm512_loadu_si512(sp), _mm512_loadu_si512(sp.add(1))];
    let table = dtable.as_ptr() as *const i32;
    let mut p = *pos;
    let mut done = 0;
    for out in block.iter_mut() {
        if p + LANES > words.len() {
            break;
        }
        for v in 0..2 {
            // e = dtable[x & (2^P - 1)]; x = freq * (x >> P) + (slot - cum)
            let slot = _mm512_and_si512(x[v], slot_mask);
            let e = _mm512_i32gather_epi32::<4>(slot, table);
            let freq = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32::<8>(e), freq_mask), one);
            let bias = _mm512_srli_epi32::<20>(e);
            x[v] = _mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srl_epi32(x[v], shift_p)), bias);
            // The 16 joint symbols of this vector as bytes, in lane order.
            let sym = _mm512_cvtepi32_epi8(_mm512_and_si512(e, byte_mask));
            _mm_storeu_si128(out.as_mut_ptr().add(16 * v) as *mut __m128i, sym);

            // Renormalize: active lanes with x < 2^16 take the next words in ascending lane order.
            let need = _mm512_cmplt_epu32_mask(x[v], lower) & active_m[v];
            let next = _mm512_cvtepu16_epi32(_mm256_loadu_si256(words.as_ptr().add(p) as *const __m256i));
            let fed = _mm512_maskz_expand_epi32(need, next);
            x[v] = _mm512_mask_or_epi32(x[v], need, _mm512_slli_epi32::<16>(x[v]), fed);
            p += need.count_ones() as usize;
        }
        done += 1;
    }
    let sp = states.as_mut_ptr() as *mut __m512i;
    _mm512_storeu_si512(sp, x[0]);
    _mm512_storeu_si512(sp.add(1), x[1]);
    *pos = p;
    done
}
