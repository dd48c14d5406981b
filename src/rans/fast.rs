//! The fast tile loops: a division-free encoder and the block-wise driver of the SIMD decoder.
//!
//! READ ME FIRST
//! - Both produce exactly what the scalar reference loops in `tile.rs` produce: the same words, states and
//!   symbols, and a `CorruptStream` error for the same tile wherever the reference finds a fault (the reason
//!   text may differ); tests/rans_roundtrip.rs and tests/rans_corrupt.rs compare them.
//! - Encoder: `x / f` is replaced by a multiply with a precomputed 64-bit reciprocal (ryg_rans's
//!   `RansEncSymbol`, widened so that it stays exact for the full 32-bit state). Words are written back to
//!   front into a buffer sized for the worst case (one word per lane per step), so no reversal is needed.
//! - Decoder: SIMD kernels decode blocks of up to [`BLOCK`] steps into a small `[step][lane]` buffer of joint
//!   symbols, which is then transposed and split into weights row by row. Near the end of a tile the kernel
//!   needs 32 readable words past the read position, so the last words are copied into a zero-padded buffer.

use super::table::FreqTable;
use super::tile::{EncodedTile, Tile, TileLayout, LANES, STATE_LOWER};
use crate::error::{Error, Result};

/// One symbol's encoder constants (ryg_rans `RansEncSymbol`).
///
/// Encoding `x -> C(s, x) = (x / f) * 2^P + x % f + c` is computed as `x + bias + q * cmpl_freq` with
/// `q = floor(x / f)`: since `x % f = x - q * f`, `x + c + q * (2^P - f) = q * 2^P + x % f + c`.
/// `q` comes from `q = (x * rcp) >> 64` with `rcp = ceil(2^64 / f)`. Proof that this is exact for every
/// `x < 2^32` and `f <= 2^12`: write `rcp * f = 2^64 + e` with `0 <= e < f`, and `x = q f + r`, `0 <= r < f`.
/// Then `x * rcp / 2^64 = q + (r + x e / 2^64) / f`, and `x e < 2^32 * 2^12 < 2^64`, so the fraction is
/// `< (r + 1) / f <= 1`: the floor is `q`. For `f = 1`, `rcp = 2^64 - 1` gives `q = x - 1` (`x >= 1`), which
/// the bias absorbs: `bias = c + 2^P - 1`, and `x + c + 2^P - 1 + (x - 1)(2^P - 1) = x 2^P + c`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EncSymbol {
    /// Reciprocal of the frequency (see above).
    rcp: u64,
    /// Largest state that can be encoded without emitting a word first: `f * 2^(32 - P) - 1`.
    x_max: u32,
    /// `c`, or `c + 2^P - 1` when `f = 1`.
    bias: u32,
    /// `2^P - f`; equal to `2^P` exactly for an absent symbol (`f = 0`), which flags it.
    cmpl_freq: u32,
}

/// The encoder constants of every joint symbol of `table`.
pub(crate) fn encoder_symbols(table: &FreqTable) -> Vec<EncSymbol> {
    let p = table.precision();
    table
        .freqs()
        .iter()
        .zip(table.cum())
        .map(|(&f, &c)| match f {
            // Absent symbol: harmless constants, flagged by cmpl_freq == 2^P.
            0 => EncSymbol { rcp: 0, x_max: u32::MAX, bias: 0, cmpl_freq: 1 << p },
            1 => EncSymbol {
                rcp: u64::MAX,
                x_max: (1u32 << (32 - p)) - 1,
                bias: c + (1 << p) - 1,
                cmpl_freq: (1 << p) - 1,
            },
            _ => EncSymbol {
                rcp: ((1u128 << 64).div_ceil(f as u128)) as u64,
                // f * 2^(32-P) is 2^32 when f = 2^P (a one-symbol table): the state then never overflows.
                x_max: (((f as u64) << (32 - p)) - 1) as u32,
                bias: c,
                cmpl_freq: (1 << p) - f,
            },
        })
        .collect()
}

/// Joint symbols of one tile, row by row: `out[lane * steps + t]` for step `t` of active lane `lane`.
fn gather_joint(symbols: &[u8], layout: &TileLayout, tile: Tile, out: &mut [u8]) {
    let (bits, k, cols) = (layout.bits(), layout.weights_per_symbol(), layout.cols());
    let steps = tile.cols / k;
    for (lane, dst) in out.chunks_exact_mut(steps).enumerate().take(tile.rows) {
        let start = (tile.row0 + lane) * cols + tile.col0;
        let row = &symbols[start..start + tile.cols];
        match k {
            1 => dst.copy_from_slice(row),
            2 => {
                for (d, pair) in dst.iter_mut().zip(row.chunks_exact(2)) {
                    *d = pair[0] | pair[1] << bits;
                }
            }
            _ => {
                for (d, group) in dst.iter_mut().zip(row.chunks_exact(k)) {
                    let mut j = 0u8;
                    for (i, &q) in group.iter().enumerate() {
                        j |= q << (i as u32 * bits);
                    }
                    *d = j;
                }
            }
        }
    }
}

