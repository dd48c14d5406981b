//! The `ecq` binary end to end on a small synthetic model written with the `safetensors` crate.

#[path = "common/cli.rs"]
mod cli;
use cli::{ecq, text};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ecq::format::{ArrayNames, EcFile, EncodeOptions};
use ecq::quant::{quantize, unpack_mlx, QuantConfig, QuantizedMatrix, ScaleDtype};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            0.05 * u * u * u + (i % 7) as f32 * 1e-3
        })
        .collect()
}

/// One input tensor: name, dtype, shape, and its values as f32 (exactly representable in the dtype).
struct Input {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl Input {
    fn bytes(&self) -> Vec<u8> {
        match self.dtype {
            Dtype::F32 => self.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => self.values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            Dtype::BF16 => self.values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            Dtype::I64 => self.values.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect(),
            _ => unreachable!(),
        }
    }

    /// The values as the dtype holds them (what the converter reads).
    fn stored_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F16 => self.values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            Dtype::BF16 => self.values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
            _ => self.values.clone(),
        }
    }
}

fn inputs() -> Vec<Input> {
    let t = |name, dtype, shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        Input { name, dtype, shape, values: weights(n, seed) }
    };
    vec![
        t("model.layers.0.mlp.up_proj.weight", Dtype::F32, vec![67, 256], 1),
        t("model.layers.0.self_attn.q_proj.weight", Dtype::BF16, vec![40, 128], 2),
        t("model.embed_tokens.weight", Dtype::F16, vec![33, 192], 3),
        t("model.norm.weight", Dtype::F32, vec![256], 4),
        t("odd.weight", Dtype::F32, vec![8, 100], 5),
        Input { name: "ids", dtype: Dtype::I64, shape: vec![3], values: vec![1.0, 2.0, 3.0] },
    ]
}

const ENCODED: [&str; 3] =
    ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"];

fn write_model(path: &Path) -> Vec<Input> {
    let ins = inputs();
    write_inputs(path, &ins);
    ins
}

fn write_inputs(path: &Path, ins: &[Input]) {
    let bytes: Vec<Vec<u8>> = ins.iter().map(Input::bytes).collect();
    let views: Vec<(&str, TensorView)> =
        ins.iter().zip(&bytes).map(|(i, b)| (i.name, TensorView::new(i.dtype, i.shape.clone(), b).unwrap())).collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    std::fs::write(path, safetensors::serialize(views, &meta).unwrap()).unwrap();
}

fn scale_dtype(d: Dtype) -> ScaleDtype {
    match d {
        Dtype::F32 => ScaleDtype::F32,
        Dtype::F16 => ScaleDtype::F16,
        Dtype::BF16 => ScaleDtype::Bf16,
        _ => unreachable!(),
    }
}

/// What the converter must have produced for `input`.
fn expected(input: &Input, bits: u32, group_size: usize) -> QuantizedMatrix {
    let config = QuantConfig { bits, group_size, scale_dtype: scale_dtype(input.dtype) };
    quantize(&input.stored_f32(), input.shape[0], input.shape[1], config).unwrap()
}

fn floats(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => unreachable!(),
    }
}

fn no_temporaries(dir: &Path, allowed: &[&str]) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(allowed.contains(&n.as_str()), "unexpected file {n} left in {}", dir.display());
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    inputs: Vec<Input>,
}

fn setup() -> Setup {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let model = dir.join("model.safetensors");
    let inputs = write_model(&model);
    Setup { _dir: d, dir, model, inputs }
}

