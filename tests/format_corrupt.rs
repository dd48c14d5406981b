//! Corrupt and hostile containers: every one gives a typed error from a plain call, never a panic (a panic
//! fails the test).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ecq::format::{ArrayNames, ContainerWriter, Dtype, EcFile, EcTensor, EncodeOptions, SplitForm};
use ecq::quant::{quantize, QuantConfig, ScaleDtype};
use ecq::Error;
use serde_json::{json, Value};

const ENCODED: [&str; 2] = ["blk.up.weight", "head"];
const RAW: &str = "norm.weight";

fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            u * u * u
        })
        .collect()
}

fn fixture_tensors() -> Vec<EcTensor> {
    let a = quantize(&weights(40 * 256, 1), 40, 256, QuantConfig::default()).unwrap();
    let b =
        quantize(&weights(9 * 64, 2), 9, 64, QuantConfig { bits: 2, group_size: 32, scale_dtype: ScaleDtype::Bf16 })
            .unwrap();
    vec![
        EcTensor::encode(&a, EncodeOptions { segment: 128, precision: 12, split: None, min_tiles: 0 }).unwrap(),
        EcTensor::encode(&b, EncodeOptions { segment: 64, precision: 10, split: None, min_tiles: 0 }).unwrap(),
    ]
}

/// A small valid container: two encoded tensors and one passthrough tensor.
fn fixture_bytes() -> Vec<u8> {
    container_bytes(fixture_tensors())
}

/// The same file with the first tensor (40 x 256 4-bit) split: a version-2 file.
fn split_fixture_bytes() -> Vec<u8> {
    split_fixture_bytes_as(SplitForm::Low2)
}

/// The same file with the first tensor split in `form`: a version-2 file for `Low2`, version 3 for `Low3`.
fn split_fixture_bytes_as(form: SplitForm) -> Vec<u8> {
    let a = quantize(&weights(40 * 256, 1), 40, 256, QuantConfig::default()).unwrap();
    let split =
        EcTensor::encode(&a, EncodeOptions { segment: 128, precision: 12, split: Some(form), min_tiles: 0 }).unwrap();
    let [_, b] = <[EcTensor; 2]>::try_from(fixture_tensors()).unwrap();
    container_bytes(vec![split, b])
}

