//! `ecq::model::convert` and `ecq convert` on every kind of input, small synthetic files: GGUF (Q4_0, Q4_1,
//! Q8_0, float), MLX-quantized safetensors (bits from config.json, from metadata, from the option), sharded
//! safetensors through an index, and the float-tensor selection. Every encoded tensor is compared exactly
//! with what its source says.

#[path = "gguf_support/mod.rs"]
mod support;

#[path = "common/cli.rs"]
mod cli;
use cli::{ecq, text};
use std::path::{Path, PathBuf};

use ecq::format::gguf::GgufFile;
use ecq::format::mlx::{export_mlx, MlxQuantized};
use ecq::format::{Dtype, EcFile};
use ecq::model::{convert, ConvertOptions, InputFormat, ModelTensor, Progress, Stage, TensorAction, TensorSelection};
use ecq::quant::{quantize, QuantConfig, QuantizedMatrix, ScaleDtype};
use ecq::{EcModel, Error};
use support::*;

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| ((rng.next() % 20001) as f32 / 10000.0 - 1.0) * 0.05).collect()
}

/// Writes `(name, dtype, shape, bytes)` tensors with the `safetensors` crate.
fn write_st(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], meta: Option<(&str, &str)>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new((*d).into(), s.clone(), b).unwrap()))
        .collect();
    let meta = meta.map(|(k, v)| std::collections::HashMap::from([(k.to_string(), v.to_string())]));
    std::fs::write(path, safetensors::serialize(views, &meta).unwrap()).unwrap();
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn no_progress() -> impl FnMut(Progress<'_>) {
    |_| {}
}

fn decoded(f: &EcFile, name: &str) -> QuantizedMatrix {
    f.tensor(name).unwrap().to_quantized().unwrap()
}

fn gguf_model(dir: &Path) -> (PathBuf, GgufWriter) {
    let mut rng = Rng(11);
    let mut w = GgufWriter::new(3);
    w.kv_str("general.architecture", "llama").kv_u32("llama.block_count", 1);
    w.tensor("token_embd.weight", &[64, 40], Q8_0, random_blocks(&mut rng, Q8_0, 40, 64));
    w.tensor("blk.0.attn_q.weight", &[64, 33], Q4_0, random_blocks(&mut rng, Q4_0, 33, 64));
    w.tensor("blk.0.ffn_up.weight", &[96, 70], Q4_1, random_blocks(&mut rng, Q4_1, 70, 96));
    w.tensor("blk.0.attn_norm.weight", &[64], F32, f32_bytes(&weights(&mut rng, 64)));
    w.tensor("output.weight", &[128, 5], F16, f16_bytes(&weights(&mut rng, 640)));
    let path = dir.join("model.gguf");
    std::fs::write(&path, w.build()).unwrap();
    (path, w)
}

