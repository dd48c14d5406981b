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

#[test]
fn smoke_quantize_encode_matvec() {
    use ecq::format::{EcTensor, EncodeOptions};
    use ecq::quant::{quantize, QuantConfig};
    let (rows, cols) = (67, 1088);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
    let q = quantize(&w, rows, cols, QuantConfig::default()).unwrap();
    let t = EcTensor::encode(&q, EncodeOptions::default()).unwrap();
    assert_eq!(t.to_quantized().unwrap(), q);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
    let mut y = vec![f32::NAN; rows];
    ecq::EcMatmul::cpu(&t).matvec(&x, &mut y).unwrap();
    let deq = q.dequantize();
    for r in 0..rows {
        let want: f64 = (0..cols).map(|c| deq[r * cols + c] as f64 * x[c] as f64).sum();
        assert!((y[r] as f64 - want).abs() < 1e-3, "row {r}: {} vs {want}", y[r]);
    }
}