fn container_bytes(tensors: Vec<EcTensor>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.safetensors");
    let mut w = ContainerWriter::create(&path).unwrap();
    for (name, t) in ENCODED.iter().zip(tensors) {
        w.add_encoded(name, &t).unwrap();
    }
    let norm: Vec<u8> = (0..40).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    w.add_raw(RAW, Dtype::F32, &[40], &norm).unwrap();
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

/// Opens `bytes` as a file and reads everything in it: every encoded tensor (checksums, invariants) and its
/// decode (end states), every passthrough tensor (checksum). The first error is returned.
fn read_all(dir: &Path, bytes: &[u8]) -> Result<(), Error> {
    let path = dir.join("t.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let f = EcFile::open(&path)?;
    let names: Vec<String> = f.encoded_names().map(String::from).collect();
    for n in &names {
        f.tensor(n)?.decode_symbols()?;
    }
    let raws: Vec<String> = f.raw_names().map(String::from).collect();
    for n in &raws {
        f.raw(n)?;
    }
    if names.len() != ENCODED.len() || raws.len() != 1 {
        return Err(Error::TensorNotFound(format!("file reads as {names:?} + {raws:?}")));
    }
    Ok(())
}

/// The file split into header and tensors, for building well-formed but lying files.
struct Parts {
    metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, (String, Vec<u64>, Vec<u8>)>,
}

impl Parts {
    fn parse(bytes: &[u8]) -> Self {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let metadata = serde_json::from_value(header.remove("__metadata__").unwrap()).unwrap();
        let data = &bytes[8 + n..];
        let tensors = header
            .into_iter()
            .map(|(name, v)| {
                let (b, e) = (v["data_offsets"][0].as_u64().unwrap() as usize, v["data_offsets"][1].as_u64().unwrap());
                let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
                (name, (v["dtype"].as_str().unwrap().to_string(), shape, data[b..e as usize].to_vec()))
            })
            .collect();
        Self { metadata, tensors }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!(self.metadata));
        let mut data = Vec::new();
        for (name, (dtype, shape, bytes)) in &self.tensors {
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(bytes);
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        out
    }

    fn entry(&self, name: &str) -> Value {
        serde_json::from_str(&self.metadata[&format!("{name}.ecq")]).unwrap()
    }

    fn set_entry(&mut self, name: &str, v: &Value) {
        self.metadata.insert(format!("{name}.ecq"), v.to_string());
    }

    /// Replaces an array's bytes and stores their correct checksum, so only the deeper checks can object.
    fn replace_array(&mut self, name: &str, field: &str, bytes: Vec<u8>) {
        let arrays = ArrayNames::new(name);
        let array = match field {
            "words" => arrays.words,
            "tile_offsets" => arrays.tile_offsets,
            "states" => arrays.states,
            "freqs" => arrays.freqs,
            "scales" => arrays.scales,
            "biases" => arrays.biases,
            "low" => arrays.low,
            _ => unreachable!("no array {field}"),
        };
        let mut e = self.entry(name);
        e["crc32"][field] = json!(crc32fast::hash(&bytes));
        self.set_entry(name, &e);
        self.tensors.get_mut(&array).unwrap().2 = bytes;
    }

    fn array(&self, name: &str) -> &[u8] {
        &self.tensors[name].2
    }
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn expect_invalid(r: Result<(), Error>, needle: &str, case: &str) {
    match r {
        Err(Error::InvalidFile { reason }) => {
            assert!(reason.contains(needle), "{case}: error `{reason}` does not mention `{needle}`")
        }
        other => panic!("{case}: expected InvalidFile mentioning `{needle}`, got {other:?}"),
    }
}

#[test]
fn fixture_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    read_all(dir.path(), &fixture_bytes()).unwrap();
    // Rebuilding through Parts without changes must also stay valid, or the lying-file tests prove nothing.
    read_all(dir.path(), &Parts::parse(&fixture_bytes()).to_bytes()).unwrap();
}

#[test]
fn truncated_at_every_length_is_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixture_bytes();
    for len in 0..bytes.len() {
        match read_all(dir.path(), &bytes[..len]) {
            Err(Error::InvalidFile { .. }) => {}
            other => panic!("truncated to {len} of {} bytes: expected InvalidFile, got {other:?}", bytes.len()),
        }
    }
}

#[test]
fn trailing_bytes_are_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = fixture_bytes();
    bytes.push(0);
    expect_invalid(read_all(dir.path(), &bytes), "trailing", "one extra byte");
}

#[test]
fn flipped_byte_in_every_array_is_a_checksum_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixture_bytes();
    let parts = Parts::parse(&bytes);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut arrays: Vec<(String, String)> = ENCODED
        .iter()
        .flat_map(|name| {
            let a = ArrayNames::new(name);
            [a.words, a.tile_offsets, a.states, a.freqs, a.scales, a.biases].map(|x| (name.to_string(), x))
        })
        .collect();
    arrays.push((RAW.to_string(), RAW.to_string()));
    for (tensor, array) in arrays {
        let len = parts.array(&array).len();
        assert!(len > 0, "{array} is empty in the fixture");
        let begin = 8 + n + header[&array]["data_offsets"][0].as_u64().unwrap() as usize;
        for at in [0, len / 2, len - 1] {
            for mask in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[begin + at] ^= mask;
                match read_all(dir.path(), &bad) {
                    Err(Error::ChecksumMismatch { tensor: t, array: a, .. }) => {
                        assert_eq!((t.as_str(), a.as_str()), (tensor.as_str(), array.as_str()))
                    }
                    other => panic!("{array} byte {at} ^ {mask:#x}: expected ChecksumMismatch, got {other:?}"),
                }
            }
        }
    }
}

#[test]
fn flipped_byte_anywhere_in_the_header_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixture_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for at in 0..8 + n {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80] {
            let mut bad = bytes.clone();
            bad[at] ^= mask;
            match read_all(dir.path(), &bad) {
                Err(Error::InvalidFile { .. } | Error::ChecksumMismatch { .. } | Error::UnsupportedVersion { .. }) => {}
                other => panic!(
                    "header byte {at} ({:?}) ^ {mask:#x}: expected a file error, got {other:?}",
                    bytes[at] as char
                ),
            }
        }
    }
}