#[test]
fn convert_inspect_verify_unpack_round_trip() {
    let s = setup();
    let out = s.dir.join("model.ecq.safetensors");
    let r = ecq(&[&"convert", &s.model, &out]);
    assert!(r.status.success(), "convert failed: {}", text(&r.stderr));
    assert!(text(&r.stdout).contains("3 tensors encoded"), "{}", text(&r.stdout));
    no_temporaries(&s.dir, &["model.safetensors", "model.ecq.safetensors"]);

    let f = EcFile::open(&out).unwrap();
    assert_eq!(f.encoded_names().collect::<Vec<_>>(), ENCODED);
    assert_eq!(f.raw_names().collect::<Vec<_>>(), ["ids", "model.norm.weight", "odd.weight"]);
    assert_eq!(f.user_metadata().collect::<Vec<_>>(), [("format", "pt")]);
    for input in s.inputs.iter().filter(|i| ENCODED.contains(&i.name)) {
        let got = f.tensor(input.name).unwrap().to_quantized().unwrap();
        assert_eq!(got, expected(input, 4, 64), "{}", input.name);
        let info = f.encoded_info(input.name).unwrap();
        assert_eq!(
            (info.precision, info.layout.segment().min(input.shape[1])),
            (ecq::rans::DEFAULT_PRECISION, input.shape[1].min(512))
        );
    }
    for input in s.inputs.iter().filter(|i| !ENCODED.contains(&i.name)) {
        assert_eq!(f.raw(input.name).unwrap().data, &input.bytes()[..], "{}", input.name);
    }

    let r = ecq(&[&"inspect", &out]);
    assert!(r.status.success(), "inspect failed: {}", text(&r.stderr));
    let table = text(&r.stdout);
    for input in &s.inputs {
        assert_eq!(table.lines().filter(|l| l.starts_with(input.name)).count(), 1, "{} in\n{table}", input.name);
    }
    let up = table.lines().find(|l| l.starts_with("model.layers.0.mlp.up_proj.weight")).unwrap();
    let cols: Vec<&str> = up.split_whitespace().collect();
    assert_eq!(&cols[1..5], ["[67,", "256]", "4-bit", "64"], "{up}");
    // stored bits/weight is at least the entropy (a static code cannot beat the order-0 bound by much on
    // pair symbols; it may by the small pair-entropy gain, never by 0.2 bits) and scale bits = 32/64 (F32 input).
    let (stored, entropy): (f64, f64) = (cols[5].parse().unwrap(), cols[6].parse().unwrap());
    assert!(stored > entropy - 0.2 && stored < 4.5, "{up}");
    assert_eq!(cols[9], "0.500", "{up}");
    let q = table.lines().find(|l| l.starts_with("model.layers.0.self_attn.q_proj.weight")).unwrap();
    assert_eq!(q.split_whitespace().nth(9), Some("0.250"), "bf16 scales, 16 bits per 64 weights: {q}");
    assert!(table.lines().any(|l| l.starts_with("total")), "{table}");

    let r = ecq(&[&"verify", &out]);
    assert!(r.status.success(), "verify failed: {}{}", text(&r.stdout), text(&r.stderr));
    assert!(text(&r.stdout).contains("all 6 tensors verified"), "{}", text(&r.stdout));

    let mlx = s.dir.join("model.mlx.safetensors");
    let r = ecq(&[&"unpack", &out, &mlx]);
    assert!(r.status.success(), "unpack failed: {}", text(&r.stderr));
    assert!(text(&r.stdout).contains("\"group_size\": 64, \"bits\": 4"), "{}", text(&r.stdout));
    let bytes = std::fs::read(&mlx).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("mlx"));
    for input in s.inputs.iter().filter(|i| ENCODED.contains(&i.name)) {
        let want = expected(input, 4, 64);
        let a = ArrayNames::new(input.name);
        let w = st.tensor(input.name).unwrap();
        assert_eq!(w.dtype(), Dtype::U32);
        assert_eq!(w.shape(), &[want.rows, want.cols * 4 / 32]);
        let words: Vec<u32> = w.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        let (sc, bi) = (st.tensor(&a.scales).unwrap(), st.tensor(&a.biases).unwrap());
        assert_eq!((sc.dtype(), bi.dtype()), (input.dtype, input.dtype), "{}", input.name);
        let got = QuantizedMatrix {
            rows: want.rows,
            cols: want.cols,
            bits: 4,
            group_size: 64,
            symbols: unpack_mlx(&words, want.cols, 4).unwrap(),
            scales: floats(sc.dtype(), sc.data()),
            biases: floats(bi.dtype(), bi.data()),
            scale_dtype: want.scale_dtype,
        };
        // The same symbols, scales and biases dequantize with the same f32 operations: equal bit for bit.
        assert_eq!(got, want, "{}", input.name);
        assert_eq!(got.dequantize(), want.dequantize(), "{}", input.name);
    }
    for input in s.inputs.iter().filter(|i| !ENCODED.contains(&i.name)) {
        assert_eq!(st.tensor(input.name).unwrap().data(), &input.bytes()[..], "{}", input.name);
    }
    assert_eq!(st.names().len(), 3 * 3 + 3);
}

