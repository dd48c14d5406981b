//! Bad models through `ecq convert`: truncated GGUF, unsupported and unknown quant types, wrong shapes, safetensors
//! headers that lie about offsets, broken shard indexes, and a failure halfway through the tensors. Each gives a
//! clear error naming what is wrong, a non-zero exit, and leaves the output directory exactly as it was.

#[path = "gguf_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const ECQ: &str = env!("CARGO_BIN_EXE_ecq");

fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = if e.file_type().unwrap().is_file() { std::fs::read(e.path()).unwrap() } else { vec![] };
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect();
    v.sort();
    v
}

/// Writes `bytes` to `dir/name`, converts it to `dir/out.safetensors` (and `extra` args), and checks the failure:
/// exit status, an `error: ` line containing every needle, and no file added, removed or changed in `dir`.
fn expect_failure(dir: &Path, name: &str, bytes: &[u8], extra: &[&str], needles: &[&str]) {
    let input = dir.join(name);
    std::fs::write(&input, bytes).unwrap();
    let before = files_in(dir);
    let out =
        Command::new(ECQ).arg("convert").arg(&input).arg(dir.join("out.safetensors")).args(extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: conversion succeeded");
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(stderr.starts_with("error: "), "{name}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{name}: `{stderr}` lacks `{n}`");
    }
    let after = files_in(dir);
    assert!(after == before, "{name}: the directory changed: {:?}", after.iter().map(|f| &f.0).collect::<Vec<_>>());
    std::fs::remove_file(&input).unwrap();
}

fn gguf(tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    let mut rng = Rng(21);
    let mut w = GgufWriter::new(3);
    w.kv_str("general.architecture", "llama");
    for &(name, dims, ty) in tensors {
        let (cols, rows) = (dims[0] as usize, dims.get(1).copied().unwrap_or(1) as usize);
        let data = match ty {
            Q4_0 | Q4_1 | Q8_0 => random_blocks(&mut rng, ty, rows, cols),
            F32 => vec![0; rows * cols * 4],
            Q6_K => vec![0; rows * cols / 256 * 210],
            _ => vec![0; 64],
        };
        w.tensor(name, dims, ty, data);
    }
    w.build()
}

/// A safetensors file from a raw header (the JSON as given) and `data_len` bytes of data.
fn st_raw(header: &str, data_len: usize) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend(std::iter::repeat_n(0x3c, data_len));
    out
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let good = gguf(&[("blk.0.ffn_up.weight", &[64, 8], Q4_1), ("blk.0.norm.weight", &[64], F32)]);
    for len in [0, 10, 30, good.len() / 2, good.len() - 1] {
        expect_failure(dir.path(), "cut.gguf", &good[..len], &[], &["cut.gguf"]);
    }
    expect_failure(dir.path(), "cut.gguf", &good[..good.len() - 100], &[], &["cut.gguf", "truncated"]);
}

