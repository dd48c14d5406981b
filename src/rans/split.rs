//! Split 4-bit symbols (docs/FORMAT.md, sections 2.1 and 2.2): part of each weight is rANS-coded, the rest stored
//! as it is. Two forms ([`SplitForm`]):
//!
//! - [`SplitForm::Low2`] (section 2.1): the high 2 bits are coded, four weights a step, the low 2 stored. Within
//!   each block of 16 columns the weights are taken in interleaved order: position `2i` is column `i`, position
//!   `2i + 1` is column `8 + i`. Each block's low parts are one `u32`, position `p` at bits `2p .. 2p + 2`. In that
//!   order, the high parts of a block packed 16 to a `u32` (`hi`, position `p` at bits `2p`) and its low word `lo`
//!   give the block's two packed 4-bit words with four bit operations each ([`merge_words`]).
//! - [`SplitForm::Low3`] (section 2.2): one bit a weight is coded, `q3 ^ q2` (whether the weight lies in the middle
//!   half, 4 to 11), eight weights a step; `q3`, `q1` and `q0` are stored. Within each block of 32 columns position
//!   `p` is column `8 (p % 4) + p / 4`, and the stored bits are three `u32`s ([`split_symbols`] says where each bit
//!   goes): with the block's coded bits packed 32 to a `u32` they give its four packed 4-bit words with a few bit
//!   operations each ([`merge_words3`]). A step then decodes 8 weights, twice as many as with `Low2`, at the same
//!   order-0 size: SmolLM2-135M's weights are symmetric about 7.5, so `q3 ^ q2` carries what `q3 q2` does less the
//!   one bit (`q3`) that is close to uniform.
//!
//! The low words are stored by row tile, then block, then word of the block, then row within the tile
//! ([`SplitForm::low_index`]), so the 32 lanes of a tile read each low word of a block as 128 consecutive bytes;
//! rows past the last of the matrix hold 0. That is what the GPU decoders do.

use crate::error::{Error, Result};

use super::tile::{avx2_available, LANES};

/// Columns per interleaved block of the `Low2` form: the columns of a matrix and the segment must be multiples of
/// it ([`SplitForm::block`]).
const SPLIT_BLOCK: usize = 16;
/// Bits per weight of a split tensor.
pub const SPLIT_BITS: u32 = 4;
/// Low bits of each weight stored as they are in the `Low2` form; the other `SPLIT_BITS - SPLIT_LOW_BITS` are coded.
const SPLIT_LOW_BITS: u32 = 2;

/// How a 4-bit weight is split into a coded part and a stored part (docs/FORMAT.md, sections 2.1 and 2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitForm {
    /// The high 2 bits coded (four weights a step), the low 2 stored; blocks of 16 columns, one low word each.
    Low2,
    /// `q3 ^ q2` coded (eight weights a step), `q3`, `q1` and `q0` stored; blocks of 32 columns, three low words.
    Low3,
}

impl SplitForm {
    /// The form that stores `low_bits` bits of each weight, if there is one.
    pub fn from_low_bits(low_bits: u32) -> Option<Self> {
        match low_bits {
            2 => Some(Self::Low2),
            3 => Some(Self::Low3),
            _ => None,
        }
    }

    /// The form whose coded symbols have `bits` bits, if there is one.
    pub fn from_coded_bits(bits: u32) -> Option<Self> {
        SPLIT_BITS.checked_sub(bits).and_then(Self::from_low_bits)
    }

    /// Bits of each weight stored as they are.
    pub const fn low_bits(self) -> u32 {
        match self {
            Self::Low2 => 2,
            Self::Low3 => 3,
        }
    }

    /// Bits of each weight coded: the coded symbols' width.
    pub const fn coded_bits(self) -> u32 {
        SPLIT_BITS - self.low_bits()
    }

    /// Columns per block: the columns of a matrix and the segment must be multiples of it.
    pub const fn block(self) -> usize {
        match self {
            Self::Low2 => SPLIT_BLOCK,
            Self::Low3 => 32,
        }
    }

    /// Low words per row and block.
    pub const fn block_words(self) -> usize {
        self.low_bits() as usize * self.block() / 32
    }

    /// The column of a block held at interleaved position `p`.
    #[inline]
    pub fn column(self, p: usize) -> usize {
        match self {
            Self::Low2 => (p >> 1) + 8 * (p & 1),
            Self::Low3 => 8 * (p % 4) + p / 4,
        }
    }