/// Encodes one tile with the reciprocal encoder; identical output to the reference `encode_tile`.
pub(crate) fn encode_tile(
    symbols: &[u8],
    layout: &TileLayout,
    enc: &[EncSymbol],
    precision: u32,
    tile: Tile,
) -> Result<EncodedTile> {
    let steps = tile.cols / layout.weights_per_symbol();
    let mut joint = vec![0u8; steps * tile.rows];
    gather_joint(symbols, layout, tile, &mut joint);
    // At most one word per active lane per step; written from the end, so words[start..] is in decode order.
    // Slot 0 is spare: every step writes its candidate word to words[start - 1] unconditionally and only moves
    // `start` when the word is really emitted, which keeps the data-dependent branch out of the loop.
    let mut words = vec![0u16; steps * tile.rows + 1];
    let mut start = words.len();
    let mut states = [STATE_LOWER; LANES];
    let mut absent = 0u32;
    for t in (0..steps).rev() {
        for lane in (0..tile.rows).rev() {
            let e = &enc[joint[lane * steps + t] as usize];
            absent |= e.cmpl_freq;
            let x = states[lane];
            // Renormalize: x must be <= x_max = f * 2^(32-P) - 1 or C(s, x) would not fit in 32 bits.
            let emit = x > e.x_max;
            words[start - 1] = x as u16;
            start -= emit as usize;
            let x = if emit { x >> 16 } else { x };
            // x = C(s, x) = x + bias + floor(x / f) * (2^P - f); see EncSymbol.
            let q = ((x as u128 * e.rcp as u128) >> 64) as u32;
            states[lane] = x.wrapping_add(e.bias).wrapping_add(q.wrapping_mul(e.cmpl_freq));
        }
    }
    if absent >> precision != 0 {
        // Rare error path: find the symbol for the message.
        let s = joint.iter().find(|&&s| enc[s as usize].cmpl_freq >> precision != 0).copied().unwrap_or(0);
        return Err(Error::param("table", format!("joint symbol {s} occurs but has frequency 0")));
    }
    Ok(EncodedTile { words, start, states })
}

#[cfg(target_arch = "x86_64")]
/// Steps per SIMD decode block: the `[step][lane]` buffer of one block is 1 KiB.
pub(crate) const BLOCK: usize = 32;