#[test]
fn convert_honours_bits_group_precision_and_segment() {
    let s = setup();
    let out = s.dir.join("three.safetensors");
    let r = ecq(&[
        &"convert",
        &s.model,
        &out,
        &"--bits",
        &"3",
        &"--group-size",
        &"32",
        &"--precision",
        &"10",
        &"--segment",
        &"96",
    ]);
    assert!(r.status.success(), "convert failed: {}", text(&r.stderr));
    let f = EcFile::open(&out).unwrap();
    // odd.weight has 100 columns, not a multiple of 32 either: still passthrough.
    assert_eq!(f.encoded_names().collect::<Vec<_>>(), ENCODED);
    for input in s.inputs.iter().filter(|i| ENCODED.contains(&i.name)) {
        let info = f.encoded_info(input.name).unwrap();
        let segment = EncodeOptions { segment: 96, precision: 10, split: None, min_tiles: 0 }.segment_for(
            info.layout.rows(),
            info.layout.cols(),
            32,
        );
        assert_eq!((info.layout.bits(), info.group_size, info.precision, info.layout.segment()), (3, 32, 10, segment));
        assert_eq!(f.tensor(input.name).unwrap().to_quantized().unwrap(), expected(input, 3, 32), "{}", input.name);
    }
    let r = ecq(&[&"verify", &out]);
    assert!(r.status.success(), "verify failed: {}", text(&r.stdout));
}

/// `--min-tiles` shortens the segments of a matrix with fewer tiles than it names: 64 x 1024 weights are 2 row tiles
/// of 2 segments by default, 4 segments of 256 columns with `--min-tiles 8`.
#[test]
fn convert_min_tiles_shortens_segments() {
    let s = setup();
    let model = s.dir.join("wide.safetensors");
    let wide = Input { name: "wide.weight", dtype: Dtype::F32, shape: vec![64, 1024], values: weights(64 * 1024, 9) };
    write_inputs(&model, std::slice::from_ref(&wide));
    for (flags, segment) in [(vec![], 512), (vec!["--min-tiles", "8"], 256), (vec!["--min-tiles", "4"], 512)] {
        let out = s.dir.join("wide_out.safetensors");
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &model, &out];
        for f in &flags {
            args.push(f);
        }
        let r = ecq(&args);
        assert!(r.status.success(), "{flags:?}: convert failed: {}", text(&r.stderr));
        let f = EcFile::open(&out).unwrap();
        let info = f.encoded_info("wide.weight").unwrap();
        assert_eq!(info.layout.segment(), segment, "{flags:?}");
        assert_eq!(f.tensor("wide.weight").unwrap().to_quantized().unwrap(), expected(&wide, 4, 64), "{flags:?}");
        let r = ecq(&[&"verify", &out]);
        assert!(r.status.success(), "{flags:?}: verify failed: {}", text(&r.stdout));
    }
}

