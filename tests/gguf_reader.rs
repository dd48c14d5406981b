//! GGUF reader on small synthetic files written by the test itself: every metadata type, versions 2 and 3,
//! custom alignment, and lossless Q4_0/Q4_1/Q8_0 import checked against an independent dequantization.

#[path = "gguf_support/mod.rs"]
mod support;

use ecq::format::gguf::{GgmlType, GgufFile, GgufTensor, GgufValue, GgufValueType};
use ecq::format::Dtype;
use ecq::format::{EcTensor, EncodeOptions};
use ecq::Error;
use support::*;

fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    f
}

/// A file with every metadata value type (nested arrays included) and one tensor of each supported type,
/// with shapes that do not divide evenly into 32-row tiles.
fn sample(version: u32, alignment: Option<u32>) -> (GgufWriter, Vec<(String, u32, usize, usize)>) {
    let mut rng = Rng(version as u64 * 1000 + alignment.unwrap_or(0) as u64);
    let mut w = GgufWriter::new(version);
    if let Some(a) = alignment {
        w.alignment(a);
    }
    w.kv_str("general.architecture", "llama");
    w.kv_raw("k.u8", 0, &[200]);
    w.kv_raw("k.i8", 1, &[0xfe]);
    w.kv_raw("k.u16", 2, &54321u16.to_le_bytes());
    w.kv_raw("k.i16", 3, &(-1234i16).to_le_bytes());
    w.kv_u32("k.u32", 4_000_000_000);
    w.kv_raw("k.i32", 5, &(-7i32).to_le_bytes());
    w.kv_raw("k.f32", 6, &1.5f32.to_le_bytes());
    w.kv_raw("k.bool", 7, &[1]);
    w.kv_raw("k.u64", 10, &u64::MAX.to_le_bytes());
    w.kv_raw("k.i64", 11, &i64::MIN.to_le_bytes());
    w.kv_raw("k.f64", 12, &0.25f64.to_le_bytes());
    // [u32; 3]
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&3u64.to_le_bytes());
    for v in [1u32, 2, 3] {
        arr.extend_from_slice(&v.to_le_bytes());
    }
    w.kv_raw("k.arr_u32", 9, &arr);
    // [string; 2], the second not UTF-8 on its own (a byte token)
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&2u64.to_le_bytes());
    put_string(&mut arr, b"hello");
    put_string(&mut arr, &[0xff]);
    w.kv_raw("k.arr_str", 9, &arr);
    // [[i16; 2], [string; 1]]: arrays of arrays with different element types
    let mut arr = 9u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&2u64.to_le_bytes());
    arr.extend_from_slice(&3u32.to_le_bytes());
    arr.extend_from_slice(&2u64.to_le_bytes());
    arr.extend_from_slice(&[1, 0, 2, 0]);
    arr.extend_from_slice(&8u32.to_le_bytes());
    arr.extend_from_slice(&1u64.to_le_bytes());
    put_string(&mut arr, b"x");
    w.kv_raw("k.arr_arr", 9, &arr);

    let quantized = [("q41", Q4_1, 67, 96), ("q40", Q4_0, 33, 64), ("q80", Q8_0, 5, 160), ("wide", Q4_1, 1, 1024)];
    let mut specs = Vec::new();
    for (name, ty, rows, cols) in quantized {
        w.tensor(name, &[cols as u64, rows as u64], ty, random_blocks(&mut rng, ty, rows, cols));
        specs.push((name.to_string(), ty, rows, cols));
    }
    w.tensor("norm", &[7], F32, (0..7).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect());
    w.tensor("h", &[3, 2], F16, (0..6).flat_map(|_| rng.f16_bytes()).collect());
    w.tensor("b", &[5], BF16, (0..5).flat_map(|_| rng.f16_bytes()).collect());
    w.tensor("k6", &[256, 2], Q6_K, vec![0; 2 * 210]);
    w.tensor("odd_type", &[4], 999, Vec::new());
    (w, specs)
}