#[cfg(target_arch = "x86_64")]
/// `expand[j]`: the `k` weights of joint symbol `j` as little-endian bytes (weight `i` in bits `i*bits..`).
pub(crate) fn expand_table(bits: u32) -> [u64; 256] {
    let k = 8 / bits;
    let mask = (1u64 << bits) - 1;
    let mut t = [0u64; 256];
    for (j, e) in t.iter_mut().enumerate() {
        for i in 0..k {
            *e |= ((j as u64 >> (i * bits)) & mask) << (8 * i);
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
/// Writes a decoded block (`block[i][lane]`, steps `t0..t0 + block.len()`) into the row tile output.
fn scatter_block(
    block: &[[u8; LANES]],
    layout: &TileLayout,
    tile: Tile,
    t0: usize,
    expand: &[u64; 256],
    rows_out: &mut [u8],
) {
    let (k, cols) = (layout.weights_per_symbol(), layout.cols());
    let n = block.len();
    let mut row = [0u8; BLOCK * 8 + 8];
    for lane in 0..tile.rows {
        let start = lane * cols + tile.col0 + t0 * k;
        let dst = &mut rows_out[start..start + n * k];
        if k == 1 {
            for (d, b) in dst.iter_mut().zip(block) {
                *d = b[lane];
            }
        } else {
            // Each joint symbol writes 8 bytes of which the first k count; the next write covers the rest.
            for (i, b) in block.iter().enumerate() {
                row[i * k..i * k + 8].copy_from_slice(&expand[b[lane] as usize].to_le_bytes());
            }
            dst.copy_from_slice(&row[..n * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// A kernel that decodes up to `block.len()` steps while `pos + 32 <= words.len()` (see `avx2::decode_steps`).
pub(crate) type StepKernel =
    unsafe fn(&mut [u32; LANES], usize, &[u16], &mut usize, &[u32], u32, &mut [[u8; LANES]]) -> usize;

#[cfg(target_arch = "x86_64")]
/// A writer of one full block into the row tile output (see `avx2::write_block`); `false` if it does not handle
/// this bit width, and then [`scatter_block`] does.
pub(crate) type BlockWriter = unsafe fn(&[[u8; LANES]; BLOCK], usize, u32, usize, usize, &mut [u8]) -> bool;

#[cfg(target_arch = "x86_64")]
/// SIMD routines for [`decode_tile`].
#[derive(Clone, Copy)]
pub(crate) struct SimdDecoder {
    /// Decodes steps.
    pub(crate) steps: StepKernel,
    /// Writes full blocks.
    pub(crate) write: BlockWriter,
}

#[cfg(target_arch = "x86_64")]
/// Decodes one tile with a SIMD step kernel. Same results and the same checks as the reference decoder.
///
/// # Safety
/// `simd`'s routines must be callable on this CPU, and `dtable.len() == 1 << precision`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn decode_tile(
    simd: SimdDecoder,
    states_in: &[u32],
    words: &[u16],
    layout: &TileLayout,
    tile: Tile,
    index: usize,
    dtable: &[u32],
    precision: u32,
    expand: &[u64; 256],
    rows_out: &mut [u8],
) -> Result<()> {
    let steps = tile.cols / layout.weights_per_symbol();
    let mut states = [0u32; LANES];
    states.copy_from_slice(states_in);
    let mut block = [[0u8; LANES]; BLOCK];
    // The last words of the tile, zero-padded so the kernel may read 32 words past any position <= 32.
    let mut tail = [0u16; 2 * LANES];
    let mut tail_start: Option<usize> = None;
    let (mut cur, mut pos) = (words, 0usize);
    let mut t = 0;
    let out_of_words = |t: usize| Error::CorruptStream { tile: index, reason: format!("ran out of words at step {t}") };
    while t < steps {
        let n = (steps - t).min(BLOCK);
        let done = (simd.steps)(&mut states, tile.rows, cur, &mut pos, dtable, precision, &mut block[..n]);
        let first_col = tile.col0 + t * layout.weights_per_symbol();
        if done < BLOCK || !(simd.write)(&block, tile.rows, layout.bits(), layout.cols(), first_col, rows_out) {
            scatter_block(&block[..done], layout, tile, t, expand, rows_out);
        }
        t += done;
        if done < n {
            if tail_start.is_some() {
                // Over 32 words past the padded copy: the stream has fewer words than the states ask for.
                return Err(out_of_words(t));
            }
            let rest = &words[pos..];
            tail[..rest.len()].copy_from_slice(rest);
            tail_start = Some(pos);
            cur = &tail;
            pos = 0;
        }
    }
    let used = match tail_start {
        Some(s) => {
            if pos > words.len() - s {
                return Err(out_of_words(steps));
            }
            s + pos
        }
        None => pos,
    };
    if used != words.len() {
        return Err(Error::CorruptStream {
            tile: index,
            reason: format!("{} of {} words unused", words.len() - used, words.len()),
        });
    }
    if let Some(lane) = states[..tile.rows].iter().position(|&x| x != STATE_LOWER) {
        return Err(Error::CorruptStream {
            tile: index,
            reason: format!("lane {lane} ends at {}, expected 2^16", states[lane]),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x + bias + floor(x / f) * cmpl_freq` equals `C(s, x) = (x / f) * 2^P + x % f + c` for every precision,
    /// every frequency, and states across the whole range the encoder feeds it: from the smallest state left
    /// after emitting a word, `(x_max + 1) >> 16`, up to `x_max`, both ends included.
    #[test]
    fn reciprocal_encode_is_exact() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for p in 1..=MAX_P {
            for f in 1..=(1u32 << p) {
                let c = (1u32 << p) - f;
                let mut freqs = vec![f];
                if c > 0 {
                    freqs.insert(0, c);
                }
                let table = FreqTable::from_freqs(freqs, p).unwrap();
                let s = table.alphabet() - 1;
                let e = encoder_symbols(&table)[s];
                let x_max = ((f as u64) << (32 - p)) - 1;
                assert_eq!(e.x_max as u64, x_max.min(u32::MAX as u64));
                let lo = (x_max + 1) >> 16;
                let mut xs = vec![1u64.max(lo), lo + 1, STATE_LOWER as u64, x_max, x_max - 1];
                for _ in 0..48 {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    xs.push(lo + (seed >> 20) % (x_max - lo + 1));
                }
                for x in xs.into_iter().filter(|&x| x >= 1 && x <= x_max) {
                    let x = x as u32;
                    let want = (x / f) as u64 * (1 << p) + (x % f) as u64 + table.cum()[s] as u64;
                    let q = ((x as u128 * e.rcp as u128) >> 64) as u32;
                    let got = x.wrapping_add(e.bias).wrapping_add(q.wrapping_mul(e.cmpl_freq));
                    assert_eq!(got as u64, want, "P {p} f {f} x {x}");
                }
            }
        }
    }

    const MAX_P: u32 = super::super::table::MAX_PRECISION;

    #[cfg(target_arch = "x86_64")]
    /// `expand_table` splits a joint symbol into its weights, low weight first.
    #[test]
    fn expand_splits_joint_symbols() {
        assert_eq!(expand_table(4)[0x3a], 0x03_0a);
        assert_eq!(expand_table(2)[0b11_10_01_00], 0x03_02_01_00);
        assert_eq!(expand_table(3)[0b101_011], 0x05_03);
        assert_eq!(expand_table(8)[0xfe], 0xfe);
    }
}
