//! MLX quantized arrays to and from QuantizedMatrix, bit-exact both ways, through real safetensors files;
//! and GGUF Q4_1 re-exported as MLX 4-bit.

#[path = "gguf_support/mod.rs"]
mod support;

use ecq::format::gguf::GgufFile;
use ecq::format::mlx::{export_mlx, import_mlx, import_mlx_from, MlxArray};
use ecq::format::{Dtype, SafetensorsFile, TensorView};
use ecq::quant::{quantize, QuantConfig, QuantizedMatrix, ScaleDtype};
use ecq::Error;
use support::*;

fn weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.next() % 20001) as f32 / 10000.0 - 1.0).collect()
}

fn view(a: &MlxArray) -> TensorView<'_> {
    a.view()
}

/// Serializes arrays with the `safetensors` crate and opens the file with ecq's reader.
fn written(arrays: [(String, &MlxArray); 3]) -> (tempfile::TempDir, SafetensorsFile) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mlx.safetensors");
    std::fs::write(&path, safetensors::serialize(arrays, &None).unwrap()).unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    (dir, file)
}

/// Export, write a safetensors file, read it back, import: the matrix and the bytes come back unchanged.
fn round_trip(q: &QuantizedMatrix) {
    let mlx = export_mlx(q).unwrap();
    assert_eq!(mlx.weight.shape, vec![q.rows, q.cols * q.bits as usize / 32]);
    assert_eq!(mlx.scales.shape, vec![q.rows, q.cols / q.group_size]);
    let (_dir, st) = written(mlx.named("model.layers.0.mlp.up_proj"));
    let back = import_mlx_from(&st, "model.layers.0.mlp.up_proj", q.bits).unwrap();
    assert_eq!(&back, q);
    assert_eq!(export_mlx(&back).unwrap(), mlx);
}

#[test]
fn quantizer_output_round_trips_for_every_width_and_dtype() {
    let mut rng = Rng(1);
    for bits in [2, 3, 4, 5, 6, 8] {
        for group_size in [32, 64, 128] {
            for scale_dtype in [ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32] {
                let (rows, cols) = (37, 384);
                let q = quantize(
                    &weights(&mut rng, rows * cols),
                    rows,
                    cols,
                    QuantConfig { bits, group_size, scale_dtype },
                )
                .unwrap();
                round_trip(&q);
            }
        }
    }
}

/// Arbitrary MLX bytes (every symbol pattern, any finite f16) import and export back to the same bytes.
#[test]
fn arbitrary_mlx_bytes_round_trip() {
    let mut rng = Rng(2);
    let (rows, words_per_row, groups) = (9, 24, 6); // 4-bit: 192 columns, groups of 32
    let weight = MlxArray {
        dtype: Dtype::U32,
        shape: vec![rows, words_per_row],
        data: (0..rows * words_per_row * 4).map(|_| rng.byte()).collect(),
    };
    let floats = |rng: &mut Rng| MlxArray {
        dtype: Dtype::F16,
        shape: vec![rows, groups],
        data: (0..rows * groups).flat_map(|_| rng.f16_bytes()).collect(),
    };
    let (scales, biases) = (floats(&mut rng), floats(&mut rng));
    let q = import_mlx("w", &view(&weight), &view(&scales), &view(&biases), 4).unwrap();
    assert_eq!((q.rows, q.cols, q.group_size, q.scale_dtype), (rows, 192, 32, ScaleDtype::F16));
    let out = export_mlx(&q).unwrap();
    assert_eq!(out.weight, weight);
    assert_eq!(out.scales, scales);
    assert_eq!(out.biases, biases);
}

#[test]
fn rejects_bad_mlx_arrays() {
    let q = quantize(&weights(&mut Rng(3), 4 * 64), 4, 64, QuantConfig::default()).unwrap();
    let mlx = export_mlx(&q).unwrap();
    let (w, s, b) = (view(&mlx.weight), view(&mlx.scales), view(&mlx.biases));
    assert!(matches!(import_mlx("x", &w, &s, &b, 0), Err(Error::InvalidParameter { .. })));
    // bits that make the columns not split into the groups: 8 words of 5-bit symbols is 51.2 columns.
    assert!(matches!(import_mlx("x", &w, &s, &b, 5), Err(Error::InvalidFile { .. })));
    let f32_scales = MlxArray { dtype: Dtype::F32, shape: mlx.scales.shape.clone(), data: vec![0; 4 * 4] };
    assert!(
        matches!(import_mlx("x", &w, &view(&f32_scales), &b, 4), Err(Error::UnsupportedDtype { name, .. }) if name == "x.biases")
    );
    let i32_scales = MlxArray { dtype: Dtype::I32, shape: mlx.scales.shape.clone(), data: vec![0; 4 * 4] };
    assert!(
        matches!(import_mlx("x", &w, &view(&i32_scales), &b, 4), Err(Error::UnsupportedDtype { name, .. }) if name == "x.scales")
    );
    let f16_weight = MlxArray { dtype: Dtype::F16, shape: vec![4, 16], data: mlx.weight.data.clone() };
    assert!(
        matches!(import_mlx("x", &view(&f16_weight), &s, &b, 4), Err(Error::UnsupportedDtype { name, .. }) if name == "x.weight")
    );
    let short_scales = MlxArray { dtype: Dtype::F16, shape: vec![3, 1], data: vec![0; 6] };
    assert!(matches!(
        import_mlx("x", &w, &view(&short_scales), &view(&short_scales), 4),
        Err(Error::ShapeMismatch { .. })
    ));
    let flat = MlxArray { dtype: Dtype::U32, shape: vec![32], data: mlx.weight.data.clone() };
    assert!(matches!(import_mlx("x", &view(&flat), &s, &b, 4), Err(Error::InvalidFile { .. })));
    let mut inf = mlx.scales.clone();
    inf.data[0..2].copy_from_slice(&0x7c00u16.to_le_bytes());
    assert!(
        matches!(import_mlx("x", &w, &view(&inf), &b, 4), Err(Error::InvalidFile { reason }) if reason.contains("x.scales"))
    );
    let (_dir, st) = written(mlx.named("y"));
    assert!(matches!(import_mlx_from(&st, "z", 4), Err(Error::TensorNotFound(n)) if n == "z.weight"));
}

/// A GGUF Q4_1 tensor exported as MLX 4-bit (group 32, f16) and imported again is the same matrix.
#[test]
fn gguf_q4_1_to_mlx_and_back() {
    let mut rng = Rng(4);
    let mut w = GgufWriter::new(3);
    w.tensor("blk.0.ffn_up.weight", &[160, 45], Q4_1, random_blocks(&mut rng, Q4_1, 45, 160));
    w.tensor("blk.0.attn_q.weight", &[64, 3], Q4_0, random_blocks(&mut rng, Q4_0, 3, 64));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, &w.build()).unwrap();
    let g = GgufFile::open(f.path()).unwrap();
    for t in g.tensors() {
        round_trip(&g.quantized(&t.name).unwrap());
    }
}

/// The real model's Q4_1 tensors survive GGUF -> MLX safetensors -> QuantizedMatrix exactly.
#[test]
fn smollm2_q4_1_to_mlx_and_back() {
    let Some(path) = require_smollm2("smollm2_q4_1_to_mlx_and_back") else { return };
    let g = GgufFile::open(path).unwrap();
    for t in g.tensors().iter().filter(|t| t.name.starts_with("blk.0.") && t.dims.len() == 2) {
        round_trip(&g.quantized(&t.name).unwrap());
    }
}