#[test]
fn tile_offsets_out_of_order_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&fixture_bytes());
    let a = ArrayNames::new(ENCODED[0]);
    let mut off = u32s(p.array(&a.tile_offsets));
    assert!(off.len() >= 4 && off[1] < off[2], "fixture needs distinct offsets");
    off.swap(1, 2);
    p.replace_array(ENCODED[0], "tile_offsets", u32_bytes(&off));
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "decrease", "swapped offsets");

    let mut p = Parts::parse(&fixture_bytes());
    let mut off = u32s(p.array(&a.tile_offsets));
    *off.last_mut().unwrap() += 1;
    p.replace_array(ENCODED[0], "tile_offsets", u32_bytes(&off));
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "last tile offset", "offset past the words");
}

#[test]
fn states_below_the_interval_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&fixture_bytes());
    let a = ArrayNames::new(ENCODED[0]);
    let mut states = u32s(p.array(&a.states));
    states[3] = 5;
    p.replace_array(ENCODED[0], "states", u32_bytes(&states));
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "< 2^16", "small state");
}

#[test]
fn frequency_table_not_summing_to_2p_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&fixture_bytes());
    let a = ArrayNames::new(ENCODED[1]);
    let mut freqs = p.array(&a.freqs).to_vec();
    let i = freqs.chunks_exact(2).position(|c| c != [0, 0]).unwrap();
    freqs[2 * i] ^= 1;
    p.replace_array(ENCODED[1], "freqs", freqs);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "sum to", "freq table");
}

#[test]
fn non_finite_scales_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&fixture_bytes());
    let a = ArrayNames::new(ENCODED[0]);
    let mut scales = p.array(&a.scales).to_vec();
    scales[..2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    p.replace_array(ENCODED[0], "scales", scales);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "not finite", "infinite scale");
}

#[test]
fn a_changed_word_with_a_matching_checksum_fails_the_end_state_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&fixture_bytes());
    let a = ArrayNames::new(ENCODED[0]);
    let mut words = p.array(&a.words).to_vec();
    words[0] ^= 0x5a;
    p.replace_array(ENCODED[0], "words", words);
    match read_all(dir.path(), &p.to_bytes()) {
        Err(Error::CorruptStream { .. }) => {}
        other => panic!("expected CorruptStream from the decoder, got {other:?}"),
    }
}

#[test]
fn unknown_or_missing_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for v in ["0", "4", "1.0", "", "v1"] {
        let mut p = Parts::parse(&fixture_bytes());
        p.metadata.insert("ecq.format_version".into(), v.into());
        match read_all(dir.path(), &p.to_bytes()) {
            Err(Error::UnsupportedVersion { found, supported: 3 }) => assert_eq!(found, v),
            other => panic!("version {v:?}: expected UnsupportedVersion, got {other:?}"),
        }
    }
    let mut p = Parts::parse(&fixture_bytes());
    p.metadata.remove("ecq.format_version");
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "ecq.format_version", "missing version");
}

#[test]
fn missing_arrays_and_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ENCODED {
        let a = ArrayNames::new(name);
        for array in [a.words, a.tile_offsets, a.states, a.freqs, a.scales, a.biases] {
            let mut p = Parts::parse(&fixture_bytes());
            p.tensors.remove(&array);
            expect_invalid(read_all(dir.path(), &p.to_bytes()), "missing", &format!("without {array}"));
        }
        let mut p = Parts::parse(&fixture_bytes());
        p.metadata.remove(&format!("{name}.ecq"));
        expect_invalid(read_all(dir.path(), &p.to_bytes()), "metadata entry", &format!("without {name}.ecq"));
    }
    let mut p = Parts::parse(&fixture_bytes());
    p.metadata.remove("ecq.raw_crc32");
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "no checksum", "without raw checksums");
}

#[test]
fn incomplete_or_extra_entry_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for field in ["shape", "bits", "group_size", "precision", "segment", "crc32"] {
        let mut p = Parts::parse(&fixture_bytes());
        let mut e = p.entry(ENCODED[0]);
        e.as_object_mut().unwrap().remove(field);
        p.set_entry(ENCODED[0], &e);
        expect_invalid(read_all(dir.path(), &p.to_bytes()), "malformed entry", &format!("without {field}"));
    }
    let mut p = Parts::parse(&fixture_bytes());
    let mut e = p.entry(ENCODED[0]);
    e["crc32"].as_object_mut().unwrap().remove("biases");
    p.set_entry(ENCODED[0], &e);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "malformed entry", "without crc32.biases");
    let mut p = Parts::parse(&fixture_bytes());
    let mut e = p.entry(ENCODED[0]);
    e["order"] = json!(1);
    p.set_entry(ENCODED[0], &e);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "malformed entry", "unknown field");
}