#[test]
fn gguf_quantized_tensors_are_encoded_losslessly() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = gguf_model(dir.path());
    let out = dir.path().join("out.safetensors");
    let mut events = Vec::new();
    let options = ConvertOptions { verify: true, ..ConvertOptions::default() };
    let report = convert(&path, &out, &options, &mut |p: Progress<'_>| {
        events.push((p.stage, p.done, p.total, p.tensor.to_string()))
    })
    .unwrap();
    assert_eq!(report.format, InputFormat::Gguf);
    assert!(report.verified);
    assert_eq!((report.encoded(), report.passthrough()), (3, 2));
    let action = |n: &str| report.tensors.iter().find(|t| t.name == n).unwrap().action.clone();
    assert_eq!(
        action("blk.0.ffn_up.weight"),
        TensorAction::Imported { source: "GGUF Q4_1".into(), bits: 4, group_size: 32 }
    );
    assert_eq!(
        action("token_embd.weight"),
        TensorAction::Imported { source: "GGUF Q8_0".into(), bits: 8, group_size: 32 }
    );
    // A float matrix in an already-quantized model stays float by default.
    assert_eq!(action("output.weight"), TensorAction::Passthrough);
    // Progress: every tensor once per stage, in order, each stage ending at done == total.
    for stage in [Stage::Convert, Stage::Verify] {
        let e: Vec<_> = events.iter().filter(|e| e.0 == stage).collect();
        assert_eq!(e.len(), 6, "{stage:?}: {e:?}");
        assert!(e.iter().enumerate().all(|(i, e)| e.1 == i && e.2 == 5), "{e:?}");
        assert_eq!(e[5].3, "");
    }

    let g = GgufFile::open(&path).unwrap();
    let f = EcFile::open(&out).unwrap();
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight"] {
        assert_eq!(decoded(&f, name), g.quantized(name).unwrap(), "{name}");
    }
    assert_eq!(f.raw("blk.0.attn_norm.weight").unwrap().data, g.tensor_bytes("blk.0.attn_norm.weight").unwrap());
    let o = f.raw("output.weight").unwrap();
    assert_eq!((o.dtype, o.shape, o.data), (Dtype::F16, &[5usize, 128][..], g.tensor_bytes("output.weight").unwrap()));
    // Scalar GGUF metadata is carried over.
    let meta: Vec<(&str, &str)> = f.user_metadata().collect();
    assert!(
        meta.contains(&("general.architecture", "llama")) && meta.contains(&("llama.block_count", "1")),
        "{meta:?}"
    );

    // --include quantizes the float matrix too (scales in its own dtype, F16), through the CLI.
    let out2 = dir.path().join("out2.safetensors");
    let r = ecq(&[&"convert", &path, &out2, &"--include", &"output.*", &"--verify"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(text(&r.stdout).contains("4 tensors encoded"), "{}", text(&r.stdout));
    let f2 = EcFile::open(&out2).unwrap();
    let w: Vec<f32> = g
        .tensor_bytes("output.weight")
        .unwrap()
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let want = quantize(&w, 5, 128, QuantConfig { bits: 4, group_size: 64, scale_dtype: ScaleDtype::F16 }).unwrap();
    assert_eq!(decoded(&f2, "output.weight"), want);
}

/// An MLX model: two 4-bit weights (group 64) and one 8-bit override, F16 scales; a norm and a float head.
fn mlx_model(dir: &Path) -> Vec<(String, QuantizedMatrix)> {
    let mut rng = Rng(5);
    let cfg4 = QuantConfig { bits: 4, group_size: 64, scale_dtype: ScaleDtype::F16 };
    let cfg8 = QuantConfig { bits: 8, group_size: 64, scale_dtype: ScaleDtype::F16 };
    let qs = vec![
        ("model.layers.0.mlp.up_proj".to_string(), quantize(&weights(&mut rng, 70 * 192), 70, 192, cfg4).unwrap()),
        ("model.layers.0.self_attn.q_proj".to_string(), quantize(&weights(&mut rng, 33 * 128), 33, 128, cfg4).unwrap()),
        ("model.embed_tokens".to_string(), quantize(&weights(&mut rng, 50 * 128), 50, 128, cfg8).unwrap()),
    ];
    let mut tensors = Vec::new();
    for (stem, q) in &qs {
        let m: MlxQuantized = export_mlx(q).unwrap();
        for (name, a) in m.named(stem) {
            tensors.push((name, a.dtype, a.shape.clone(), a.data.clone()));
        }
    }
    tensors.push(("model.norm.weight".into(), Dtype::F16, vec![128], f16_bytes(&weights(&mut rng, 128))));
    tensors.push(("lm_head.weight".into(), Dtype::F16, vec![10, 128], f16_bytes(&weights(&mut rng, 1280))));
    write_st(&dir.join("model.safetensors"), &tensors, Some(("format", "mlx")));
    qs
}

const MLX_CONFIG: &str = r#"{"model_type": "llama", "quantization": {"group_size": 64, "bits": 4,
    "model.embed_tokens": {"group_size": 64, "bits": 8}}}"#;

