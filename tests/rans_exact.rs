//! Tiny cases whose words, states and offsets are computed by hand in the comments, and the invariants of
//! frequency tables: sums, minimum frequencies, the decode table at every bin edge, optimality by brute force.

use ecq::rans::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// Relative tolerance when comparing coded sizes (sums of `count * log2`) computed in different orders.
const COST_REL_TOL: f64 = 1e-12;

/// A 256-entry table (the alphabet of 8-bit symbols) with the given leading frequencies, the rest 0.
fn table_256(leading: &[u32], precision: u32) -> FreqTable {
    let mut freqs = vec![0u32; 256];
    freqs[..leading.len()].copy_from_slice(leading);
    FreqTable::from_freqs(freqs, precision).unwrap()
}

fn all_kernels(symbols: &[u8], layout: &TileLayout, table: &FreqTable) -> EncodedStream {
    let fast = encode_with(symbols, layout, table, Kernel::Fast).unwrap();
    for kernel in Kernel::ALL {
        assert_eq!(fast, encode_with(symbols, layout, table, kernel).unwrap(), "{kernel:?} encodes differently");
        assert_eq!(decode_with(&fast, layout, table, kernel).unwrap(), symbols, "{kernel:?} round trip");
    }
    fast
}

/// The 32 states of a tile whose active lanes hold `active`; inactive lanes hold 2^16.
fn tile_states(active: &[u32]) -> Vec<u32> {
    let mut s = vec![STATE_LOWER; LANES];
    s[..active.len()].copy_from_slice(active);
    s
}

/// Two rows of eight 8-bit symbols, `P = 2`, frequencies `f = [2, 1, 1]`, `cum = [0, 2, 3]`.
///
/// Encoding runs t = 7..0, lane 1 then lane 0, from x = 2^16. Symbol 2 (f = 1, c = 3) maps
/// `x -> (x / 1) * 4 + 0 + 3 = 4x + 3`; symbol 1 (f = 1, c = 2) maps `x -> 4x + 2`. A word is emitted first
/// when `x >= f * 2^(32 - P) = 2^30`.
///
/// Row 0 = [2; 8]: after the 7 symbols t = 7..1, `x = 4^7 * 2^16 + (4^7 - 1) = 2^30 + 16383`. At t = 0,
/// `x >= 2^30`: emit `x & 0xffff = 16383 = 0x3fff`, `x >>= 16` gives `2^14 = 16384`, then `x = 4 * 16384 + 3 = 65539`.
///
/// Row 1 = [2, 2, 2, 2, 2, 2, 2, 1]: t = 7 (symbol 1) gives `x = 4 * 2^16 + 2 = 262146`; the six 2s at t = 6..1
/// give `4^6 * 262146 + 4095 = 1073754111 = 2^30 + 12287`. At t = 0 emit `12287 = 0x2fff`, then `x = 65539`.
///
/// Emission order at t = 0 is lane 1 (0x2fff) then lane 0 (0x3fff); reversed for decoding: `[0x3fff, 0x2fff]`,
/// so at decode step 0 lane 0 takes the first word, as the ascending lane order requires.
/// Check of lane 0's first decode step: slot = 65539 & 3 = 3 -> symbol 2, `x = 1 * (65539 >> 2) + 0 = 16384`
/// < 2^16, so it takes 0x3fff: `x = 16384 << 16 | 16383 = 2^30 + 16383`, the state before t = 0 in encoding.
#[test]
fn two_lanes_8bit_p2_words_in_lane_order() {
    let table = table_256(&[2, 1, 1], 2);
    let layout = TileLayout::new(2, 8, 8, 8).unwrap();
    let symbols = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1];
    let stream = all_kernels(&symbols, &layout, &table);
    assert_eq!(stream.words, [0x3fff, 0x2fff]);
    assert_eq!(stream.tile_offsets, [0, 2]);
    assert_eq!(stream.states, tile_states(&[65539, 65539]));
}

/// One row of sixteen symbols 2 (same table as above) cut into two segments of 8: each tile is row 0 of the
/// case above, so each holds one word 0x3fff and ends at 65539; the offsets step by one word per tile.
#[test]
fn two_segments_offsets() {
    let table = table_256(&[2, 1, 1], 2);
    let layout = TileLayout::new(1, 16, 8, 8).unwrap();
    let stream = all_kernels(&[2; 16], &layout, &table);
    assert_eq!(stream.words, [0x3fff, 0x3fff]);
    assert_eq!(stream.tile_offsets, [0, 1, 2]);
    let mut states = tile_states(&[65539]);
    states.extend(tile_states(&[65539]));
    assert_eq!(stream.states, states);
}

