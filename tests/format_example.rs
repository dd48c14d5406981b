//! The worked examples of docs/FORMAT.md: section 9 (exact words, states and decode table) and the split
//! example of section 2.1.

use ecq::rans::{decode, encode, FreqTable, TileLayout, LANES, STATE_LOWER};

const ROW0: [u8; 32] = [1, 0, 1, 0, 2, 3, 1, 0, 1, 0, 1, 0, 5, 5, 1, 0, 1, 0, 0, 4, 1, 0, 1, 0, 2, 3, 1, 0, 1, 0, 1, 0];
const ROW1: [u8; 32] = [0, 4, 1, 0, 1, 0, 1, 0, 0, 4, 1, 0, 1, 0, 2, 3, 5, 5, 1, 0, 1, 0, 0, 4, 1, 0, 1, 0, 1, 0, 1, 0];

fn table() -> FreqTable {
    let mut freqs = vec![0u32; 256];
    freqs[0x01] = 10;
    freqs[0x32] = 2;
    freqs[0x40] = 3;
    freqs[0x55] = 1;
    FreqTable::from_freqs(freqs, 4).unwrap()
}

#[test]
fn worked_example_matches_format_md() {
    let symbols: Vec<u8> = ROW0.iter().chain(&ROW1).copied().collect();
    let layout = TileLayout::new(2, 32, 4, 32).unwrap();
    let table = table();
    assert_eq!((table.cum()[0x01], table.cum()[0x32], table.cum()[0x40], table.cum()[0x55]), (0, 10, 12, 15));
    assert_eq!(
        table.decode_table(),
        [
            0x00000901, 0x00100901, 0x00200901, 0x00300901, 0x00400901, 0x00500901, 0x00600901, 0x00700901, 0x00800901,
            0x00900901, 0x00000132, 0x00100132, 0x00000240, 0x00100240, 0x00200240, 0x00000055,
        ]
    );
    let stream = encode(&symbols, &layout, &table).unwrap();
    assert_eq!(stream.words, [0x0539, 0xae03]);
    assert_eq!(stream.tile_offsets, [0, 2]);
    let mut states = vec![STATE_LOWER; LANES];
    states[0] = 0x00177488;
    states[1] = 0x00341f0c;
    assert_eq!(stream.states, states);
    assert_eq!(decode(&stream, &layout, &table).unwrap(), symbols);
}

#[test]
fn worked_example_first_steps_follow_the_formulas() {
    // Section 9's hand computation of step 0, with the decode-table entry unpacked as section 5 says.
    let dtable = table().decode_table();
    let step = |x: u32| {
        let e = dtable[(x & 0xf) as usize];
        let (s, f) = (e & 0xff, ((e >> 8) & 0xfff) + 1);
        (s, f * (x >> 4) + (e >> 20))
    };
    assert_eq!(step(0x00177488), (0x01, 960728));
    assert_eq!(step(0x00341f0c), (0x40, 640464));
}

/// The split example of docs/FORMAT.md section 2.1: one row of 16 weights.
#[test]
fn split_example_matches_format_md() {
    use ecq::rans::{merge_words, split_symbols, SplitForm};
    let q: [u8; 16] = [3, 14, 7, 0, 9, 12, 5, 10, 1, 15, 6, 11, 2, 8, 13, 4];
    let (high, low) = split_symbols(&q, 1, 16, SplitForm::Low2).unwrap();
    assert_eq!(high, [0, 0, 3, 3, 1, 1, 0, 2, 2, 0, 3, 2, 1, 3, 2, 1]);
    let joint: Vec<u32> =
        high.chunks(4).map(|h| h.iter().enumerate().fold(0, |j, (i, &s)| j | (s as u32) << (2 * i))).collect();
    assert_eq!(joint, [0xf0, 0x85, 0xb2, 0x6d]);
    // One row: the low words of the 31 rows past it in the row tile are 0.
    assert_eq!(low.len(), 32);
    assert_eq!(low[0], 0x2509cbe7);
    assert!(low[1..].iter().all(|&w| w == 0));
    let hi = joint.iter().enumerate().fold(0u32, |w, (t, &j)| w | j << (8 * t));
    assert_eq!(merge_words(hi, low[0]), [0xa5c907e3, 0x4d82b6f1]);
    assert_eq!(ecq::quant::pack_mlx(&q, 16, 4).unwrap(), [0xa5c907e3, 0x4d82b6f1]);
}

/// The split example of docs/FORMAT.md section 2.2 (one bit coded): one row of 32 weights.
#[test]
fn split3_example_matches_format_md() {
    use ecq::rans::{merge_words3, split_symbols, SplitForm};
    let q: [u8; 32] =
        [3, 14, 7, 0, 9, 12, 5, 10, 1, 15, 6, 11, 2, 8, 13, 4, 6, 9, 0, 15, 4, 11, 10, 5, 12, 3, 8, 7, 13, 2, 1, 14];
    let (high, low) = split_symbols(&q, 1, 32, SplitForm::Low3).unwrap();
    let h = [0, 0, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0];
    assert_eq!(high, h);
    let joint: Vec<u32> =
        high.chunks(8).map(|h| h.iter().enumerate().fold(0, |j, (i, &s)| j | (s as u32) << i)).collect();
    assert_eq!(joint, [0x44, 0xab, 0x65, 0x75]);
    // One row: three words, each followed by the 31 rows past it in the row tile, which are 0.
    assert_eq!(low.len(), 3 * 32);
    assert_eq!([low[0], low[32], low[64]], [0xe18d07a7, 0x49c2f2f1, 0x1eb4f0d2]);
    assert!(low.iter().enumerate().all(|(i, &w)| i % 32 == 0 || w == 0));
    let hi = joint.iter().enumerate().fold(0u32, |w, (t, &j)| w | j << (8 * t));
    let words = [0xa5c907e3, 0x4d82b6f1, 0x5ab4f096, 0xe12d783c];
    assert_eq!(merge_words3(hi, [low[0], low[32], low[64]]), words);
    assert_eq!(ecq::quant::pack_mlx(&q, 32, 4).unwrap(), words);
}