#[test]
fn mlx_safetensors_import_losslessly_with_bits_from_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let qs = mlx_model(dir.path());
    let input = dir.path().join("model.safetensors");
    let out = dir.path().join("out.safetensors");

    // Without config.json the bit width is unknown: a clear error, nothing written.
    let r = ecq(&[&"convert", &input, &out]);
    assert!(!r.status.success());
    assert!(
        text(&r.stderr).contains("bit width is unknown") && text(&r.stderr).contains("--mlx-bits"),
        "{}",
        text(&r.stderr)
    );
    assert_eq!(files_in(dir.path()), ["model.safetensors"]);

    std::fs::write(dir.path().join("config.json"), MLX_CONFIG).unwrap();
    let r = ecq(&[&"convert", &input, &out, &"--verify"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(
        text(&r.stdout).contains("3 tensors encoded") && text(&r.stdout).contains("2 passed through"),
        "{}",
        text(&r.stdout)
    );
    let f = EcFile::open(&out).unwrap();
    for (stem, q) in &qs {
        assert_eq!(&decoded(&f, &format!("{stem}.weight")), q, "{stem}");
    }
    // The float head of a quantized model stays as it is; the norm passes through.
    assert_eq!(f.raw_names().collect::<Vec<_>>(), ["lm_head.weight", "model.norm.weight"]);
    assert_eq!(f.user_metadata().collect::<Vec<_>>(), [("format", "mlx")]);

    // A config whose group size disagrees with the shapes is refused, naming the tensor; the earlier output
    // stays as it was and no temporary file is left.
    let before = std::fs::read(&out).unwrap();
    let bad = r#"{"quantization": {"group_size": 32, "bits": 4, "model.embed_tokens": {"bits": 8}}}"#;
    std::fs::write(dir.path().join("config.json"), bad).unwrap();
    let r = ecq(&[&"convert", &input, &out]);
    assert!(!r.status.success());
    let err = text(&r.stderr);
    assert!(err.contains("group_size 32") && err.contains("`model.embed_tokens.weight`"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert_eq!(files_in(dir.path()), ["config.json", "model.safetensors", "out.safetensors"]);

    // Unpacking records the bit widths in the metadata: the MLX file converts back without config.json.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let mlx = dir.path().join("unpacked.safetensors");
    assert!(ecq(&[&"unpack", &out, &mlx]).status.success());
    let again = dir.path().join("again.safetensors");
    let r = ecq(&[&"convert", &mlx, &again, &"--verify"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let f2 = EcFile::open(&again).unwrap();
    for (stem, _) in &qs {
        let name = format!("{stem}.weight");
        assert_eq!(f2.tensor(&name).unwrap(), f.tensor(&name).unwrap(), "{name}");
    }
}

#[test]
fn mlx_bits_option_overrides_when_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(9);
    let q = quantize(
        &weights(&mut rng, 40 * 256),
        40,
        256,
        QuantConfig { bits: 3, group_size: 32, ..QuantConfig::default() },
    )
    .unwrap();
    let m = export_mlx(&q).unwrap();
    let tensors: Vec<_> =
        m.named("w").into_iter().map(|(n, a)| (n, a.dtype, a.shape.clone(), a.data.clone())).collect();
    let input = dir.path().join("m.safetensors");
    write_st(&input, &tensors, None);
    let out = dir.path().join("o.safetensors");
    let options = ConvertOptions { mlx_bits: Some(3), verify: true, ..ConvertOptions::default() };
    let report = convert(&input, &out, &options, &mut no_progress()).unwrap();
    assert_eq!(report.tensors[0].action, TensorAction::Imported { source: "MLX".into(), bits: 3, group_size: 32 });
    assert_eq!(decoded(&EcFile::open(&out).unwrap(), "w.weight"), q);
}

fn float_tensors(rng: &mut Rng) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    vec![
        ("model.embed_tokens.weight".into(), Dtype::F16, vec![48, 128], f16_bytes(&weights(rng, 48 * 128))),
        ("model.layers.0.mlp.up_proj.weight".into(), Dtype::F32, vec![70, 192], f32_bytes(&weights(rng, 70 * 192))),
        ("model.layers.0.mlp.down_proj.weight".into(), Dtype::BF16, vec![33, 64], {
            weights(rng, 33 * 64).iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()
        }),
        ("model.layers.0.input_layernorm.weight".into(), Dtype::F32, vec![192], f32_bytes(&weights(rng, 192))),
        ("model.norm.weight".into(), Dtype::F32, vec![128], f32_bytes(&weights(rng, 128))),
    ]
}

#[test]
fn sharded_safetensors_convert_like_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = float_tensors(&mut Rng(3));
    let single = dir.path().join("single.safetensors");
    write_st(&single, &tensors, Some(("format", "pt")));
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    write_st(&sharded.join("model-00001-of-00002.safetensors"), &tensors[..2], Some(("format", "pt")));
    write_st(&sharded.join("model-00002-of-00002.safetensors"), &tensors[2..], Some(("format", "pt")));
    let mut map = serde_json::Map::new();
    for (i, t) in tensors.iter().enumerate() {
        map.insert(t.0.clone(), format!("model-0000{}-of-00002.safetensors", if i < 2 { 1 } else { 2 }).into());
    }
    let index = sharded.join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({"metadata": {"total_size": 1}, "weight_map": map}).to_string()).unwrap();

    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    let r = convert(&single, &a, &ConvertOptions::default(), &mut no_progress()).unwrap();
    assert_eq!((r.format, r.encoded(), r.passthrough()), (InputFormat::Safetensors, 3, 2));
    let r = ecq(&[&"convert", &index, &b, &"--verify"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let (fa, fb) = (EcModel::open(&a).unwrap(), EcModel::open(&b).unwrap());
    assert_eq!(fa.names(), fb.names());
    for name in fa.names() {
        match (fa.tensor(name).unwrap(), fb.tensor(name).unwrap()) {
            (ModelTensor::Encoded(x), ModelTensor::Encoded(y)) => assert_eq!(x, y, "{name}"),
            (ModelTensor::Raw(x), ModelTensor::Raw(y)) => {
                assert_eq!((x.dtype, x.shape, x.data), (y.dtype, y.shape, y.data))
            }
            _ => panic!("{name}: encoded in one and not the other"),
        }
    }
    // The float embedding table is quantized by default, with scales in its own dtype.
    let e = fa.encoded("model.embed_tokens.weight").unwrap();
    assert_eq!((e.bits(), e.group_size(), e.scale_dtype()), (4, 64, ScaleDtype::F16));
    assert_eq!(fa.file().encoded_info("model.layers.0.mlp.down_proj.weight").unwrap().scale_dtype, ScaleDtype::Bf16);
}

#[test]
fn selection_patterns_choose_the_float_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("m.safetensors");
    write_st(&input, &float_tensors(&mut Rng(4)), None);
    let out = dir.path().join("o.safetensors");
    let r = ecq(&[&"convert", &input, &out, &"--exclude", &"*embed*"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let f = EcFile::open(&out).unwrap();
    assert_eq!(
        f.encoded_names().collect::<Vec<_>>(),
        ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    );
    assert!(f.raw_names().any(|n| n == "model.embed_tokens.weight"));

    let options = ConvertOptions {
        select: TensorSelection { include: vec!["*.up_proj.*".into()], exclude: vec![] },
        ..ConvertOptions::default()
    };
    let r = convert(&input, &out, &options, &mut no_progress()).unwrap();
    assert_eq!(r.encoded(), 1);
    assert_eq!(EcFile::open(&out).unwrap().encoded_names().collect::<Vec<_>>(), ["model.layers.0.mlp.up_proj.weight"]);
}

#[test]
fn ec_model_gives_tensors_and_matmuls_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("m.safetensors");
    let tensors = float_tensors(&mut Rng(6));
    write_st(&input, &tensors, None);
    let out = dir.path().join("o.safetensors");
    convert(&input, &out, &ConvertOptions::default(), &mut no_progress()).unwrap();
    let m = EcModel::open(&out).unwrap();
    assert_eq!(m.names().len(), 5);
    match m.tensor("model.norm.weight").unwrap() {
        ModelTensor::Raw(v) => assert_eq!((v.dtype, v.shape, v.data), (Dtype::F32, &[128usize][..], &tensors[4].3[..])),
        other => panic!("expected raw, got {other:?}"),
    }
    let up = m.matmul_cpu("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!((up.rows(), up.cols()), (70, 192));
    let q = m.encoded("model.layers.0.mlp.up_proj.weight").unwrap().to_quantized().unwrap();
    let w = q.dequantize();
    let x: Vec<f32> = (0..192).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; 70];
    up.matvec(&x, &mut y).unwrap();
    for r in 0..70 {
        let want: f64 = (0..192).map(|k| w[r * 192 + k] as f64 * x[k] as f64).sum();
        let scale: f64 = (0..192).map(|k| (w[r * 192 + k] as f64 * x[k] as f64).abs()).sum();
        assert!((y[r] as f64 - want).abs() <= 1e-5 * scale, "row {r}: {} vs {want}", y[r]);
    }
    assert!(matches!(m.matmul_cpu("model.norm.weight"), Err(Error::InvalidParameter { .. })));
    assert_eq!(m.matmuls_cpu().unwrap().len(), 3);
}

/// Packed integer weights that are not a full MLX triple (here: no biases) belong to some other scheme: they and
/// their float scales pass through, even when `--include` names them, and the model counts as quantized (its
/// float head is not quantized by default).
#[test]
fn scales_of_other_packed_schemes_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(8);
    let tensors = vec![
        ("q.weight".to_string(), Dtype::U32, vec![8, 8], vec![7u8; 8 * 8 * 4]),
        ("q.scales".to_string(), Dtype::F16, vec![8, 64], f16_bytes(&weights(&mut rng, 8 * 64))),
        ("head.weight".to_string(), Dtype::F16, vec![4, 64], f16_bytes(&weights(&mut rng, 4 * 64))),
    ];
    let input = dir.path().join("m.safetensors");
    write_st(&input, &tensors, None);
    let out = dir.path().join("o.safetensors");
    let r = convert(&input, &out, &ConvertOptions { verify: true, ..ConvertOptions::default() }, &mut no_progress())
        .unwrap();
    assert_eq!((r.encoded(), r.passthrough()), (0, 3));
    let options = ConvertOptions {
        select: TensorSelection { include: vec!["*".into()], exclude: vec![] },
        ..ConvertOptions::default()
    };
    let r = convert(&input, &out, &options, &mut no_progress()).unwrap();
    assert_eq!(
        r.tensors.iter().filter(|t| t.action != TensorAction::Passthrough).map(|t| &t.name).collect::<Vec<_>>(),
        ["head.weight"]
    );
}