/// The same sixteen symbols in one segment of 16: the state runs on past the first word. Encoding t = 15..0
/// with `x -> 4x + 3`, emitting first when `x >= 2^30`:
///   t = 15..9 (seven symbols): `x = 4^7 * 2^16 + 4^7 - 1 = 2^30 + 16383`
///   t = 8: emit 0x3fff, `x = 2^14`, then `x = 4 * 2^14 + 3 = 65539`
///   t = 7..1: `x = 4^7 * 65539 + 16383 = (2^30 + 49152) + 16383 = 2^30 + 65535` (before t = 1 it was
///   `4^6 * 65539 + 4095 = 268451839 < 2^30`, so no word earlier)
///   t = 0: emit `(2^30 + 65535) & 0xffff = 0xffff`, `x = 2^14`, then `x = 65539`
/// Emission order [0x3fff, 0xffff], reversed for decoding: [0xffff, 0x3fff].
#[test]
fn one_segment_sixteen_steps() {
    let table = table_256(&[2, 1, 1], 2);
    let layout = TileLayout::new(1, 16, 8, 16).unwrap();
    let stream = all_kernels(&[2; 16], &layout, &table);
    assert_eq!(stream.words, [0xffff, 0x3fff]);
    assert_eq!(stream.tile_offsets, [0, 2]);
    assert_eq!(stream.states, tile_states(&[65539]));
}

/// 2-bit weights travel as quads: joint symbol `j = q0 | q1 << 2 | q2 << 4 | q3 << 6`. One row
/// `[1, 0, 0, 0, 3, 2, 1, 0]` is the two joint symbols `1` and `3 | 2 << 2 | 1 << 4 = 27`.
/// `P = 3`, f[1] = 5 (c = 0), f[27] = 3 (c = 5). Encoding t = 1 then t = 0 from 2^16 (no word: the state stays far
/// below f * 2^29):
///   t = 1, symbol 27: `x = (65536 / 3) * 8 + 65536 % 3 + 5 = 21845 * 8 + 1 + 5 = 174766`
///   t = 0, symbol 1: `x = (174766 / 5) * 8 + 174766 % 5 + 0 = 34953 * 8 + 1 = 279625`
/// Decoding: slot = 279625 & 7 = 1, in [0, 5) -> symbol 1, `x = 5 * (279625 >> 3) + 1 - 0 = 174766`.
#[test]
fn two_bit_quads_p3() {
    let mut freqs = vec![0u32; 256];
    freqs[1] = 5;
    freqs[27] = 3;
    let table = FreqTable::from_freqs(freqs, 3).unwrap();
    let layout = TileLayout::new(1, 8, 2, 8).unwrap();
    let stream = all_kernels(&[1, 0, 0, 0, 3, 2, 1, 0], &layout, &table);
    assert!(stream.words.is_empty());
    assert_eq!(stream.tile_offsets, [0, 0]);
    assert_eq!(stream.states, tile_states(&[279625]));
}

/// 4-bit weights travel as pairs `j = q0 | q1 << 4`: the row `[3, 1, 0, 2]` is the joint symbols 0x13 and 0x20.
/// `P = 4`, f[0x13] = 12 (c = 0), f[0x20] = 4 (c = 12). From 2^16:
///   t = 1, symbol 0x20: `x = (65536 / 4) * 16 + 0 + 12 = 262156`
///   t = 0, symbol 0x13: `x = (262156 / 12) * 16 + 262156 % 12 = 21846 * 16 + 4 = 349540`
#[test]
fn four_bit_pairs_p4() {
    let mut freqs = vec![0u32; 256];
    freqs[0x13] = 12;
    freqs[0x20] = 4;
    let table = FreqTable::from_freqs(freqs, 4).unwrap();
    let layout = TileLayout::new(1, 4, 4, 4).unwrap();
    let stream = all_kernels(&[3, 1, 0, 2], &layout, &table);
    assert!(stream.words.is_empty());
    assert_eq!(stream.states, tile_states(&[349540]));
}

/// A one-symbol tensor: that symbol has f = 2^P, so `C(s, x) = x` and `D(x) = x`: no words, every state stays 2^16.
#[test]
fn one_symbol_tensor_costs_only_states() {
    let layout = TileLayout::new(33, 64, 4, 32).unwrap();
    let symbols = vec![9u8; 33 * 64];
    let table = FreqTable::from_counts(&joint_counts(&symbols, &layout).unwrap(), 12).unwrap();
    assert_eq!(table.freqs()[0x99], 4096);
    let stream = all_kernels(&symbols, &layout, &table);
    assert!(stream.words.is_empty());
    assert!(stream.states.iter().all(|&x| x == STATE_LOWER));
    assert_eq!(stream.tile_offsets, vec![0; layout.tiles() + 1]);
}

/// The decode table packs `symbol | (freq - 1) << 8 | (slot - cum) << 20`: check an example by hand.
/// f = [2, 1, 1], P = 2: slots 0, 1 -> symbol 0 (f - 1 = 1, offsets 0, 1); slot 2 -> symbol 1; slot 3 -> symbol 2.
#[test]
fn decode_table_layout() {
    let table = table_256(&[2, 1, 1], 2);
    assert_eq!(table.decode_table(), [1 << 8, 1 << 8 | 1 << 20, 1, 2]);
}

