//! Container round trips: what `ContainerWriter` writes, `EcFile` reads back exactly.

use std::path::Path;

use ecq::format::{
    ArrayNames, ContainerWriter, Dtype, EcFile, EcTensor, EncodeOptions, SplitForm, RAW_CRC_KEY, VERSION_KEY,
};
use ecq::quant::{quantize, QuantConfig, ScaleDtype};
use ecq::Error;

/// Deterministic heavy-ish tailed weights: a cubed uniform plus a small ramp, so groups differ.
fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..rows * cols)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            u * u * u + (i % cols) as f32 * 1e-4
        })
        .collect()
}

fn encoded(rows: usize, cols: usize, bits: u32, group_size: usize, sd: ScaleDtype, segment: usize) -> EcTensor {
    let w = weights(rows, cols, (rows * 31 + cols) as u64 + bits as u64);
    let q = quantize(&w, rows, cols, QuantConfig { bits, group_size, scale_dtype: sd }).unwrap();
    EcTensor::encode(&q, EncodeOptions { segment, precision: 12, split: None, min_tiles: 0 }).unwrap()
}

struct Raw {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raws() -> Vec<Raw> {
    let norm: Vec<u8> = (0..67).flat_map(|i| (1.0f32 + i as f32 / 64.0).to_le_bytes()).collect();
    let emb: Vec<u8> = (0..5 * 7).flat_map(|i| half::bf16::from_f32(i as f32 * 0.25).to_le_bytes()).collect();
    vec![
        Raw { name: "model.norm.weight", dtype: Dtype::F32, shape: vec![67], bytes: norm },
        Raw { name: "model.odd", dtype: Dtype::BF16, shape: vec![5, 7], bytes: emb },
        Raw { name: "step", dtype: Dtype::I64, shape: vec![], bytes: 42i64.to_le_bytes().to_vec() },
        Raw { name: "flags", dtype: Dtype::U8, shape: vec![3], bytes: vec![1, 0, 1] },
        Raw { name: "empty", dtype: Dtype::F16, shape: vec![0, 4], bytes: vec![] },
    ]
}

fn tensors() -> Vec<(&'static str, EcTensor)> {
    vec![
        ("layers.0.mlp.up_proj.weight", encoded(67, 1088, 4, 64, ScaleDtype::F16, 512)),
        ("layers.0.attn.q_proj.weight", encoded(33, 256, 2, 32, ScaleDtype::Bf16, 128)),
        ("lm_head", encoded(40, 384, 8, 128, ScaleDtype::F32, 256)),
        ("layers.1.three_bit.weight", encoded(5, 96, 3, 32, ScaleDtype::F16, 96)),
    ]
}

fn write(path: &Path) -> (Vec<(&'static str, EcTensor)>, Vec<Raw>) {
    let (enc, raw) = (tensors(), raws());
    let mut w = ContainerWriter::create(path).unwrap();
    w.set_metadata("format", "pt").unwrap();
    for (i, (name, t)) in enc.iter().enumerate() {
        w.add_encoded(name, t).unwrap();
        if let Some(r) = raw.get(i) {
            w.add_raw(r.name, r.dtype, &r.shape, &r.bytes).unwrap();
        }
    }
    for r in raw.iter().skip(enc.len()) {
        w.add_raw(r.name, r.dtype, &r.shape, &r.bytes).unwrap();
    }
    w.finish().unwrap();
    (enc, raw)
}

#[test]
fn round_trip_equals_original_tensors_and_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.ecq.safetensors");
    let (enc, raw) = write(&path);
    let file = EcFile::open(&path).unwrap();
    assert_eq!(file.format_version(), Some(1));
    let mut names: Vec<&str> = enc.iter().map(|(n, _)| *n).collect();
    names.sort();
    assert_eq!(file.encoded_names().collect::<Vec<_>>(), names);
    for (name, t) in &enc {
        let back = file.tensor(name).unwrap();
        assert_eq!(&back, t, "{name}");
        assert_eq!(back.decode_symbols().unwrap(), t.decode_symbols().unwrap(), "{name}");
    }
    let mut raw_names: Vec<&str> = raw.iter().map(|r| r.name).collect();
    raw_names.sort();
    assert_eq!(file.raw_names().collect::<Vec<_>>(), raw_names);
    for r in &raw {
        let v = file.raw(r.name).unwrap();
        assert_eq!(v.dtype, r.dtype, "{}", r.name);
        assert_eq!(v.shape, &r.shape[..], "{}", r.name);
        assert_eq!(v.data, &r.bytes[..], "{}", r.name);
    }
    assert_eq!(file.user_metadata().collect::<Vec<_>>(), vec![("format", "pt")]);
}

#[test]
fn file_is_standard_safetensors_with_mlx_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let (enc, _) = write(&path);
    let bytes = std::fs::read(&path).unwrap();
    // The reference implementation accepts the file (it rejects gaps, overlaps and trailing bytes).
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header_len % 8, 0, "header padded to 8 bytes");
    let md = meta.metadata().as_ref().unwrap();
    assert_eq!(md.get(VERSION_KEY).map(String::as_str), Some("1"));
    assert!(md.contains_key(RAW_CRC_KEY));
    let up = st.tensor("layers.0.mlp.up_proj.scales").unwrap();
    assert_eq!(up.dtype(), safetensors::Dtype::F16);
    assert_eq!(up.shape(), &[67, 1088 / 64]);
    assert_eq!(st.tensor("lm_head.biases").unwrap().dtype(), safetensors::Dtype::F32);
    assert_eq!(st.tensor("layers.0.attn.q_proj.biases").unwrap().dtype(), safetensors::Dtype::BF16);
    let t = &enc[0].1;
    let states = st.tensor("layers.0.mlp.up_proj.weight.ecq.states").unwrap();
    assert_eq!(states.shape(), &[t.layout().tiles(), 32]);
    assert_eq!(st.tensor("layers.0.mlp.up_proj.weight.ecq.freqs").unwrap().shape(), &[256]);
    // Every tensor starts at a multiple of its element size in the file.
    let data_start = 8 + header_len;
    for (name, info) in meta.tensors() {
        let size = info.dtype.size();
        assert_eq!((data_start + info.data_offsets.0) % size, 0, "{name} misaligned");
    }
}