#[test]
fn lying_shapes_and_parameters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let name = ENCODED[0];
    let cases: Vec<(&str, Value, &str)> = vec![
        ("rows + 1", json!([41, 256]), "shape"),
        ("cols + 64", json!([40, 320]), "shape"),
        ("1-D shape", json!([10240]), "not [rows, cols]"),
        ("huge rows", json!([1u64 << 40, 256]), "cannot fit"),
        ("huge cols", json!([40, 1u64 << 50]), "cannot fit"),
        ("overflowing", json!([u64::MAX, u64::MAX]), ""),
    ];
    for (case, shape, needle) in cases {
        let mut p = Parts::parse(&fixture_bytes());
        let mut e = p.entry(name);
        e["shape"] = shape;
        p.set_entry(name, &e);
        expect_invalid(read_all(dir.path(), &p.to_bytes()), needle, case);
    }
    let params: Vec<(&str, &str, Value, &str)> = vec![
        ("bits 5", "bits", json!(5), "shape"),
        ("bits 0", "bits", json!(0), "bits"),
        ("bits 9", "bits", json!(9), "bits"),
        ("precision 13", "precision", json!(13), "precision"),
        ("precision 11", "precision", json!(11), "sum to"),
        ("group 48", "group_size", json!(48), "group_size"),
        ("group 0", "group_size", json!(0), "group_size"),
        ("segment 64", "segment", json!(64), "shape"),
        ("segment 0", "segment", json!(0), "segment"),
        ("segment 2^17", "segment", json!(1u64 << 17), "segment"),
        ("negative", "segment", json!(-64), "malformed"),
        ("string", "bits", json!("4"), "malformed"),
    ];
    for (case, field, v, needle) in params {
        let mut p = Parts::parse(&fixture_bytes());
        let mut e = p.entry(name);
        e[field] = v;
        p.set_entry(name, &e);
        expect_invalid(read_all(dir.path(), &p.to_bytes()), needle, case);
    }
    // A segment that keeps the tile count (2 segments of 192 instead of 128 over 256 columns) passes every
    // header check; the decoder then runs out of words or ends off 2^16.
    let mut p = Parts::parse(&fixture_bytes());
    let mut e = p.entry(name);
    e["segment"] = json!(192);
    p.set_entry(name, &e);
    match read_all(dir.path(), &p.to_bytes()) {
        Err(Error::CorruptStream { .. }) => {}
        other => panic!("segment 192: expected CorruptStream, got {other:?}"),
    }
    // Arrays whose own shape or dtype lies, with the byte count kept consistent.
    let a = ArrayNames::new(name);
    let arrays: Vec<(&str, String, &str, Vec<u64>)> = vec![
        ("states flat", a.states.clone(), "U32", vec![]),
        ("words as U32", a.words.clone(), "U32", vec![]),
        ("freqs as I16", a.freqs.clone(), "I16", vec![256]),
        ("scales as I16", a.scales.clone(), "I16", vec![40, 4]),
        ("scales transposed", a.scales.clone(), "F16", vec![4, 40]),
        ("biases as BF16", a.biases.clone(), "BF16", vec![40, 4]),
    ];
    for (case, array, dtype, shape) in arrays {
        let needle = if case == "biases as BF16" { "share one dtype" } else { "array" };
        let mut p = Parts::parse(&fixture_bytes());
        let t = p.tensors.get_mut(&array).unwrap();
        let elems = t.2.len() as u64 / if dtype == "U32" { 4 } else { 2 };
        t.0 = dtype.into();
        t.1 = if shape.is_empty() { vec![elems] } else { shape };
        if case == "words as U32" && t.2.len() % 4 != 0 {
            t.2.truncate(t.2.len() / 4 * 4);
            t.1 = vec![t.2.len() as u64 / 4];
        }
        expect_invalid(read_all(dir.path(), &p.to_bytes()), needle, case);
    }
}

