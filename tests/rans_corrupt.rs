//! Hostile streams: random words, random word counts, random states, bad offsets. The decoders must never panic
//! or read out of bounds, must return `Error::CorruptStream` (or a shape error) for what they cannot decode, and
//! the fast kernel must agree with the reference on every row tile: the same symbols, or a fault in the same tile.

use ecq::rans::*;
use ecq::Error;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A valid skewed layer, its table and stream.
fn layer(rows: usize, cols: usize, bits: u32, segment: usize, seed: u64) -> (TileLayout, FreqTable, EncodedStream) {
    let layout = TileLayout::new(rows, cols, bits, segment).unwrap();
    let mut rng = SplitMix(seed);
    let levels = 1u64 << bits;
    let q: Vec<u8> = (0..rows * cols)
        .map(|_| {
            let u = (rng.next() >> 40) as f64 / (1u64 << 24) as f64;
            ((u * u * levels as f64) as u64).min(levels - 1) as u8
        })
        .collect();
    let table = FreqTable::from_counts(&joint_counts(&q, &layout).unwrap(), DEFAULT_PRECISION).unwrap();
    let stream = encode(&q, &layout, &table).unwrap();
    (layout, table, stream)
}

/// Decodes every row tile with every kernel and asserts they agree with the reference: equal symbols when both
/// succeed, and otherwise a `CorruptStream` error in the same tile from both. Returns how many row tiles failed.
fn kernels_agree(stream: &EncodedStream, layout: &TileLayout, table: &FreqTable) -> usize {
    let dtable = DecodeTable::new(table);
    let mut failed = 0;
    for rt in 0..layout.row_tiles() {
        let active = (layout.rows() - rt * LANES).min(LANES);
        let mut reference = vec![0u8; active * layout.cols()];
        let b = decode_row_tile_with(stream, layout, &dtable, rt, &mut reference, Kernel::Reference);
        for kernel in Kernel::ALL.into_iter().filter(|&k| k != Kernel::Reference) {
            let mut fast = vec![0u8; active * layout.cols()];
            let a = decode_row_tile_with(stream, layout, &dtable, rt, &mut fast, kernel);
            match (&a, &b) {
                (Ok(()), Ok(())) => assert_eq!(fast, reference, "row tile {rt}: {kernel:?} decodes differently"),
                (Err(Error::CorruptStream { tile: ta, .. }), Err(Error::CorruptStream { tile: tb, .. })) => {
                    assert_eq!(ta, tb, "row tile {rt}: {kernel:?} reports a fault in a different tile");
                }
                (a, b) => panic!("row tile {rt}: {kernel:?} {a:?}, reference {b:?}"),
            }
        }
        failed += b.is_err() as usize;
    }
    failed
}

fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0xbad), failure_persistence: None, ..Config::default() }
}

proptest! {
    #![proptest_config(config(64))]

    /// The words of a valid stream replaced by random ones (same counts): no panic, both kernels agree, and the
    /// whole-matrix decoders return `CorruptStream` wherever a row tile fails.
    #[test]
    fn random_words(
        bits in 1u32..=8,
        rows in 1usize..=70,
        col_units in 1usize..=80,
        seg_units in 1usize..=48,
        seed in any::<u64>(),
    ) {
        let k = (8 / bits) as usize;
        let (layout, table, mut stream) = layer(rows, col_units * k, bits, seg_units * k, seed);
        let mut rng = SplitMix(seed ^ 1);
        for w in stream.words.iter_mut() {
            *w = rng.next() as u16;
        }
        let failed = kernels_agree(&stream, &layout, &table);
        let whole = decode(&stream, &layout, &table);
        prop_assert_eq!(failed > 0, whole.is_err());
        if let Err(e) = whole {
            prop_assert!(matches!(e, Error::CorruptStream { .. }), "{}", e);
        }
    }

    /// Random word counts per tile (offsets consistent, so the shape check passes), random words and random
    /// active states >= 2^16: the decoders run out of words, leave words unused or end in the wrong state, and
    /// never panic.
    #[test]
    fn random_counts_and_states(
        bits in 1u32..=8,
        rows in 1usize..=70,
        col_units in 1usize..=80,
        seg_units in 1usize..=48,
        max_words in 0usize..3000,
        seed in any::<u64>(),
    ) {
        let k = (8 / bits) as usize;
        let (layout, table, _) = layer(rows, col_units * k, bits, seg_units * k, seed);
        let mut rng = SplitMix(seed ^ 2);
        let mut stream = EncodedStream::default();
        stream.tile_offsets.push(0);
        for i in 0..layout.tiles() {
            let n = rng.next() as usize % (max_words + 1);
            stream.words.extend((0..n).map(|_| rng.next() as u16));
            stream.tile_offsets.push(stream.words.len() as u32);
            let active = layout.tile(i).rows;
            stream.states.extend((0..LANES).map(|lane| {
                if lane < active { (rng.next() as u32).max(STATE_LOWER) } else { STATE_LOWER }
            }));
        }
        check_stream_shape(&stream, &layout).unwrap();
        kernels_agree(&stream, &layout, &table);
        let _ = decode(&stream, &layout, &table);
    }
}

