//! Stored size against the entropy bound on the layer the format is designed for: 4096 x 4096 heavy-tailed
//! weights, 4-bit, group 64, the default segment and precision.

#[path = "common/student_t.rs"]
mod student_t;
use ecq::format::{EcTensor, EncodeOptions};
use ecq::quant::{quantize, QuantConfig};
use ecq::rans::entropy_bits;
use student_t::student_t;

/// Largest allowed excess of the stored stream over the order-0 entropy of the weight symbols (issue 2: 2.5%).
const MAX_EXCESS: f64 = 0.025;

#[test]
fn default_layer_is_within_2_5_percent_of_entropy() {
    let (rows, cols) = (4096, 4096);
    let w = student_t(rows * cols, 5.0, 0.02, 42);
    let q = quantize(&w, rows, cols, QuantConfig::default()).unwrap();
    assert_eq!((q.bits, q.group_size), (4, 64));
    let mut counts = vec![0u64; 16];
    for &s in &q.symbols {
        counts[s as usize] += 1;
    }
    let entropy = entropy_bits(&counts);
    let t = EcTensor::encode(&q, EncodeOptions::default()).unwrap();
    let stored = t.stream_bits() as f64 / (rows * cols) as f64;
    eprintln!(
        "4096 x 4096 4-bit g64 Student-t(5): entropy {entropy:.4} bits/weight, stored {stored:.4} ({:+.2}%)",
        100.0 * (stored / entropy - 1.0)
    );
    assert!(stored <= entropy * (1.0 + MAX_EXCESS), "stored {stored} bits/weight, entropy {entropy}");
    assert_eq!(t.decode_symbols().unwrap(), q.symbols);
}