#[test]
fn dropping_an_unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    {
        let mut w = ContainerWriter::create(&path).unwrap();
        w.add_encoded("a.weight", &tensors()[0].1).unwrap();
        w.add_raw("b", Dtype::U8, &[2], &[1, 2]).unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporaries must be removed");
}

#[test]
fn finish_replaces_an_existing_destination_and_leaves_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    std::fs::write(&path, b"old contents").unwrap();
    let mut w = ContainerWriter::create(&path).unwrap();
    w.add_raw("b", Dtype::U8, &[2], &[1, 2]).unwrap();
    w.finish().unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("out.safetensors")]);
    let f = EcFile::open(&path).unwrap();
    assert_eq!(f.format_version(), None, "no encoded tensor: a plain safetensors file");
    assert_eq!(f.raw("b").unwrap().data, &[1, 2]);
}

#[test]
fn writer_refuses_duplicate_and_reserved_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ContainerWriter::create(dir.path().join("x.safetensors")).unwrap();
    let t = &tensors()[3].1;
    w.add_encoded("a.weight", t).unwrap();
    let dup = w.add_encoded("a.weight", t).unwrap_err();
    assert!(matches!(dup, Error::InvalidParameter { name: "name", .. }), "{dup}");
    // `a.scales` already belongs to encoded `a.weight`.
    let clash = w.add_raw("a.scales", Dtype::U8, &[1], &[0]).unwrap_err();
    assert!(matches!(clash, Error::InvalidParameter { name: "name", .. }), "{clash}");
    let reserved = w.add_raw("b.ecq.words", Dtype::U16, &[1], &[0, 0]).unwrap_err();
    assert!(matches!(reserved, Error::InvalidParameter { name: "name", .. }), "{reserved}");
    let meta = w.set_metadata("ecq.format_version", "2").unwrap_err();
    assert!(matches!(meta, Error::InvalidParameter { name: "metadata", .. }), "{meta}");
    let lying = w.add_raw("c", Dtype::F32, &[3], &[0; 8]).unwrap_err();
    assert!(matches!(lying, Error::InvalidParameter { name: "bytes", .. }), "{lying}");
}

#[test]
fn writer_refuses_segments_beyond_the_format_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ContainerWriter::create(dir.path().join("x.safetensors")).unwrap();
    let cols = 2 * ecq::format::MAX_SEGMENT;
    let big = encoded(1, cols, 8, 128, ScaleDtype::F16, cols);
    let err = w.add_encoded("big", &big).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { name: "segment", .. }), "{err}");
}