#[test]
fn truncated_real_model() {
    let Some(path) = require_smollm2("truncated_real_model") else { return };
    let bytes = std::fs::read(path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    expect_failure(dir.path(), "smol.gguf", &bytes[..bytes.len() - 4096], &[], &["smol.gguf", "truncated"]);
}

#[test]
fn never_overwrites_a_gguf_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("m.gguf");
    let bytes = gguf(&[("blk.0.ffn_up.weight", &[64, 8], Q4_1)]);
    std::fs::write(&input, &bytes).unwrap();
    let out = Command::new(ECQ).arg("convert").arg(&input).arg(dir.path().join(".").join("m.gguf")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite the input"));
    assert_eq!(files_in(dir.path()), [("m.gguf".to_string(), bytes)]);
}

#[test]
fn unsupported_and_unknown_quant_types() {
    let dir = tempfile::tempdir().unwrap();
    let k6 = gguf(&[("blk.0.ffn_up.weight", &[64, 8], Q4_1), ("blk.0.ffn_down.weight", &[256, 4], Q6_K)]);
    expect_failure(dir.path(), "k6.gguf", &k6, &[], &["blk.0.ffn_down.weight", "Q6_K"]);
    let odd = gguf(&[("blk.0.ffn_up.weight", &[64, 8], Q4_1), ("mystery", &[32], 77)]);
    expect_failure(dir.path(), "odd.gguf", &odd, &["--verify"], &["`mystery`", "unknown ggml type 77"]);
}

#[test]
fn wrong_shapes() {
    let dir = tempfile::tempdir().unwrap();
    // A Q4_1 tensor of 40 columns: not whole blocks of 32.
    let mut w = GgufWriter::new(3);
    w.tensor("w", &[40, 2], Q4_1, vec![0; 60]);
    expect_failure(dir.path(), "cols.gguf", &w.build(), &[], &["`w`", "not a multiple of its block"]);
    // A safetensors tensor whose shape disagrees with its byte range.
    let st = st_raw(r#"{"a.weight":{"dtype":"F32","shape":[4,64],"data_offsets":[0,512]}}"#, 512);
    expect_failure(dir.path(), "shape.safetensors", &st, &[], &["shape.safetensors", "a.weight", "does not match"]);
    // MLX scales with fewer rows than the packed weight.
    let st = st_raw(
        r#"{"x.weight":{"dtype":"U32","shape":[4,8],"data_offsets":[0,128]},
            "x.scales":{"dtype":"F16","shape":[3,1],"data_offsets":[128,134]},
            "x.biases":{"dtype":"F16","shape":[3,1],"data_offsets":[134,140]}}"#,
        140,
    );
    expect_failure(dir.path(), "mlx.safetensors", &st, &["--mlx-bits", "4"], &["x.scales", "expected 4, got 3"]);
}

#[test]
fn safetensors_header_lying_about_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let past_end = st_raw(r#"{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}"#, 200);
    expect_failure(dir.path(), "end.safetensors", &past_end, &[], &["end.safetensors", "`a`", "data offsets"]);
    let overlap = st_raw(
        r#"{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,256]},"b":{"dtype":"F32","shape":[64],"data_offsets":[128,384]}}"#,
        384,
    );
    expect_failure(dir.path(), "overlap.safetensors", &overlap, &[], &["overlap.safetensors", "overlaps"]);
    let mut long = st_raw(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8);
    long[..8].copy_from_slice(&10_000u64.to_le_bytes());
    expect_failure(dir.path(), "long.safetensors", &long, &[], &["long.safetensors", "header length"]);
}

#[test]
fn broken_shard_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let shard = st_raw(r#"{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}"#, 256);
    std::fs::write(dir.path().join("s1.safetensors"), &shard).unwrap();
    let index = |map: &str| format!(r#"{{"weight_map": {map}}}"#).into_bytes();
    expect_failure(
        dir.path(),
        "m.safetensors.index.json",
        &index(r#"{"a": "s2.safetensors"}"#),
        &[],
        &["s2.safetensors"],
    );
    expect_failure(
        dir.path(),
        "m.safetensors.index.json",
        &index(r#"{"b": "s1.safetensors"}"#),
        &[],
        &["`b`", "does not hold it"],
    );
    let two = st_raw(
        r#"{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,256]},"c":{"dtype":"F32","shape":[1],"data_offsets":[256,260]}}"#,
        260,
    );
    std::fs::write(dir.path().join("s3.safetensors"), &two).unwrap();
    expect_failure(
        dir.path(),
        "m.safetensors.index.json",
        &index(r#"{"a": "s3.safetensors"}"#),
        &[],
        &["`c`", "does not assign"],
    );
    expect_failure(
        dir.path(),
        "m.safetensors.index.json",
        &index(r#"{"a": "../s1.safetensors"}"#),
        &[],
        &["not a file name"],
    );
    expect_failure(dir.path(), "m.safetensors.index.json", b"{\"weights\": 1}", &[], &["weight_map"]);
}

/// A float model whose last tensor holds a NaN fails after the first tensors were already encoded and spooled:
/// the error names the tensor and the position, and neither the spool nor a partial output remains. An output
/// file that existed before is left untouched.
#[test]
fn failure_halfway_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let n = 64 * 128;
    let mut data: Vec<u8> = (0..2 * n).flat_map(|i| ((i % 97) as f32 * 0.01).to_le_bytes()).collect();
    let bad = n + 5 * 128 + 7;
    data[bad * 4..bad * 4 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let header = format!(
        r#"{{"a.weight":{{"dtype":"F32","shape":[64,128],"data_offsets":[0,{b}]}},"z.weight":{{"dtype":"F32","shape":[64,128],"data_offsets":[{b},{e}]}}}}"#,
        b = n * 4,
        e = 2 * n * 4
    );
    let mut bytes = st_raw(&header, 0);
    bytes.extend_from_slice(&data);
    std::fs::write(dir.path().join("out.safetensors"), b"an earlier output").unwrap();
    expect_failure(dir.path(), "nan.safetensors", &bytes, &[], &["`z.weight`", "row 5, column 7", "NaN"]);
    assert_eq!(std::fs::read(dir.path().join("out.safetensors")).unwrap(), b"an earlier output");
}