fn check_sample(version: u32, alignment: Option<u32>) {
    let (w, specs) = sample(version, alignment);
    let file = write(&w.build());
    let g = GgufFile::open(file.path()).unwrap();
    assert_eq!(g.version(), version);
    assert_eq!(g.alignment(), alignment.unwrap_or(32) as u64);
    assert_eq!(g.data_offset() % g.alignment(), 0);
    assert_eq!(g.metadata_value("general.architecture").and_then(|v| v.as_str()), Some("llama"));
    assert_eq!(g.metadata_value("k.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.metadata_value("k.i8"), Some(&GgufValue::I8(-2)));
    assert_eq!(g.metadata_value("k.u16"), Some(&GgufValue::U16(54321)));
    assert_eq!(g.metadata_value("k.i16"), Some(&GgufValue::I16(-1234)));
    assert_eq!(g.metadata_value("k.u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(g.metadata_value("k.i32"), Some(&GgufValue::I32(-7)));
    assert_eq!(g.metadata_value("k.f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(g.metadata_value("k.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(g.metadata_value("k.u64").and_then(|v| v.as_u64()), Some(u64::MAX));
    assert_eq!(g.metadata_value("k.i64"), Some(&GgufValue::I64(i64::MIN)));
    assert_eq!(g.metadata_value("k.f64"), Some(&GgufValue::F64(0.25)));
    assert_eq!(g.metadata_value("k.arr_u32"), Some(&GgufValue::Array { elem: GgufValueType::U32, len: 3 }));
    assert_eq!(g.metadata_value("k.arr_str"), Some(&GgufValue::Array { elem: GgufValueType::String, len: 2 }));
    assert_eq!(g.metadata_value("k.arr_arr"), Some(&GgufValue::Array { elem: GgufValueType::Array, len: 2 }));
    assert_eq!(g.tensors().len(), specs.len() + 5);

    for (name, ty, rows, cols) in &specs {
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.dims, vec![*cols as u64, *rows as u64]);
        assert_eq!(info.shape(), vec![*rows, *cols]);
        assert_eq!(info.offset % g.alignment(), 0);
        let q = g.quantized(name).unwrap();
        assert_eq!((q.rows, q.cols, q.group_size), (*rows, *cols, 32));
        assert_eq!(q.bits, if *ty == Q8_0 { 8 } else { 4 });
        q.validate().unwrap();
        let raw = g.tensor_bytes(name).unwrap();
        let spec = w.tensors.iter().find(|t| t.name == *name).unwrap();
        assert_eq!(raw, &spec.data[..], "{name}: raw bytes");
        let want = reference_dequant(*ty, raw);
        assert_eq!(first_difference(&q.dequantize(), &want), None, "{name}");
        // Symbols, scales and biases survive the codec exactly.
        let t = EcTensor::encode(&q, EncodeOptions::default()).unwrap();
        assert_eq!(t.to_quantized().unwrap(), q, "{name}: codec round trip");
        match g.tensor(name).unwrap() {
            GgufTensor::Quantized { shape, matrix } => {
                assert_eq!(shape, vec![*rows, *cols]);
                assert_eq!(matrix, q);
            }
            other => panic!("{name}: expected a quantized tensor, got {other:?}"),
        }
    }
    for (name, dtype, shape) in
        [("norm", Dtype::F32, vec![7]), ("h", Dtype::F16, vec![2, 3]), ("b", Dtype::BF16, vec![5])]
    {
        let spec = w.tensors.iter().find(|t| t.name == name).unwrap();
        assert_eq!(g.tensor(name).unwrap(), GgufTensor::Raw { dtype, shape, data: &spec.data[..] }, "{name}");
    }
    // Listed, but not importable: the error names the tensor and the type.
    let k6 = g.tensor_info("k6").unwrap();
    assert_eq!((k6.ggml_type, k6.size), (GgmlType::Q6_K, Some(420)));
    match g.tensor("k6") {
        Err(Error::UnsupportedDtype { name, dtype, .. }) => {
            assert_eq!(name, "k6");
            assert!(dtype.contains("Q6_K"), "{dtype}");
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    assert!(matches!(g.quantized("k6"), Err(Error::UnsupportedDtype { .. })));
    assert!(matches!(g.quantized("norm"), Err(Error::UnsupportedDtype { .. })));
    let odd = g.tensor_info("odd_type").unwrap();
    assert_eq!((odd.ggml_type, odd.size), (GgmlType(999), None));
    match g.tensor("odd_type") {
        Err(Error::UnsupportedDtype { name, dtype, .. }) => {
            assert_eq!(name, "odd_type");
            assert!(dtype.contains("999"), "{dtype}");
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    assert!(matches!(g.tensor("missing"), Err(Error::TensorNotFound(n)) if n == "missing"));
}

#[test]
fn reads_version_3() {
    check_sample(3, None);
}

#[test]
fn reads_version_2() {
    check_sample(2, None);
}

#[test]
fn honours_general_alignment() {
    check_sample(3, Some(64));
    check_sample(3, Some(1));
}

#[test]
fn file_without_tensors() {
    let mut w = GgufWriter::new(3);
    w.kv_str("general.name", "empty");
    let g = GgufFile::open(write(&w.build()).path()).unwrap();
    assert!(g.tensors().is_empty());
    assert_eq!(g.metadata().len(), 1);
}

/// Q4_0's bias is `-8 d` and Q8_0's `-128 d`: exact in f16 for every finite `d` small enough not to overflow,
/// subnormals included.
#[test]
fn q4_0_and_q8_0_bias_exact_at_extreme_scales() {
    for (ty, d_bits) in [(Q4_0, 0x0001u16), (Q4_0, 0x8001), (Q4_0, 0x6fff), (Q8_0, 0x03ff), (Q8_0, 0x5fff)] {
        let mut block = d_bits.to_le_bytes().to_vec();
        block.extend((0..if ty == Q4_0 { 16 } else { 32 }).map(|i| (i * 37) as u8));
        let mut w = GgufWriter::new(3);
        w.tensor("t", &[32, 1], ty, block.clone());
        let g = GgufFile::open(write(&w.build()).path()).unwrap();
        let q = g.quantized("t").unwrap();
        assert_eq!(first_difference(&q.dequantize(), &reference_dequant(ty, &block)), None, "d bits {d_bits:#x}");
    }
}