/// 40 x 256 4-bit split (the second row tile has 8 rows) and 24 x 128 4-bit not split.
fn split_and_plain() -> [EcTensor; 2] {
    let a = quantize(&weights(40, 256, 1), 40, 256, QuantConfig::default()).unwrap();
    let b = quantize(&weights(24, 128, 2), 24, 128, QuantConfig::default()).unwrap();
    [
        EcTensor::encode(&a, EncodeOptions { segment: 128, split: Some(SplitForm::Low2), ..EncodeOptions::default() })
            .unwrap(),
        EcTensor::encode(&b, EncodeOptions::default()).unwrap(),
    ]
}

/// Writes `tensors` (encoded, by name) to `path` and opens the file.
fn write_encoded(path: &Path, tensors: &[(&str, &EcTensor)]) -> EcFile {
    let mut w = ContainerWriter::create(path).unwrap();
    for (name, t) in tensors {
        w.add_encoded(name, t).unwrap();
    }
    w.finish().unwrap();
    EcFile::open(path).unwrap()
}

#[test]
fn split_tensor_round_trips_in_a_version_2_file() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = split_and_plain();
    let path = dir.path().join("m.safetensors");
    let file = write_encoded(&path, &[("blk.up.weight", &a), ("blk.down.weight", &b)]);
    assert_eq!(file.format_version(), Some(2));
    assert_eq!(file.safetensors().metadata().get(VERSION_KEY).map(String::as_str), Some("2"));
    let info = file.encoded_info("blk.up.weight").unwrap();
    assert_eq!((info.bits(), info.low_bits, info.layout.bits()), (4, 2, 2));
    let low = &file.safetensors().tensors()[&ArrayNames::new("blk.up.weight").low];
    assert_eq!(low.shape, vec![SplitForm::Low2.low_words(40, 256)]);
    assert_eq!(file.tensor("blk.up.weight").unwrap(), a);
    assert_eq!(file.tensor("blk.down.weight").unwrap(), b);
    assert_eq!(file.tensor("blk.up.weight").unwrap().to_quantized().unwrap(), a.to_quantized().unwrap());
    assert_eq!(file.encoded_info("blk.down.weight").unwrap().low_bits, 0);
    // The reference implementation reads it as plain safetensors.
    safetensors::SafeTensors::deserialize(&std::fs::read(&path).unwrap()).unwrap();
}

#[test]
fn split3_tensor_round_trips_in_a_version_3_file() {
    let dir = tempfile::tempdir().unwrap();
    let q = quantize(&weights(40, 256, 1), 40, 256, QuantConfig::default()).unwrap();
    let low3 = EncodeOptions { segment: 128, split: Some(SplitForm::Low3), ..EncodeOptions::default() };
    let a = EcTensor::encode(&q, low3).unwrap();
    assert_eq!((a.split(), a.layout().bits(), a.bits()), (Some(SplitForm::Low3), 1, 4));
    let [low2, _] = split_and_plain();
    let path = dir.path().join("m.safetensors");
    let file = write_encoded(&path, &[("blk.up.weight", &a), ("blk.gate.weight", &low2)]);
    assert_eq!(file.format_version(), Some(3));
    let info = file.encoded_info("blk.up.weight").unwrap();
    assert_eq!((info.bits(), info.low_bits, info.layout.bits()), (4, 3, 1));
    let low = &file.safetensors().tensors()[&ArrayNames::new("blk.up.weight").low];
    assert_eq!(low.shape, vec![SplitForm::Low3.low_words(40, 256)]);
    assert_eq!(low.shape, vec![64 * 8 * 3]);
    assert_eq!(file.tensor("blk.up.weight").unwrap(), a);
    assert_eq!(file.tensor("blk.up.weight").unwrap().to_quantized().unwrap(), q);
    assert_eq!(file.tensor("blk.gate.weight").unwrap(), low2);
}

#[test]
fn files_without_split_tensors_stay_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let [_, b] = split_and_plain();
    let file = write_encoded(&dir.path().join("m.safetensors"), &[("blk.down.weight", &b)]);
    assert_eq!(file.format_version(), Some(1));
    let entry = &file.safetensors().metadata()["blk.down.weight.ecq"];
    assert!(!entry.contains("low"), "{entry}");
}

#[test]
fn writer_refuses_a_name_taken_by_split_words() {
    let dir = tempfile::tempdir().unwrap();
    let [a, _] = split_and_plain();
    let mut w = ContainerWriter::create(dir.path().join("m.safetensors")).unwrap();
    w.add_encoded("blk.up.weight", &a).unwrap();
    let err = w.add_raw(&ArrayNames::new("blk.up.weight").low, Dtype::U32, &[1], &[0; 4]).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}