/// Builds a file from a literal header and data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn hostile_safetensors_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "too short"),
        ("header length u64::MAX", [u64::MAX.to_le_bytes().to_vec(), vec![b'{'; 16]].concat(), "exceeds"),
        ("header length past the end", [1000u64.to_le_bytes().to_vec(), b"{}".to_vec()].concat(), "past the end"),
        ("not json", raw_file("{not json}", &[]), "JSON"),
        (
            "not utf-8",
            raw_file("{\"\u{ff}\":1}", &[]).into_iter().map(|b| if b == 0xc3 { 0xff } else { b }).collect(),
            "UTF-8",
        ),
        ("json array", raw_file("[1,2]", &[]), "JSON"),
        ("shape lies", raw_file(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]), "shape"),
        (
            "shape overflows",
            raw_file(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#, &[0; 8]),
            "shape",
        ),
        ("end before begin", raw_file(r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#, &[0; 8]), "range"),
        ("end past data", raw_file(r#"{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}"#, &[0; 8]), "range"),
        (
            "huge offset",
            raw_file(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
                &[0; 8],
            ),
            "range",
        ),
        (
            "overlap",
            raw_file(
                r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            "overlaps",
        ),
        ("gap", raw_file(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#, &[0; 8]), "gap"),
        ("unknown dtype", raw_file(r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]), "dtype"),
        ("metadata not strings", raw_file(r#"{"__metadata__":{"k":1}}"#, &[]), "__metadata__"),
        (
            "extra field",
            raw_file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}"#, &[0; 8]),
            "malformed",
        ),
        (
            "orphan array",
            raw_file(r#"{"w.ecq.words":{"dtype":"U16","shape":[4],"data_offsets":[0,8]}}"#, &[0; 8]),
            "w.ecq",
        ),
        ("reserved key without version", raw_file(r#"{"__metadata__":{"w.ecq":"{}"}}"#, &[]), "ecq.format_version"),
        (
            "unknown reserved key",
            raw_file(r#"{"__metadata__":{"ecq.format_version":"1","ecq.other":"x"}}"#, &[]),
            "ecq.other",
        ),
        (
            "raw crc names a ghost",
            raw_file(r#"{"__metadata__":{"ecq.format_version":"1","ecq.raw_crc32":"{\"g\":1}"}}"#, &[]),
            "`g`",
        ),
    ];
    for (case, bytes, needle) in cases {
        expect_invalid(read_all(dir.path(), &bytes), needle, case);
    }
    // The valid one, as a control: it opens, and is a plain safetensors file with one raw tensor.
    let path = dir.path().join("ok.safetensors");
    std::fs::write(&path, raw_file(ok, &[0; 8])).unwrap();
    let f = EcFile::open(&path).unwrap();
    assert_eq!(f.raw_names().collect::<Vec<_>>(), ["a"]);
}

#[test]
fn a_missing_file_is_an_io_error_with_its_path() {
    let p = PathBuf::from("/nonexistent/dir/x.safetensors");
    match EcFile::open(&p) {
        Err(Error::Io { path, .. }) => assert_eq!(path, p),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn split_fixture_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = split_fixture_bytes();
    read_all(dir.path(), &bytes).unwrap();
    let p = Parts::parse(&bytes);
    assert_eq!(p.metadata["ecq.format_version"], "2");
    assert_eq!(p.entry(ENCODED[0])["low_bits"], json!(2));
}

#[test]
fn split3_fixture_is_valid_in_version_3_only() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = split_fixture_bytes_as(SplitForm::Low3);
    read_all(dir.path(), &bytes).unwrap();
    let p = Parts::parse(&bytes);
    assert_eq!(p.metadata["ecq.format_version"], "3");
    assert_eq!(p.entry(ENCODED[0])["low_bits"], json!(3));
    let mut p = Parts::parse(&bytes);
    p.metadata.insert("ecq.format_version".into(), "2".into());
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "needs format version 3", "version 2 with low_bits 3");
    // Version 3 on a file whose tensors need less (also what one flipped bit makes of "1").
    for fixture in [fixture_bytes(), split_fixture_bytes()] {
        let mut p = Parts::parse(&fixture);
        p.metadata.insert("ecq.format_version".into(), "3".into());
        expect_invalid(read_all(dir.path(), &p.to_bytes()), "version-3 file must hold", "version 3 without low_bits 3");
    }
    // A segment that holds whole blocks of 16 columns but not of 32.
    let mut p = Parts::parse(&bytes);
    let mut e = p.entry(ENCODED[0]);
    e["segment"] = json!(48);
    p.set_entry(ENCODED[0], &e);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "48 is not a multiple of 32", "segment of 48");
}

#[test]
fn split_fields_in_a_version_1_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&split_fixture_bytes());
    p.metadata.insert("ecq.format_version".into(), "1".into());
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "needs format version 2", "version 1 with low_bits");
}

#[test]
fn bad_split_parameters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = split_fixture_bytes();
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 4] = [
        ("low_bits 1", |e| e["low_bits"] = json!(1), "only 2 or 3 with 4 bits"),
        ("low_bits with 8 bits", |e| e["bits"] = json!(8), "only 2 or 3 with 4 bits"),
        ("no checksum of low", |e| drop(e["crc32"].as_object_mut().unwrap().remove("low")), "checksum of `low`"),
        ("segment of 8", |e| e["segment"] = json!(8), "8 is not a multiple of 16"),
    ];
    for (case, edit, needle) in cases {
        let mut p = Parts::parse(&bytes);
        let mut e = p.entry(ENCODED[0]);
        edit(&mut e);
        p.set_entry(ENCODED[0], &e);
        expect_invalid(read_all(dir.path(), &p.to_bytes()), needle, case);
    }
    // A checksum of `low` on a tensor that is not split.
    let mut p = Parts::parse(&bytes);
    let mut e = p.entry(ENCODED[1]);
    e["crc32"]["low"] = json!(0);
    p.set_entry(ENCODED[1], &e);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "checksum of `low`", "low checksum without low_bits");
}

#[test]
fn missing_or_damaged_low_words_are_refused() {
    for form in [SplitForm::Low2, SplitForm::Low3] {
        missing_or_damaged_low_words_are_refused_in(form);
    }
}

fn missing_or_damaged_low_words_are_refused_in(form: SplitForm) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = split_fixture_bytes_as(form);
    let low = ArrayNames::new(ENCODED[0]).low;

    let mut p = Parts::parse(&bytes);
    p.tensors.remove(&low);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "missing", "without the low words");

    let mut p = Parts::parse(&bytes);
    let t = p.tensors.get_mut(&low).unwrap();
    t.1 = vec![t.1[0] - 1];
    t.2.truncate(t.2.len() - 4);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "shape", "one low word short");

    let mut p = Parts::parse(&bytes);
    p.tensors.get_mut(&low).unwrap().2[5] ^= 0x10;
    match read_all(dir.path(), &p.to_bytes()) {
        Err(Error::ChecksumMismatch { array, .. }) => assert_eq!(array, low),
        other => panic!("flipped low byte: expected ChecksumMismatch, got {other:?}"),
    }

    // A nonzero word of a row past the last (row 40 of the second row tile; the last word of a block), with a
    // matching checksum.
    let mut p = Parts::parse(&bytes);
    let mut words = p.array(&low).to_vec();
    words[4 * form.low_index(40, 3, form.block_words() - 1, 256)] = 1;
    p.replace_array(ENCODED[0], "low", words);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "past the last", "nonzero padding row");
}

