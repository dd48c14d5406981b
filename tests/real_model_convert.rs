//! SmolLM2-135M-Instruct Q4_1 through the command line: `ecq convert model.gguf out.safetensors --verify`, then
//! `ecq unpack` to MLX format, then the unpacked arrays compared with the GGUF's own tensors; `ecq inspect` and
//! the library figures it prints, against the entropy bound; and `EcModel` products against a float64
//! reference. Skipped loudly when the model is absent, failing when ECQ_REQUIRE_MODEL=1.

#[path = "gguf_support/mod.rs"]
mod support;

#[path = "common/cli.rs"]
mod cli;
use cli::{ecq, text};

use ecq::format::gguf::{GgmlType, GgufFile};
use ecq::format::mlx::import_mlx_from;
use ecq::format::{Dtype, SafetensorsFile};
use ecq::model::TensorStats;
use ecq::EcModel;

/// Largest allowed excess of the total stored symbol stream (words, states, offsets, tables) over the sum of
/// the tensors' order-0 entropy bounds.
const MAX_STREAM_OVERHEAD: f64 = 0.02;
/// Relative tolerance of an f32 matrix-vector product against the float64 reference, per output, scaled by
/// the sum of absolute products.
const MATVEC_TOL: f64 = 1e-5;

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn smollm2_convert_unpack_equals_gguf_and_inspect_is_within_2pct() {
    let Some(path) = support::require_smollm2("smollm2_convert_unpack_equals_gguf_and_inspect_is_within_2pct") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2.ecq.safetensors");
    let r = ecq(&[&"convert", &path, &out, &"--verify"]);
    assert!(r.status.success(), "convert failed: {}", text(&r.stderr));
    let stdout = text(&r.stdout);
    assert!(stdout.contains("211 tensors encoded") && stdout.contains("61 passed through"), "{stdout}");
    assert!(stdout.contains("verified"), "{stdout}");

    let mlx = dir.path().join("smollm2.mlx.safetensors");
    let r = ecq(&[&"unpack", &out, &mlx]);
    assert!(r.status.success(), "unpack failed: {}", text(&r.stderr));

    let g = GgufFile::open(&path).unwrap();
    let unpacked = SafetensorsFile::open(&mlx).unwrap();
    let mut checked = (0, 0);
    for t in g.tensors() {
        match t.ggml_type {
            GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let stem = t.name.strip_suffix(".weight").unwrap();
                let bits = if t.ggml_type == GgmlType::Q8_0 { 8 } else { 4 };
                let got = import_mlx_from(&unpacked, stem, bits).unwrap();
                let want = g.quantized(&t.name).unwrap();
                assert_eq!(
                    (got.rows, got.cols, got.bits, got.group_size, got.scale_dtype),
                    (want.rows, want.cols, want.bits, want.group_size, want.scale_dtype),
                    "{}",
                    t.name
                );
                assert!(got.symbols == want.symbols, "{}: symbols differ", t.name);
                assert_eq!(bits_of(&got.scales), bits_of(&want.scales), "{}: scales", t.name);
                assert_eq!(bits_of(&got.biases), bits_of(&want.biases), "{}: biases", t.name);
                checked.0 += 1;
            }
            GgmlType::F32 => {
                let v = unpacked.view(&t.name).unwrap();
                assert_eq!((v.dtype, v.shape), (Dtype::F32, &t.shape()[..]), "{}", t.name);
                assert!(v.data == g.tensor_bytes(&t.name).unwrap(), "{}: passthrough bytes differ", t.name);
                checked.1 += 1;
            }
            other => panic!("{}: unexpected type {other}", t.name),
        }
    }
    assert_eq!(checked, (211, 61));
    // Nothing else in the unpacked file: three arrays per quantized tensor and the passthrough ones.
    assert_eq!(unpacked.tensors().len(), 3 * 211 + 61);
    // The unpacked file records its bit widths, so it converts again without options, to the same streams.
    let again = dir.path().join("again.safetensors");
    let r = ecq(&[&"convert", &mlx, &again, &"--verify"]);
    assert!(r.status.success(), "re-convert of the MLX file failed: {}", text(&r.stderr));
    let (a, b) = (EcModel::open(&out).unwrap(), EcModel::open(&again).unwrap());
    assert_eq!(a.encoded_names().collect::<Vec<_>>(), b.encoded_names().collect::<Vec<_>>());
    for name in ["blk.0.attn_q.weight", "token_embd.weight", "blk.29.ffn_down.weight"] {
        assert_eq!(a.encoded(name).unwrap(), b.encoded(name).unwrap(), "{name}");
    }

    // Library-level figures, the ones `ecq inspect` prints.
    let model = EcModel::open(&out).unwrap();
    let stats: Vec<TensorStats> = model.encoded_names().map(|n| model.stats(n).unwrap()).collect();
    assert_eq!(stats.len(), 211);
    let stream: u64 = stats.iter().map(|s| s.stream_bits).sum();
    let entropy: f64 = stats.iter().map(|s| s.entropy_bits).sum();
    let weights: u64 = stats.iter().map(|s| s.weights()).sum();
    assert_eq!(weights, 134_479_872);
    println!(
        "total: stream {:.4} bits/weight, entropy {:.4}, overhead {:+.3}%, with scales and biases {:.4}",
        stream as f64 / weights as f64,
        entropy / weights as f64,
        100.0 * (stream as f64 / entropy - 1.0),
        stats.iter().map(|s| s.total_bits()).sum::<u64>() as f64 / weights as f64
    );
    assert!(
        (stream as f64) <= entropy * (1.0 + MAX_STREAM_OVERHEAD),
        "stream {stream} bits exceeds the entropy bound {entropy} by more than {MAX_STREAM_OVERHEAD}"
    );
    // Each tensor's stream is above its order-0 bound only by the side information and the pair gain:
    // never below the joint-symbol bound by much, never 5% above.
    for s in &stats {
        let ratio = s.stream_bits as f64 / s.entropy_bits;
        assert!(ratio > 0.99 && ratio < 1.05, "{}: stream/entropy {ratio}", s.name);
        assert_eq!(s.scale_bits, 16 * s.weights() / 32, "{}: f16 scale per 32 weights", s.name);
    }

    // The CLI prints the same numbers: per tensor, per role, and the total.
    let r = ecq(&[&"inspect", &out]);
    assert!(r.status.success(), "inspect failed: {}", text(&r.stderr));
    let table = text(&r.stdout);
    let total = table.lines().find(|l| l.starts_with("total")).unwrap();
    let cols: Vec<&str> = total.split_whitespace().collect();
    let printed_stream: f64 = cols[3].parse().unwrap();
    let printed_entropy: f64 = cols[4].parse().unwrap();
    assert!((printed_stream - stream as f64 / weights as f64).abs() < 1e-4, "{total}");
    assert!((printed_entropy - entropy / weights as f64).abs() < 1e-4, "{total}");
    for role in ["blk.*.ffn_up.weight", "blk.*.attn_k.weight", "token_embd.weight"] {
        assert!(table.lines().any(|l| l.starts_with(role)), "no {role} line in\n{table}");
    }
    println!("{table}");
}

