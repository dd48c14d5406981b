//! Split 4-bit symbols (docs/FORMAT.md, section 2.1): the high 2 bits of each weight are rANS-coded as a 2-bit
//! stream (four weights a step), the low 2 bits are stored as they are.
//!
//! Within each block of [`SPLIT_BLOCK`] columns the weights are taken in interleaved order: position `2i` is
//! column `i`, position `2i + 1` is column `8 + i`. The coded matrix holds the high parts in that order, and
//! each block's low parts are one `u32`, position `p` at bits `2p .. 2p + 2`. In that order, the high parts of a
//! block packed 16 to a `u32` (`hi`, position `p` at bits `2p`) and its low word `lo` give the block's two packed
//! 4-bit words with four bit operations each ([`merge_words`]): that is what the GPU decoders do. The low words
//! are stored by row tile, then block, then row within the tile ([`low_index`]), so the 32 lanes of a tile read
//! one block's low words as 128 consecutive bytes; rows past the last of the matrix hold 0.

use crate::error::{Error, Result};

use super::tile::{avx2_available, LANES};

/// Columns per interleaved block: the columns of a matrix and the segment must be multiples of it.
pub const SPLIT_BLOCK: usize = 16;
/// Bits per weight of a split tensor.
pub const SPLIT_BITS: u32 = 4;
/// Low bits of each weight stored as they are; the other `SPLIT_BITS - SPLIT_LOW_BITS` are coded.
pub const SPLIT_LOW_BITS: u32 = 2;

/// The column of a block held at interleaved position `p`.
#[inline]
pub fn split_column(p: usize) -> usize {
    (p >> 1) + 8 * (p & 1)
}

/// Where the low word of row `row`, block `block` (columns `16 block ..`) lies in a split tensor's low words, for
/// `cols` columns: `((row / 32) * (cols / 16) + block) * 32 + row % 32`.
#[inline]
pub fn low_index(row: usize, block: usize, cols: usize) -> usize {
    ((row / LANES) * (cols / SPLIT_BLOCK) + block) * LANES + row % LANES
}

/// The number of low words of a split `rows x cols` tensor: 32 per row tile and block, `ceil(rows / 32) * 32 *
/// cols / 16`.
pub fn low_words(rows: usize, cols: usize) -> usize {
    rows.div_ceil(LANES) * LANES * (cols / SPLIT_BLOCK)
}

/// Checks that a `cols`-column matrix cut into segments of `segment` columns can be split: both multiples of 16.
pub fn check_split_shape(cols: usize, segment: usize) -> Result<()> {
    check_block("cols", cols)?;
    check_block("segment", segment)
}

fn check_block(what: &'static str, v: usize) -> Result<()> {
    if v % SPLIT_BLOCK != 0 {
        return Err(Error::param(what, format!("{v} is not a multiple of {SPLIT_BLOCK}, as a split tensor needs")));
    }
    Ok(())
}

/// Splits row-major 4-bit symbols of a `rows x cols` matrix (`cols` a multiple of 16) into the coded high parts
/// (2-bit symbols, row-major, columns interleaved within each block) and the low words ([`low_index`] order).
pub fn split_symbols(symbols: &[u8], rows: usize, cols: usize) -> Result<(Vec<u8>, Vec<u32>)> {
    check_block("cols", cols)?;
    if symbols.len() != rows * cols {
        return Err(Error::ShapeMismatch { what: "symbols".into(), expected: rows * cols, actual: symbols.len() });
    }
    if let Some(s) = symbols.iter().find(|&&s| s >> SPLIT_BITS != 0) {
        return Err(Error::param("symbols", format!("{s} does not fit {SPLIT_BITS} bits")));
    }
    let mut high = vec![0u8; symbols.len()];
    let mut low = vec![0u32; low_words(rows, cols)];
    let blocks = symbols.chunks_exact(SPLIT_BLOCK).zip(high.chunks_exact_mut(SPLIT_BLOCK));
    for (i, (block, out)) in blocks.enumerate() {
        let mut lo = 0u32;
        for (p, h) in out.iter_mut().enumerate() {
            let q = block[split_column(p)];
            *h = q >> SPLIT_LOW_BITS;
            lo |= ((q & 3) as u32) << (2 * p);
        }
        let (row, b) = (i / (cols / SPLIT_BLOCK), i % (cols / SPLIT_BLOCK));
        low[low_index(row, b, cols)] = lo;
    }
    Ok((high, low))
}

/// Merges the high parts of rows `row0 ..` (`high`, whole rows of `cols` 2-bit symbols in interleaved order, as
/// decoded) with their low words in place: `high` becomes those rows' 4-bit symbols in column order. `low` is
/// all of the tensor's low words.
pub fn merge_symbols(high: &mut [u8], row0: usize, cols: usize, low: &[u32]) -> Result<()> {
    check_block("cols", cols)?;
    let rows = high.len().checked_div(cols).unwrap_or(0);
    if rows * cols != high.len() || low.len() < low_words(row0 + rows, cols) {
        return Err(Error::ShapeMismatch {
            what: "split low words".into(),
            expected: low_words(row0 + rows, cols),
            actual: low.len(),
        });
    }
    merge_rows(high, row0, cols, low, avx2_available());
    Ok(())
}