    /// Where low word `word` of row `row`, block `block` lies in a split tensor's low words, for `cols` columns:
    /// `(((row / 32) * (cols / block) + block) * block_words + word) * 32 + row % 32`.
    #[inline]
    pub fn low_index(self, row: usize, block: usize, word: usize, cols: usize) -> usize {
        (((row / LANES) * (cols / self.block()) + block) * self.block_words() + word) * LANES + row % LANES
    }

    /// The number of low words of a split `rows x cols` tensor: `ceil(rows / 32) * 32 * cols / block *
    /// block_words`.
    pub fn low_words(self, rows: usize, cols: usize) -> usize {
        rows.div_ceil(LANES) * LANES * (cols / self.block()) * self.block_words()
    }

    /// Checks that a `cols`-column matrix cut into segments of `segment` columns can be split: both multiples of
    /// [`block`](Self::block).
    pub fn check_shape(self, cols: usize, segment: usize) -> Result<()> {
        self.check_block("cols", cols)?;
        self.check_block("segment", segment)
    }

    fn check_block(self, what: &'static str, v: usize) -> Result<()> {
        if v % self.block() != 0 {
            return Err(Error::param(
                what,
                format!("{v} is not a multiple of {}, as a split tensor ({self:?}) needs", self.block()),
            ));
        }
        Ok(())
    }
}

/// Splits row-major 4-bit symbols of a `rows x cols` matrix (`cols` a multiple of the form's block) into the
/// coded parts (`form.coded_bits()`-bit symbols, row-major, columns in interleaved order within each block) and the
/// low words ([`SplitForm::low_index`] order).
pub fn split_symbols(symbols: &[u8], rows: usize, cols: usize, form: SplitForm) -> Result<(Vec<u8>, Vec<u32>)> {
    form.check_block("cols", cols)?;
    if symbols.len() != rows * cols {
        return Err(Error::ShapeMismatch { what: "symbols".into(), expected: rows * cols, actual: symbols.len() });
    }
    if let Some(s) = symbols.iter().find(|&&s| s >> SPLIT_BITS != 0) {
        return Err(Error::param("symbols", format!("{s} does not fit {SPLIT_BITS} bits")));
    }
    let mut high = vec![0u8; symbols.len()];
    let mut low = vec![0u32; form.low_words(rows, cols)];
    let block_len = form.block();
    let blocks = symbols.chunks_exact(block_len).zip(high.chunks_exact_mut(block_len));
    for (i, (block, out)) in blocks.enumerate() {
        let (row, b) = (i / (cols / block_len), i % (cols / block_len));
        let words = match form {
            SplitForm::Low2 => {
                let mut lo = 0u32;
                for (p, h) in out.iter_mut().enumerate() {
                    let q = block[form.column(p)];
                    *h = q >> SPLIT_LOW_BITS;
                    lo |= ((q & 3) as u32) << (2 * p);
                }
                [lo, 0, 0]
            }
            SplitForm::Low3 => {
                for (p, h) in out.iter_mut().enumerate() {
                    let q = block[form.column(p)];
                    *h = ((q >> 3) ^ (q >> 2)) & 1;
                }
                // Word k holds q3, q1 and q0 of columns 8k .. 8k + 8 in their places, and in the place of their q2
                // bits bit [3, 1, 0][k] of columns 24 .. 32.
                let mut s = [0u32; 3];
                for (k, w) in s.iter_mut().enumerate() {
                    for i in 0..8 {
                        let own = (block[8 * k + i] & 0b1011) as u32;
                        let last = ((block[24 + i] >> [3, 1, 0][k]) & 1) as u32;
                        *w |= (own | last << 2) << (4 * i);
                    }
                }
                s
            }
        };
        for (word, &w) in words.iter().enumerate().take(form.block_words()) {
            low[form.low_index(row, b, word, cols)] = w;
        }
    }
    Ok((high, low))
}

/// Merges the coded parts of rows `row0 ..` (`high`, whole rows of `cols` symbols in interleaved order, as decoded)
/// with their low words in place: `high` becomes those rows' 4-bit symbols in column order. `low` is all of the
/// tensor's low words.
pub fn merge_symbols(high: &mut [u8], row0: usize, cols: usize, low: &[u32], form: SplitForm) -> Result<()> {
    form.check_block("cols", cols)?;
    let rows = high.len().checked_div(cols).unwrap_or(0);
    if rows * cols != high.len() || low.len() < form.low_words(row0 + rows, cols) {
        return Err(Error::ShapeMismatch {
            what: "split low words".into(),
            expected: form.low_words(row0 + rows, cols),
            actual: low.len(),
        });
    }
    match form {
        SplitForm::Low2 => merge_rows(high, row0, cols, low, avx2_available()),
        SplitForm::Low3 => merge_rows3(high, row0, cols, low),
    }
    Ok(())
}