/// Converts the model with `flag` into `file`, checks that the file is of format `version` and that every encoded
/// tensor has `(bits, low_bits, coded bits)` as `split` and decodes to what the quantizer gives, and that `verify`
/// passes; returns the file.
fn convert_split(s: &Setup, flag: &str, file: &str, version: u32, split: (u32, u32, u32)) -> PathBuf {
    let out = s.dir.join(file);
    let r = ecq(&[&"convert", &s.model, &out, &flag]);
    assert!(r.status.success(), "convert failed: {}", text(&r.stderr));
    let f = EcFile::open(&out).unwrap();
    assert_eq!(f.format_version(), Some(version));
    for input in s.inputs.iter().filter(|i| ENCODED.contains(&i.name)) {
        let info = f.encoded_info(input.name).unwrap();
        assert_eq!((info.bits(), info.low_bits, info.layout.bits()), split, "{}", input.name);
        assert_eq!(f.tensor(input.name).unwrap().to_quantized().unwrap(), expected(input, 4, 64), "{}", input.name);
    }
    let r = ecq(&[&"verify", &out]);
    assert!(r.status.success(), "verify failed: {}", text(&r.stdout));
    out
}

#[test]
fn convert_split_writes_version_2_that_verifies() {
    let s = setup();
    let out = convert_split(&s, "--split", "split.safetensors", 2, (4, 2, 2));
    let r = ecq(&[&"inspect", &out]);
    assert!(r.status.success(), "inspect failed: {}", text(&r.stdout));
}

#[test]
fn convert_split3_writes_version_3_that_verifies() {
    let s = setup();
    let out = convert_split(&s, "--split=3", "split3.safetensors", 3, (4, 3, 1));
    let r = ecq(&[&"inspect", &out]);
    assert!(r.status.success() && text(&r.stdout).contains("split4/3"), "inspect: {}", text(&r.stdout));
    // Only 2 or 3 low bits are defined.
    let r = ecq(&[&"convert", &s.model, &s.dir.join("x.safetensors"), &"--split=4"]);
    assert!(!r.status.success() && text(&r.stderr).contains("2 or 3 low bits"), "{}", text(&r.stderr));
}

#[test]
fn verify_fails_on_a_corrupted_file() {
    let s = setup();
    let out = s.dir.join("c.safetensors");
    assert!(ecq(&[&"convert", &s.model, &out]).status.success());
    let mut bytes = std::fs::read(&out).unwrap();
    // Flip a byte in the middle of the data of one array of one tensor.
    let (hlen, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let victim = ArrayNames::new(ENCODED[1]).words;
    let (b, e) = meta.info(&victim).unwrap().data_offsets;
    bytes[8 + hlen + (b + e) / 2] ^= 0x10;
    let bad = s.dir.join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let r = ecq(&[&"verify", &bad]);
    assert!(!r.status.success(), "verify passed a corrupted file: {}", text(&r.stdout));
    let stdout = text(&r.stdout);
    let fault = stdout.lines().find(|l| l.starts_with("FAULT")).unwrap_or_else(|| panic!("no FAULT line:\n{stdout}"));
    assert!(fault.contains(ENCODED[1]) && fault.contains("checksum"), "{fault}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok")).count(), 5, "{stdout}");
    assert!(text(&r.stderr).contains("1 of 6 tensors are faulty"), "{}", text(&r.stderr));

    // A truncated file fails before any tensor is read, with a message naming the file.
    std::fs::write(&bad, &bytes[..bytes.len() - 3]).unwrap();
    let r = ecq(&[&"verify", &bad]);
    assert!(!r.status.success());
    assert!(
        text(&r.stderr).starts_with("error: ") && text(&r.stderr).contains("bad.safetensors"),
        "{}",
        text(&r.stderr)
    );
    // So does inspect.
    let r = ecq(&[&"inspect", &bad]);
    assert!(!r.status.success());
}