/// Every encoded weight of the converted model gives an `EcMatmul`, whose product matches a float64 product with
/// the GGUF's own dequantized weights.
#[test]
fn smollm2_ec_model_matmul_matches_gguf_weights() {
    let Some(path) = support::require_smollm2("smollm2_ec_model_matmul_matches_gguf_weights") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let r = ecq(&[&"convert", &path, &out]);
    assert!(r.status.success(), "convert failed: {}", text(&r.stderr));
    let model = EcModel::open(&out).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let all = model.matmuls_cpu().unwrap();
    assert_eq!(all.len(), 211);
    for name in ["blk.0.attn_v.weight", "blk.7.ffn_down.weight"] {
        let m = &all[name];
        let w = g.quantized(name).unwrap().dequantize();
        let (n, k) = (m.rows(), m.cols());
        let x: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let mut y = vec![0f32; n];
        m.matvec(&x, &mut y).unwrap();
        for r in 0..n {
            let row = &w[r * k..(r + 1) * k];
            let want: f64 = row.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = row.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            assert!((y[r] as f64 - want).abs() <= MATVEC_TOL * scale.max(1e-30), "{name} row {r}: {} vs {want}", y[r]);
        }
    }
    let norm = model.raw("blk.0.attn_norm.weight").unwrap();
    assert_eq!((norm.dtype, norm.shape), (Dtype::F32, &[576usize][..]));
    assert!(matches!(model.matmul_cpu("blk.0.attn_norm.weight"), Err(ecq::Error::InvalidParameter { .. })));
    assert!(matches!(model.matmul_cpu("nope"), Err(ecq::Error::TensorNotFound(_))));
}