/// [`merge_symbols`] after its checks, with the AVX2 merge where `simd` (the same result).
fn merge_rows(high: &mut [u8], row0: usize, cols: usize, low: &[u32], simd: bool) {
    if cols == 0 {
        return;
    }
    for (r, row) in high.chunks_exact_mut(cols).enumerate() {
        // The row's low words, one per block, LANES apart.
        let first = low_index(row0 + r, 0, cols);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` only where the CPU has AVX2 (`avx2_available`); `merge_symbols` checked that `low` holds
            // every low word of these rows, and `cols` is a multiple of 16.
            unsafe { super::avx2::merge_row(row, low, first) };
            continue;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd; // no SIMD merge on this architecture
        for (block, &lo) in row.chunks_exact_mut(SPLIT_BLOCK).zip(low[first..].iter().step_by(LANES)) {
            let block: &mut [u8; SPLIT_BLOCK] = block.try_into().expect("chunks of SPLIT_BLOCK");
            *block = merge_block(block, lo);
        }
    }
}

/// One block's 4-bit symbols in column order from its high parts in interleaved order (position `2c` is column `c`,
/// position `2c + 1` column `8 + c`, [`split_column`]) and its low word, eight bytes at a time: the even positions'
/// bytes gathered into the first eight columns, the odd into the last eight, and the low word's 2-bit fields spread
/// one to a byte.
#[inline]
fn merge_block(high: &[u8; SPLIT_BLOCK], lo: u32) -> [u8; SPLIT_BLOCK] {
    let a = u64::from_le_bytes(high[..8].try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(high[8..].try_into().expect("8 bytes"));
    let first = (even_bytes(a) | even_bytes(b) << 32) & 0x0303_0303_0303_0303;
    let second = (even_bytes(a >> 8) | even_bytes(b >> 8) << 32) & 0x0303_0303_0303_0303;
    let mut q = [0u8; SPLIT_BLOCK];
    q[..8].copy_from_slice(&(first << SPLIT_LOW_BITS | nibbles_to_bytes(lo & 0x3333_3333)).to_le_bytes());
    q[8..].copy_from_slice(&(second << SPLIT_LOW_BITS | nibbles_to_bytes((lo >> 2) & 0x3333_3333)).to_le_bytes());
    q
}

/// Bytes 0, 2, 4 and 6 of `x` as the low four bytes of the result (the others 0).
#[inline]
fn even_bytes(x: u64) -> u64 {
    let x = x & 0x00ff_00ff_00ff_00ff;
    let x = (x | x >> 8) & 0x0000_ffff_0000_ffff;
    (x | x >> 16) & 0xffff_ffff
}

/// The eight 4-bit fields of `x`, field `i` in byte `i` of the result.
#[inline]
fn nibbles_to_bytes(x: u32) -> u64 {
    let x = x as u64;
    let x = (x | x << 16) & 0x0000_ffff_0000_ffff;
    let x = (x | x << 8) & 0x00ff_00ff_00ff_00ff;
    (x | x << 4) & 0x0f0f_0f0f_0f0f_0f0f
}

/// A block's two packed 4-bit words (columns 0..8 and 8..16, column `c` at bits `4c`) from its high parts packed
/// 16 to a `u32` in interleaved order and its low word.
#[inline]
pub fn merge_words(hi: u32, lo: u32) -> [u32; 2] {
    [((hi & 0x3333_3333) << 2) | (lo & 0x3333_3333), (hi & 0xcccc_cccc) | ((lo >> 2) & 0x3333_3333)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_words_matches_merge_symbols() {
        // 35 rows of 32 columns: two row tiles, the second with 3 rows (its other 29 rows' low words are 0).
        let (rows, cols) = (35, 32);
        let symbols: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + i / 5) % 16) as u8).collect();
        let (mut high, low) = split_symbols(&symbols, rows, cols).unwrap();
        assert_eq!(low.len(), 2 * 32 * 2);
        for (b, chunk) in high.chunks_exact(16).enumerate() {
            let (row, block) = (b / 2, b % 2);
            let hi = (0..16).fold(0u32, |w, p| w | (chunk[p] as u32) << (2 * p));
            let [a, c] = merge_words(hi, low[low_index(row, block, cols)]);
            let want = (0..16).fold(0u64, |w, col| w | (symbols[16 * b + col] as u64) << (4 * col));
            assert_eq!((a as u64) | (c as u64) << 32, want, "row {row} block {block}");
        }
        assert!(low[64 + 3..96].iter().chain(&low[96 + 3..]).all(|&w| w == 0));
        let mut tail = high[32 * cols..].to_vec();
        merge_symbols(&mut tail, 32, cols, &low).unwrap();
        assert_eq!(tail, symbols[32 * cols..]);
        merge_symbols(&mut high, 0, cols, &low).unwrap();
        assert_eq!(high, symbols);
    }

    #[test]
    fn both_merges_agree() {
        // 67 rows of 48 columns (three blocks a row, three row tiles, the last partial), every symbol value.
        let (rows, cols) = (67, 48);
        let symbols: Vec<u8> = (0..rows * cols).map(|i| ((i * 11 + i / 7) % 16) as u8).collect();
        let (high, low) = split_symbols(&symbols, rows, cols).unwrap();
        for simd in [false, avx2_available()] {
            let mut merged = high.clone();
            merge_rows(&mut merged, 0, cols, &low, simd);
            assert_eq!(merged, symbols, "simd {simd}");
            let mut tail = high[35 * cols..].to_vec();
            merge_rows(&mut tail, 35, cols, &low, simd);
            assert_eq!(tail, symbols[35 * cols..], "simd {simd}, from row 35");
        }
    }

    #[test]
    fn split_refuses_odd_columns_and_wide_symbols() {
        assert!(split_symbols(&[0; 24], 1, 24).is_err());
        assert!(split_symbols(&[16; 16], 1, 16).is_err());
        assert!(merge_symbols(&mut [0; 32], 0, 16, &[0; 31]).is_err());
    }
}
