//! MLX packing: symbols of a row as one little-endian bit stream in `u32` words.

use ecq::quant::{mlx_words_per_row, pack_mlx, unpack_mlx, SUPPORTED_BITS};
use ecq::Error;
use proptest::prelude::*;

#[test]
fn four_bit_word_puts_symbol_0_in_the_low_nibble() {
    // Row of 32 symbols 0, 1, ..., 15, 0, 1, ..., 15: four words; nibble i of word 0 is symbol i.
    let row: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
    let words = pack_mlx(&row, 32, 4).unwrap();
    assert_eq!(words, [0x7654_3210, 0xfedc_ba98, 0x7654_3210, 0xfedc_ba98]);
    // A lone symbol 0xa at index 9 lands in word 1, nibble 1.
    let mut row = vec![0u8; 32];
    row[9] = 0xa;
    assert_eq!(pack_mlx(&row, 32, 4).unwrap(), [0, 0xa0, 0, 0]);
}

#[test]
fn three_bit_words_cross_word_boundaries() {
    // Symbols i % 8: each run of 8 symbols is the 24-bit value 0o76543210 = 0xfac688, i.e. the bytes
    // 88 c6 fa (MLX's 3-byte pack of 8 symbols). 32 symbols = 96 bits = 3 words:
    //   word 0 = bits  0..32 = 0xfac688 | (0x88 << 24)                  = 0x88fac688
    //   word 1 = bits 32..64 = 0xfac6   | (0xc688 << 16)                = 0xc688fac6
    //   word 2 = bits 64..96 = 0xfa     | (0xfac688 << 8)               = 0xfac688fa
    // Symbol 10 (= 2, 0b010) straddles words 0 and 1: bits 30, 31 of word 0 are 0, 1 and bit 0 of word 1 is 0.
    let row: Vec<u8> = (0..32).map(|i| (i % 8) as u8).collect();
    let words = pack_mlx(&row, 32, 3).unwrap();
    assert_eq!(words, [0x88fa_c688, 0xc688_fac6, 0xfac6_88fa]);
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(bytes, [0x88, 0xc6, 0xfa].repeat(4));
    assert_eq!(unpack_mlx(&words, 32, 3).unwrap(), row);

    // A lone 7 at symbol 10: bits 30..33, so word 0 gets 0b11 << 30 and word 1 gets 1.
    let mut row = vec![0u8; 32];
    row[10] = 7;
    assert_eq!(pack_mlx(&row, 32, 3).unwrap(), [0xc000_0000, 1, 0]);
}

#[test]
fn rows_start_on_a_fresh_word() {
    // Two rows of 32 six-bit symbols: 6 words each; row 1 starts at word 6.
    let mut symbols = vec![0u8; 64];
    symbols[32] = 0x3f;
    let words = pack_mlx(&symbols, 32, 6).unwrap();
    assert_eq!(words.len(), 12);
    assert_eq!(words[6], 0x3f);
    assert!(words.iter().enumerate().all(|(i, &w)| i == 6 || w == 0));
}

#[test]
fn words_per_row() {
    for (cols, bits, words) in [(32, 4, 4), (64, 3, 6), (128, 5, 20), (32, 6, 6), (64, 8, 16), (32, 2, 2)] {
        assert_eq!(mlx_words_per_row(cols, bits).unwrap(), words, "{cols} x {bits}");
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    assert!(matches!(pack_mlx(&[0; 16], 16, 3), Err(Error::InvalidParameter { name: "cols", .. })));
    assert!(matches!(pack_mlx(&[0; 32], 32, 0), Err(Error::InvalidParameter { name: "bits", .. })));
    assert!(matches!(pack_mlx(&[0; 32], 32, 9), Err(Error::InvalidParameter { name: "bits", .. })));
    assert!(matches!(pack_mlx(&[0; 40], 32, 4), Err(Error::InvalidParameter { name: "symbols", .. })));
    assert!(matches!(unpack_mlx(&[0; 5], 32, 4), Err(Error::InvalidParameter { name: "words", .. })));
    assert!(matches!(unpack_mlx(&[0; 3], 16, 3), Err(Error::InvalidParameter { name: "cols", .. })));
}

fn round_trip(bits: u32, rows: usize, cols: usize, seed: u64) {
    let mut s = seed;
    let symbols: Vec<u8> = (0..rows * cols)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as u32 & ((1 << bits) - 1)) as u8
        })
        .collect();
    let words = pack_mlx(&symbols, cols, bits).unwrap();
    assert_eq!(words.len(), rows * cols * bits as usize / 32);
    assert_eq!(unpack_mlx(&words, cols, bits).unwrap(), symbols, "bits {bits}, {rows} x {cols}");
}

#[test]
fn round_trip_every_supported_width() {
    for bits in SUPPORTED_BITS {
        for cols in [32, 64, 96, 128, 4160] {
            round_trip(bits, 3, cols, bits as u64 * 31 + cols as u64);
        }
    }
}

#[test]
fn round_trip_every_width_1_to_8() {
    for bits in 1..=8 {
        round_trip(bits, 2, 256, bits as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// unpack(pack(s)) == s for any symbols in range, any whole number of rows.
    #[test]
    fn pack_then_unpack(bits in 1u32..=8, rows in 0usize..4, chunks in 1usize..6, seed in any::<u64>()) {
        round_trip(bits, rows, chunks * 32, seed);
    }

    /// pack(unpack(w)) == w for any words: the packing is a bijection on whole rows.
    #[test]
    fn unpack_then_pack(bits in 1u32..=8, rows in 1usize..4, chunks in 1usize..4, seed in any::<u64>()) {
        let cols = chunks * 32;
        let n = rows * cols * bits as usize / 32;
        let mut s = seed;
        let words: Vec<u32> = (0..n).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); (s >> 32) as u32 }).collect();
        let symbols = unpack_mlx(&words, cols, bits).unwrap();
        prop_assert!(symbols.iter().all(|&q| (q as u32) < (1 << bits)));
        prop_assert_eq!(pack_mlx(&symbols, cols, bits).unwrap(), words);
    }
}