/// Every set of frequencies with `freq[s] >= 1` where `count[s] > 0` and sum `2^P`, by recursion.
fn all_tables(present: &[usize], left: u32, at: usize, cur: &mut Vec<u32>, out: &mut Vec<Vec<u32>>) {
    if at == present.len() {
        if left == 0 {
            out.push(cur.clone());
        }
        return;
    }
    let remaining = (present.len() - at - 1) as u32;
    for f in 1..=left.saturating_sub(remaining) {
        cur[present[at]] = f;
        all_tables(present, left - f, at + 1, cur, out);
    }
    cur[present[at]] = 0;
}

fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0xf7e9), failure_persistence: None, ..Config::default() }
}

proptest! {
    #![proptest_config(config(200))]

    /// Invariants of `from_counts`: sum 2^P, present symbols >= 1, absent symbols 0, `cum` the prefix sums, and
    /// the decode table inverts the cumulative frequencies at every bin edge (and everywhere in between).
    #[test]
    fn table_invariants(
        counts in prop::collection::vec(prop_oneof![3 => Just(0u64), 5 => 1u64..50, 2 => 0u64..1_000_000], 1..=256),
        precision in 1u32..=12,
    ) {
        let present = counts.iter().filter(|&&c| c > 0).count();
        let result = FreqTable::from_counts(&counts, precision);
        if present > 1 << precision {
            prop_assert!(result.is_err());
            return Ok(());
        }
        let table = result.unwrap();
        prop_assert_eq!(table.freqs().iter().map(|&f| f as u64).sum::<u64>(), 1u64 << precision);
        for (s, (&c, &f)) in counts.iter().zip(table.freqs()).enumerate() {
            if present > 0 {
                prop_assert_eq!(c > 0, f > 0, "symbol {} count {} freq {}", s, c, f);
            }
        }
        let mut acc = 0;
        for (s, (&f, &cum)) in table.freqs().iter().zip(table.cum()).enumerate() {
            prop_assert_eq!(cum, acc, "cum of {}", s);
            acc += f;
        }
        let dtable = table.decode_table();
        prop_assert_eq!(dtable.len(), 1usize << precision);
        for (s, (&f, &c)) in table.freqs().iter().zip(table.cum()).enumerate() {
            if f == 0 {
                continue;
            }
            for (slot, offset) in [(c, 0), (c + f - 1, f - 1)] {
                let e = dtable[slot as usize];
                prop_assert_eq!((e & 0xff) as usize, s);
                prop_assert_eq!(((e >> 8) & 0xfff) + 1, f);
                prop_assert_eq!(e >> 20, offset);
            }
        }
        for (slot, &e) in dtable.iter().enumerate() {
            let s = (e & 0xff) as usize;
            prop_assert_eq!(table.cum()[s] + (e >> 20), slot as u32);
        }
    }

    /// On alphabets of up to 4 symbols and precisions up to 5 bits, `from_counts` reaches the smallest coded
    /// size over every valid table (enumerated exhaustively).
    #[test]
    fn table_is_optimal(
        counts in prop::collection::vec(prop_oneof![1 => Just(0u64), 4 => 1u64..1000], 1..=4),
        precision in 1u32..=5,
    ) {
        let present: Vec<usize> = (0..counts.len()).filter(|&s| counts[s] > 0).collect();
        prop_assume!(!present.is_empty() && present.len() <= 1 << precision);
        let table = FreqTable::from_counts(&counts, precision).unwrap();
        let mut tables = Vec::new();
        all_tables(&present, 1 << precision, 0, &mut vec![0; counts.len()], &mut tables);
        let best = tables
            .into_iter()
            .map(|f| FreqTable::from_freqs(f, precision).unwrap().cost_bits(&counts))
            .fold(f64::INFINITY, f64::min);
        let got = table.cost_bits(&counts);
        prop_assert!(got <= best * (1.0 + COST_REL_TOL), "from_counts {} > optimum {}", got, best);
    }
}

/// Frequencies that do not sum to 2^P, an empty or oversized alphabet, or a bad precision are refused.
#[test]
fn bad_tables_are_refused() {
    assert!(FreqTable::from_freqs(vec![1, 2], 2).is_err());
    assert!(FreqTable::from_freqs(vec![], 2).is_err());
    assert!(FreqTable::from_freqs(vec![0; 257], 2).is_err());
    assert!(FreqTable::from_freqs(vec![8192], 13).is_err());
    assert!(FreqTable::from_counts(&[1, 1, 1], 1).is_err());
    assert!(FreqTable::from_counts(&[1, 1], 0).is_err());
}

/// A joint symbol that occurs but has frequency 0 in the table is refused by both encoders.
#[test]
fn absent_symbol_is_refused() {
    let table = table_256(&[3, 1], 2);
    let layout = TileLayout::new(1, 2, 8, 2).unwrap();
    for kernel in Kernel::ALL {
        assert!(encode_with(&[0, 2], &layout, &table, kernel).is_err(), "{kernel:?}");
    }
}