/// One word removed from (or added to) a tile, with the offsets adjusted so the shape stays valid: the decoders
/// report that tile.
#[test]
fn missing_and_extra_words() {
    let (layout, table, stream) = layer(70, 1000, 4, 256, 5);
    for tile in [0, 5, layout.tiles() - 1] {
        for extra in [false, true] {
            let mut bad = stream.clone();
            let end = bad.tile_offsets[tile + 1] as usize;
            if extra {
                bad.words.insert(end, 0x1234);
            } else {
                bad.words.remove(end - 1);
            }
            for o in &mut bad.tile_offsets[tile + 1..] {
                *o = if extra { *o + 1 } else { *o - 1 };
            }
            check_stream_shape(&bad, &layout).unwrap();
            assert_eq!(kernels_agree(&bad, &layout, &table), 1, "tile {tile} extra {extra}");
            match decode(&bad, &layout, &table) {
                Err(Error::CorruptStream { tile: t, .. }) => assert_eq!(t, tile),
                other => panic!("tile {tile} extra {extra}: {other:?}"),
            }
        }
    }
}

/// Offsets out of order or past the words, wrong array lengths and low or stray states: the shape check refuses
/// them, and `decode_row_tile`, called without it, returns an error instead of panicking.
#[test]
fn bad_offsets_and_lengths() {
    let (layout, table, stream) = layer(40, 600, 4, 256, 9);
    let dtable = DecodeTable::new(&table);
    let decode_all = |s: &EncodedStream| -> Vec<Result<(), Error>> {
        let mut results = Vec::new();
        for kernel in Kernel::ALL {
            for rt in 0..layout.row_tiles() {
                let active = (layout.rows() - rt * LANES).min(LANES);
                let mut out = vec![0u8; active * layout.cols()];
                results.push(decode_row_tile_with(s, &layout, &dtable, rt, &mut out, kernel));
            }
        }
        results
    };

    let mut decreasing = stream.clone();
    decreasing.tile_offsets.swap(1, 2);
    let mut past_end = stream.clone();
    past_end.tile_offsets[2] = stream.words.len() as u32 + 7;
    let mut short_offsets = stream.clone();
    short_offsets.tile_offsets.pop();
    let mut short_states = stream.clone();
    short_states.states.pop();
    for (name, bad) in [
        ("decreasing", decreasing),
        ("past end", past_end),
        ("short offsets", short_offsets),
        ("short states", short_states),
    ] {
        assert!(check_stream_shape(&bad, &layout).is_err(), "{name}: shape check passed");
        assert!(decode(&bad, &layout, &table).is_err(), "{name}: decode passed");
        assert!(decode_all(&bad).iter().any(|r| r.is_err()), "{name}: every row tile decoded");
    }

    // States below 2^16 (active lanes) or not 2^16 (inactive lanes) fail the shape check; decoding them directly
    // must still be safe and agree between kernels.
    let mut low = stream.clone();
    low.states[3] = 5;
    low.states[LANES * layout.tiles() - 1] = 0xdead_beef;
    assert!(check_stream_shape(&low, &layout).is_err());
    kernels_agree(&low, &layout, &table);

    // Wrong output size and a row tile past the end are parameter errors.
    let mut out = vec![0u8; 3];
    assert!(decode_row_tile(&stream, &layout, &dtable, 0, &mut out).is_err());
    assert!(decode_row_tile(&stream, &layout, &dtable, layout.row_tiles(), &mut out).is_err());
}
