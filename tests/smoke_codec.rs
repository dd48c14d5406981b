use ecq::rans::*;

#[test]
fn smoke_round_trip() {
    for bits in 1..=8u32 {
        let (rows, cols) = (67, 1088);
        let layout = TileLayout::new(rows, cols, bits, 256).unwrap();
        let mut seed = 12345u64;
        let symbols: Vec<u8> = (0..rows * cols)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = (seed >> 33) as u32 % 1000;
                // skewed: small values more likely
                ((r * r / 1000) * (1 << bits) / 1000) as u8
            })
            .collect();
        let counts = joint_counts(&symbols, &layout).unwrap();
        let table = FreqTable::from_counts(&counts, 12).unwrap();
        let stream = encode(&symbols, &layout, &table).unwrap();
        let back = decode(&stream, &layout, &table).unwrap();
        assert_eq!(back, symbols, "bits {bits}");
        let bound = table.cost_bits(&counts);
        let stored = stream.words.len() as f64 * 16.0;
        eprintln!("bits {bits}: stored {stored} bound {bound} ratio {}", stored / bound);
    }
}