#[test]
fn the_low_suffix_is_reserved_in_version_2_only() {
    let dir = tempfile::tempdir().unwrap();
    let add_raw = |bytes: &[u8]| {
        let mut p = Parts::parse(bytes);
        let data = vec![1u8, 2, 3, 4];
        let mut crc: BTreeMap<String, u32> = serde_json::from_str(&p.metadata["ecq.raw_crc32"]).unwrap();
        crc.insert("extra.ecq.low".into(), crc32fast::hash(&data));
        p.metadata.insert("ecq.raw_crc32".into(), serde_json::to_string(&crc).unwrap());
        p.tensors.insert("extra.ecq.low".into(), ("U8".into(), vec![4], data));
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, p.to_bytes()).unwrap();
        EcFile::open(&path).map(|f| f.raw_names().map(String::from).collect::<Vec<_>>())
    };
    // Version 1: an ordinary passthrough name.
    assert!(add_raw(&fixture_bytes()).unwrap().contains(&"extra.ecq.low".to_string()));
    // Version 2: a split tensor's array without its entry.
    match add_raw(&split_fixture_bytes()) {
        Err(Error::InvalidFile { reason }) => assert!(reason.contains("extra.ecq"), "{reason}"),
        other => panic!("expected InvalidFile, got {other:?}"),
    }
}