/// [`merge_symbols`] of the `Low3` form after its checks: per block, the 32 coded bits gathered from their bytes
/// eight at a time with one multiply, the four packed words merged as the GPU does ([`merge_words3`]), and each
/// word's nibbles spread one to a byte.
fn merge_rows3(high: &mut [u8], row0: usize, cols: usize, low: &[u32]) {
    let form = SplitForm::Low3;
    if cols == 0 {
        return;
    }
    for (r, row) in high.chunks_exact_mut(cols).enumerate() {
        for (b, block) in row.chunks_exact_mut(form.block()).enumerate() {
            let mut hi = 0u32;
            for (i, eight) in block.chunks_exact(8).enumerate() {
                // Bytes of 0 or 1: byte j lands on bit 56 + j of the product, with no carries between them.
                let x = u64::from_le_bytes(eight.try_into().expect("8 bytes")) & 0x0101_0101_0101_0101;
                hi |= ((x.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32) << (8 * i);
            }
            let first = form.low_index(row0 + r, b, 0, cols);
            let s = [low[first], low[first + LANES], low[first + 2 * LANES]];
            for (out, w) in block.chunks_exact_mut(8).zip(merge_words3(hi, s)) {
                out.copy_from_slice(&nibbles_to_bytes(w).to_le_bytes());
            }
        }
    }
}

/// [`merge_symbols`] of the `Low2` form after its checks, with the AVX2 merge where `simd` (the same result).
fn merge_rows(high: &mut [u8], row0: usize, cols: usize, low: &[u32], simd: bool) {
    if cols == 0 {
        return;
    }
    for (r, row) in high.chunks_exact_mut(cols).enumerate() {
        // The row's low words, one per block, LANES apart.
        let first = SplitForm::Low2.low_index(row0 + r, 0, 0, cols);
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
/// position `2c + 1` column `8 + c`, [`SplitForm::column`]) and its low word, eight bytes at a time: the even
/// positions' bytes gathered into the first eight columns, the odd into the last eight, and the low word's 2-bit
/// fields spread one to a byte.
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

/// A `Low3` block's four packed 4-bit words (columns `8k .. 8k + 8` in word `k`, column `8k + i` at bits `4i`) from
/// its coded bits packed 32 to a `u32` (position `p` at bit `p`: bit `4i + k` is column `8k + i`) and its three low
/// words: `q2 = c ^ q3` goes in where each word holds a bit of word 3.
#[inline]
pub fn merge_words3(hi: u32, s: [u32; 3]) -> [u32; 4] {
    let own = |k: usize, c: u32| (s[k] & 0xbbbb_bbbb) | ((c ^ (s[k] >> 1)) & 0x4444_4444);
    [
        own(0, hi << 2),
        own(1, hi << 1),
        own(2, hi),
        ((s[0] << 1) & 0x8888_8888)
            | (((hi >> 1) ^ s[0]) & 0x4444_4444)
            | ((s[1] >> 1) & 0x2222_2222)
            | ((s[2] >> 2) & 0x1111_1111),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_words_matches_merge_symbols() {
        // 35 rows of 32 columns: two row tiles, the second with 3 rows (its other 29 rows' low words are 0).
        let (rows, cols) = (35, 32);
        let symbols: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + i / 5) % 16) as u8).collect();
        let (mut high, low) = split_symbols(&symbols, rows, cols, SplitForm::Low2).unwrap();
        assert_eq!(low.len(), 2 * 32 * 2);
        for (b, chunk) in high.chunks_exact(16).enumerate() {
            let (row, block) = (b / 2, b % 2);
            let hi = (0..16).fold(0u32, |w, p| w | (chunk[p] as u32) << (2 * p));
            let [a, c] = merge_words(hi, low[SplitForm::Low2.low_index(row, block, 0, cols)]);
            let want = (0..16).fold(0u64, |w, col| w | (symbols[16 * b + col] as u64) << (4 * col));
            assert_eq!((a as u64) | (c as u64) << 32, want, "row {row} block {block}");
        }
        assert!(low[64 + 3..96].iter().chain(&low[96 + 3..]).all(|&w| w == 0));
        let mut tail = high[32 * cols..].to_vec();
        merge_symbols(&mut tail, 32, cols, &low, SplitForm::Low2).unwrap();
        assert_eq!(tail, symbols[32 * cols..]);
        merge_symbols(&mut high, 0, cols, &low, SplitForm::Low2).unwrap();
        assert_eq!(high, symbols);
    }

    #[test]
    fn both_merges_agree() {
        // 67 rows of 48 columns (three blocks a row, three row tiles, the last partial), every symbol value.
        let (rows, cols) = (67, 48);
        let symbols: Vec<u8> = (0..rows * cols).map(|i| ((i * 11 + i / 7) % 16) as u8).collect();
        let (high, low) = split_symbols(&symbols, rows, cols, SplitForm::Low2).unwrap();
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
        assert!(split_symbols(&[0; 24], 1, 24, SplitForm::Low2).is_err());
        assert!(split_symbols(&[16; 16], 1, 16, SplitForm::Low2).is_err());
        assert!(merge_symbols(&mut [0; 32], 0, 16, &[0; 31], SplitForm::Low2).is_err());
        assert!(split_symbols(&[0; 48], 1, 48, SplitForm::Low3).is_err());
        assert!(split_symbols(&[16; 32], 1, 32, SplitForm::Low3).is_err());
        assert!(merge_symbols(&mut [0; 64], 0, 32, &[0; 3 * 32 - 1], SplitForm::Low3).is_err());
        assert!(SplitForm::Low3.check_shape(64, 48).is_err());
        assert!(SplitForm::Low3.check_shape(64, 96).is_ok());
    }

    #[test]
    fn low3_codes_the_middle_half_bit_and_stores_the_rest() {
        // One row of 32 columns, column c holding c % 16: the coded bit of position p (column 8 (p % 4) + p / 4) is
        // whether that column's weight lies in 4..12.
        let symbols: Vec<u8> = (0..32).map(|c| (c % 16) as u8).collect();
        let (high, low) = split_symbols(&symbols, 1, 32, SplitForm::Low3).unwrap();
        for (p, &h) in high.iter().enumerate() {
            let q = symbols[8 * (p % 4) + p / 4];
            assert_eq!(h, (4..12).contains(&q) as u8, "position {p}");
        }
        // Three low words for the one row (32 entries each, the other 31 rows 0).
        assert_eq!(low.len(), 3 * 32);
        assert!(low.iter().enumerate().all(|(i, &w)| i % 32 == 0 || w == 0));
        // Columns 24..32 hold 8..15. Word 0: columns 0..8 (0..7) without q2, and in the q2 places q3 of columns
        // 24..32 (all 1); word 1: columns 8..16 (8..15) and q1 of 24..32; word 2: columns 16..24 (0..7) and q0.
        assert_eq!([low[0], low[32], low[64]], [0x7654_7654, 0xfe98_fe98, 0x7250_7250]);
    }

    #[test]
    fn low3_merge_words_and_merge_symbols_invert_the_split() {
        // 35 rows of 64 columns: two row tiles (the second with 3 rows), two blocks a row, every symbol value.
        let (rows, cols) = (35, 64);
        let symbols: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + i / 5) % 16) as u8).collect();
        let form = SplitForm::Low3;
        let (mut high, low) = split_symbols(&symbols, rows, cols, form).unwrap();
        assert_eq!(low.len(), form.low_words(rows, cols));
        assert_eq!(low.len(), 2 * 32 * 2 * 3);
        for (b, chunk) in high.chunks_exact(32).enumerate() {
            let (row, block) = (b / 2, b % 2);
            let hi = (0..32).fold(0u32, |w, p| w | (chunk[p] as u32) << p);
            let s = [0, 1, 2].map(|k| low[form.low_index(row, block, k, cols)]);
            let words = merge_words3(hi, s);
            for col in 0..32 {
                let got = (words[col / 8] >> (4 * (col % 8))) & 15;
                assert_eq!(got, symbols[32 * b + col] as u32, "row {row} block {block} column {col}");
            }
        }
        // Rows past the last hold 0.
        for row in rows..64 {
            for block in 0..2 {
                assert!((0..3).all(|k| low[form.low_index(row, block, k, cols)] == 0));
            }
        }
        let mut tail = high[32 * cols..].to_vec();
        merge_symbols(&mut tail, 32, cols, &low, form).unwrap();
        assert_eq!(tail, symbols[32 * cols..]);
        merge_symbols(&mut high, 0, cols, &low, form).unwrap();
        assert_eq!(high, symbols);
    }
}