#[test]
fn convert_refuses_to_overwrite_its_input() {
    let s = setup();
    let before = std::fs::read(&s.model).unwrap();
    let same_dir_alias = s.dir.join(".").join("model.safetensors");
    for out in [s.model.clone(), same_dir_alias] {
        let r = ecq(&[&"convert", &s.model, &out]);
        assert!(!r.status.success(), "convert onto {} succeeded", out.display());
        assert!(text(&r.stderr).contains("refusing to overwrite the input"), "{}", text(&r.stderr));
    }
    #[cfg(unix)]
    {
        let link = s.dir.join("link.safetensors");
        std::fs::hard_link(&s.model, &link).unwrap();
        let r = ecq(&[&"convert", &s.model, &link]);
        assert!(!r.status.success(), "convert onto a hard link of its input succeeded");
        assert!(text(&r.stderr).contains("refusing to overwrite the input"), "{}", text(&r.stderr));
        std::fs::remove_file(&link).unwrap();
    }
    assert_eq!(std::fs::read(&s.model).unwrap(), before, "input changed");
    no_temporaries(&s.dir, &["model.safetensors"]);
    // unpack has the same guard.
    let out = s.dir.join("e.safetensors");
    assert!(ecq(&[&"convert", &s.model, &out]).status.success());
    let r = ecq(&[&"unpack", &out, &out]);
    assert!(!r.status.success() && text(&r.stderr).contains("refusing to overwrite the input"));
}

#[test]
fn bad_options_and_bad_inputs_fail_cleanly_without_output() {
    let s = setup();
    let out = s.dir.join("o.safetensors");
    for (args, needle) in [
        (vec!["--bits", "7"], "bits"),
        (vec!["--group-size", "48"], "group_size"),
        (vec!["--precision", "13"], "--precision"),
        (vec!["--segment", "70000"], "--segment"),
        (vec!["--segment", "256", "--min-tiles", "2048"], "--min-tiles"),
    ] {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &s.model, &out];
        for a in &args {
            all.push(a);
        }
        let r = ecq(&all);
        assert!(!r.status.success(), "{args:?} accepted");
        assert!(text(&r.stderr).contains(needle), "{args:?}: {}", text(&r.stderr));
    }
    // A truncated input: clear error, nothing written.
    let bytes = std::fs::read(&s.model).unwrap();
    let cut = s.dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let r = ecq(&[&"convert", &cut, &out]);
    assert!(!r.status.success());
    assert!(text(&r.stderr).contains("cut.safetensors"), "{}", text(&r.stderr));
    // An ecq container is not a conversion input.
    let ecqf = s.dir.join("e.safetensors");
    assert!(ecq(&[&"convert", &s.model, &ecqf]).status.success());
    let r = ecq(&[&"convert", &ecqf, &out]);
    assert!(!r.status.success() && text(&r.stderr).contains("already an ecq container"), "{}", text(&r.stderr));
    // A missing input.
    let r = ecq(&[&"convert", &s.dir.join("nope.safetensors"), &out]);
    assert!(!r.status.success() && text(&r.stderr).contains("nope.safetensors"), "{}", text(&r.stderr));
    no_temporaries(&s.dir, &["model.safetensors", "cut.safetensors", "e.safetensors"]);
}

#[test]
fn help_names_every_command_and_option() {
    let r = ecq(&[&"--help"]);
    assert!(r.status.success());
    let h = text(&r.stdout);
    for c in ["convert", "inspect", "verify", "unpack", "Typical use"] {
        assert!(h.contains(c), "--help lacks {c}:\n{h}");
    }
    let r = ecq(&[&"convert", &"--help"]);
    assert!(r.status.success());
    let h = text(&r.stdout);
    for o in [
        "--bits",
        "--group-size",
        "--precision",
        "--segment",
        "--min-tiles",
        "--split",
        "[default: 4]",
        "[default: 64]",
    ] {
        assert!(h.contains(o), "convert --help lacks {o}:\n{h}");
    }
}
