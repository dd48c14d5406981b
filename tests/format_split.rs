//! Split tensors in the container (format version 2): the round trip, the version written, and what a reader
//! refuses.

use std::collections::BTreeMap;
use std::path::Path;

use ecq::format::{ArrayNames, ContainerWriter, EcFile, EcTensor, EncodeOptions, VERSION_KEY};
use ecq::quant::{quantize, QuantConfig};
use ecq::rans::low_words;
use ecq::Error;
use serde_json::{json, Value};

const SPLIT: &str = "blk.up.weight";
const PLAIN: &str = "blk.down.weight";

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

/// 40 x 256 4-bit, split (the second row tile has 8 rows), and 24 x 128 4-bit, not split.
fn tensors() -> [EcTensor; 2] {
    let a = quantize(&weights(40 * 256, 1), 40, 256, QuantConfig::default()).unwrap();
    let b = quantize(&weights(24 * 128, 2), 24, 128, QuantConfig::default()).unwrap();
    [
        EcTensor::encode(&a, EncodeOptions { segment: 128, split: true, ..EncodeOptions::default() }).unwrap(),
        EcTensor::encode(&b, EncodeOptions::default()).unwrap(),
    ]
}

fn write(path: &Path, tensors: &[(&str, &EcTensor)]) {
    let mut w = ContainerWriter::create(path).unwrap();
    for (name, t) in tensors {
        w.add_encoded(name, t).unwrap();
    }
    w.finish().unwrap();
}

fn fixture_bytes(dir: &Path) -> Vec<u8> {
    let [a, b] = tensors();
    let path = dir.join("fixture.safetensors");
    write(&path, &[(SPLIT, &a), (PLAIN, &b)]);
    std::fs::read(path).unwrap()
}

/// Header and tensors of a file, to write back changed.
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
}

/// Opens `bytes` and reads and decodes every encoded tensor; the first error.
fn read_all(dir: &Path, bytes: &[u8]) -> Result<(), Error> {
    let path = dir.join("t.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let f = EcFile::open(&path)?;
    let names: Vec<String> = f.encoded_names().map(String::from).collect();
    for n in &names {
        f.tensor(n)?.decode_symbols()?;
    }
    Ok(())
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
fn split_tensor_round_trips_in_a_version_2_file() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = tensors();
    let path = dir.path().join("m.safetensors");
    write(&path, &[(SPLIT, &a), (PLAIN, &b)]);
    let file = EcFile::open(&path).unwrap();
    assert_eq!(file.format_version(), Some(2));
    assert_eq!(file.safetensors().metadata().get(VERSION_KEY).map(String::as_str), Some("2"));
    let info = file.encoded_info(SPLIT).unwrap();
    assert_eq!((info.bits, info.low_bits, info.layout.bits()), (4, 2, 2));
    let low = &file.safetensors().tensors()[&ArrayNames::new(SPLIT).low];
    assert_eq!(low.shape, vec![low_words(40, 256)]);
    assert_eq!(file.tensor(SPLIT).unwrap(), a);
    assert_eq!(file.tensor(PLAIN).unwrap(), b);
    assert_eq!(file.tensor(SPLIT).unwrap().to_quantized().unwrap(), a.to_quantized().unwrap());
    assert_eq!(file.encoded_info(PLAIN).unwrap().low_bits, 0);
    // The reference implementation reads it as plain safetensors.
    safetensors::SafeTensors::deserialize(&std::fs::read(&path).unwrap()).unwrap();
}

#[test]
fn files_without_split_tensors_stay_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let [_, b] = tensors();
    let path = dir.path().join("m.safetensors");
    write(&path, &[(PLAIN, &b)]);
    let file = EcFile::open(&path).unwrap();
    assert_eq!(file.format_version(), Some(1));
    let entry = &file.safetensors().metadata()[&format!("{PLAIN}.ecq")];
    assert!(!entry.contains("low"), "{entry}");
}

#[test]
fn split_fields_in_a_version_1_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Parts::parse(&fixture_bytes(dir.path()));
    p.metadata.insert(VERSION_KEY.into(), "1".into());
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "needs format version 2", "version 1 with low_bits");
}

#[test]
fn bad_split_parameters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixture_bytes(dir.path());
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 4] = [
        ("low_bits 1", |e| e["low_bits"] = json!(1), "only 2 with 4 bits"),
        ("low_bits with 8 bits", |e| e["bits"] = json!(8), "only 2 with 4 bits"),
        ("no checksum of low", |e| drop(e["crc32"].as_object_mut().unwrap().remove("low")), "checksum of `low`"),
        ("segment of 8", |e| e["segment"] = json!(8), "multiples of 16"),
    ];
    for (case, edit, needle) in cases {
        let mut p = Parts::parse(&bytes);
        let mut e = p.entry(SPLIT);
        edit(&mut e);
        p.set_entry(SPLIT, &e);
        expect_invalid(read_all(dir.path(), &p.to_bytes()), needle, case);
    }
    // A checksum of `low` on a tensor that is not split.
    let mut p = Parts::parse(&bytes);
    let mut e = p.entry(PLAIN);
    e["crc32"]["low"] = json!(0);
    p.set_entry(PLAIN, &e);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "checksum of `low`", "low checksum without low_bits");
}

#[test]
fn missing_or_damaged_low_words_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixture_bytes(dir.path());
    let low = ArrayNames::new(SPLIT).low;

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

    // A nonzero word of a row past the last (row 40 of the second row tile), with a matching checksum.
    let mut p = Parts::parse(&bytes);
    let words = &mut p.tensors.get_mut(&low).unwrap().2;
    let i = ecq::rans::low_index(40, 3, 256);
    words[4 * i] = 1;
    let crc = crc32fast::hash(words);
    let mut e = p.entry(SPLIT);
    e["crc32"]["low"] = json!(crc);
    p.set_entry(SPLIT, &e);
    expect_invalid(read_all(dir.path(), &p.to_bytes()), "past the last", "nonzero padding row");
}

#[test]
fn writer_refuses_a_name_taken_by_split_words() {
    let dir = tempfile::tempdir().unwrap();
    let [a, _] = tensors();
    let mut w = ContainerWriter::create(dir.path().join("m.safetensors")).unwrap();
    w.add_encoded(SPLIT, &a).unwrap();
    let err = w.add_raw(&ArrayNames::new(SPLIT).low, ecq::format::Dtype::U32, &[1], &[0; 4]).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}
