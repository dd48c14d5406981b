//! Checks on the MSL source text that the wgpu passthrough loader relies on, without any compiler: the
//! `EcParams` field order (the host writes twelve `u32` in that order), `[[buffer(n)]]` indices numbered in
//! binding order, and the library constants of `ecq::kernels_msl` holding the shared header plus one kernel.
//! The entry-point names are checked by tests/msl_emu.rs, which needs a C preprocessor to expand them.

use ecq::kernels_msl::{EC_GEMV, PARAMS_SIZE, RANS_DECODE};

/// The `EcParams` fields in host order.
const PARAMS_FIELDS: [&str; 12] = [
    "rows",
    "cols",
    "bits",
    "group_size",
    "segment",
    "segments",
    "row_tiles",
    "precision",
    "total_words",
    "vectors",
    "low_bits",
    "reserved1",
];

/// The field names of `struct EcParams { uint name; ... }` in source order.
fn params_fields(source: &str) -> Vec<String> {
    let start = source.find("struct EcParams {").expect("struct EcParams in the source");
    let body = &source[start..start + source[start..].find("};").expect("end of struct EcParams")];
    body.lines()
        .skip(1)
        .map(|line| line.split("//").next().unwrap().trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            let decl = line.strip_prefix("uint ").unwrap_or_else(|| panic!("EcParams field is not a uint: {line}"));
            decl.trim_end_matches(';').trim().to_string()
        })
        .collect()
}

/// `(parameter name, n)` for every `[[buffer(n)]]` parameter of the kernel template named `kernel`.
fn buffer_params(source: &str, kernel: &str) -> Vec<(String, u32)> {
    let start = source.find(&format!("void {kernel}(")).unwrap_or_else(|| panic!("kernel {kernel} in the source"));
    let signature = &source[start..start + source[start..].find(") {").unwrap()];
    signature
        .lines()
        .filter_map(|line| {
            let at = line.find("[[buffer(")?;
            let index = line[at + 9..line[at..].find(")]]").unwrap() + at].parse().unwrap();
            let name = line[..at].split_whitespace().last().unwrap().trim_start_matches(['*', '&']).to_string();
            Some((name, index))
        })
        .collect()
}

#[test]
fn params_block_matches_the_host_layout() {
    for source in [EC_GEMV, RANS_DECODE] {
        assert_eq!(params_fields(source), PARAMS_FIELDS);
    }
    assert_eq!(PARAMS_SIZE, PARAMS_FIELDS.len() * 4);
}

#[test]
fn ec_gemv_buffers_are_numbered_in_binding_order() {
    let names: Vec<String> = buffer_params(EC_GEMV, "ec_gemv")
        .into_iter()
        .enumerate()
        .map(|(i, (name, n))| {
            assert_eq!(n as usize, i, "buffer {name}");
            name
        })
        .collect();
    let want = [
        "words",
        "tile_offsets",
        "states",
        "decode_table",
        "scales",
        "biases",
        "low",
        "x",
        "y",
        "tile_status",
        "params",
    ];
    assert_eq!(names, want);
}

#[test]
fn rans_decode_buffers_are_numbered_in_binding_order() {
    let names: Vec<String> = buffer_params(RANS_DECODE, "rans_decode")
        .into_iter()
        .enumerate()
        .map(|(i, (name, n))| {
            assert_eq!(n as usize, i, "buffer {name}");
            name
        })
        .collect();
    assert_eq!(names, ["words", "tile_offsets", "states", "decode_table", "packed", "tile_status", "params"]);
}

#[test]
fn each_library_is_the_shared_header_then_one_kernel() {
    let header = include_str!("../msl/ec_rans.h");
    for (source, kernel) in
        [(EC_GEMV, include_str!("../msl/ec_gemv.metal")), (RANS_DECODE, include_str!("../msl/rans_decode.metal"))]
    {
        assert_eq!(source, format!("{header}{kernel}"));
        assert_eq!(source.matches("#include").count(), 1, "only <metal_stdlib> is included");
        assert!(source.contains("#include <metal_stdlib>"));
    }
}

/// `EcParams` packs as the MSL struct: the `u32` at byte `4 * i` is the value of the MSL struct's field `i`,
/// each value computed here from the tensor independently of `EcParams::new`.
#[test]
fn ec_params_bytes_follow_the_msl_field_order() {
    use ecq::format::{EcTensor, EncodeOptions};
    use ecq::kernels_msl::EcParams;
    use ecq::quant::{quantize, QuantConfig, ScaleDtype};

    let (rows, cols) = (45, 320);
    let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
    let q =
        quantize(&weights, rows, cols, QuantConfig { bits: 3, group_size: 64, scale_dtype: ScaleDtype::F32 }).unwrap();
    let t = EcTensor::encode(&q, EncodeOptions { segment: 128, precision: 11, split: None, min_tiles: 0 }).unwrap();
    let params = EcParams::new(&t, 5).unwrap();
    assert_eq!(std::mem::size_of::<EcParams>(), PARAMS_SIZE);
    let bytes = bytemuck::bytes_of(&params);
    let expected = |field: &str| -> u32 {
        match field {
            "rows" => rows as u32,
            "cols" => cols as u32,
            "bits" => 3,
            "group_size" => 64,
            "segment" => 128,
            "segments" => cols.div_ceil(128) as u32,
            "row_tiles" => rows.div_ceil(32) as u32,
            "precision" => 11,
            "total_words" => t.stream().words.len() as u32,
            "vectors" => 5,
            "low_bits" | "reserved1" => 0,
            other => panic!("unknown EcParams field {other}"),
        }
    };
    let fields = params_fields(EC_GEMV);
    assert_eq!(fields.len() * 4, bytes.len());
    for (i, field) in fields.iter().enumerate() {
        let got = u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(got, expected(field), "field {i} ({field})");
    }
}

/// The host's two bind groups for ec_gemv, flattened, are the kernel's buffers in `[[buffer(n)]]` order, each
/// declared with the access its MSL qualifier gives: `device const` read-only storage, `device` read-write
/// storage, `constant` uniform.
#[test]
fn ec_gemv_groups_flatten_to_the_buffer_order() {
    use ecq::kernels_msl::{BufferAccess, EC_GEMV_GROUPS};

    let host: Vec<(&str, BufferAccess)> = EC_GEMV_GROUPS.iter().flat_map(|g| g.iter().copied()).collect();
    let names: Vec<String> = buffer_params(EC_GEMV, "ec_gemv").into_iter().map(|(name, _)| name).collect();
    assert_eq!(host.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>(), names);
    let start = EC_GEMV.find("void ec_gemv(").unwrap();
    let signature = &EC_GEMV[start..start + EC_GEMV[start..].find(") {").unwrap()];
    for (name, access) in host {
        let line = signature
            .lines()
            .find(|l| l.contains("[[buffer(") && l.split_whitespace().any(|w| w.trim_start_matches(['*', '&']) == name))
            .unwrap_or_else(|| panic!("buffer {name} in the signature"));
        let qualifier = line.trim();
        let want = if qualifier.starts_with("device const ") {
            BufferAccess::Read
        } else if qualifier.starts_with("device ") {
            BufferAccess::ReadWrite
        } else if qualifier.starts_with("constant ") {
            BufferAccess::Uniform
        } else {
            panic!("unknown address space: {qualifier}")
        };
        assert_eq!(access, want, "{name}: {qualifier}");
    }
}

/// The entry point for a call of m vectors: the one-vector variant for 1, the 8-accumulator one for 2..=8; the
/// 2^11-entry table for precisions up to 11, the 2^12-entry one for 12.
#[test]
fn ec_gemv_entry_point_by_vector_count_and_precision() {
    use ecq::kernels_msl::ec_gemv_entry_point;
    assert_eq!(ec_gemv_entry_point(4, 1, 11, false), "ec_gemv_b4_v1_t11");
    for m in 2..=8 {
        assert_eq!(ec_gemv_entry_point(4, m, 11, false), "ec_gemv_b4_v8_t11");
    }
    assert_eq!(ec_gemv_entry_point(8, 3, 12, false), "ec_gemv_b8_v8_t12");
    for p in 1..=11 {
        assert_eq!(ec_gemv_entry_point(2, 1, p, false), "ec_gemv_b2_v1_t11", "P = {p}");
    }
    assert_eq!(ec_gemv_entry_point(2, 1, 12, false), "ec_gemv_b2_v1_t12");
    // Split streams (2 coded bits).
    assert_eq!(ec_gemv_entry_point(2, 1, 11, true), "ec_gemv_split_v1_t11");
    assert_eq!(ec_gemv_entry_point(2, 5, 12, true), "ec_gemv_split_v8_t12");
}

/// The host's threadgroup-memory figure (checked against the device limit before building a pipeline) counts
/// exactly the kernel's `threadgroup` arrays: a `uint` decode table of `1 << TABLE_BITS` entries (the
/// instantiation's 11 or 12) and a `float` partial sum per simdgroup (8), vector slot and lane (32).
#[test]
fn ec_gemv_threadgroup_bytes_match_the_declarations() {
    use ecq::kernels_msl::{ec_gemv_threadgroup_bytes, MSL_TABLE_BITS};

    let decls: Vec<&str> =
        EC_GEMV.lines().map(str::trim).filter(|l| l.starts_with("threadgroup ") && l.ends_with(';')).collect();
    assert_eq!(
        decls,
        ["threadgroup uint table[1u << TABLE_BITS];", "threadgroup float partial[MAX_SIMDGROUPS * VECTORS * LANES];"]
    );
    for (name, value) in [("MAX_PRECISION", 12), ("SMALL_TABLE_BITS", 11), ("MAX_SIMDGROUPS", 8), ("LANES", 32)] {
        assert!(EC_GEMV.contains(&format!("constant constexpr uint {name} = {value};")), "{name}");
    }
    assert_eq!(MSL_TABLE_BITS, [11, 12]);
    for table in MSL_TABLE_BITS {
        assert!(EC_GEMV.contains(&format!("instantiate_ec_gemv(bits, 1, {table})")), "t{table}");
        assert!(EC_GEMV.contains(&format!("instantiate_ec_gemv(bits, 8, {table})")), "t{table}");
        assert!(EC_GEMV.contains(&format!("instantiate_ec_gemv_split(1, {table})")), "split t{table}");
        assert!(EC_GEMV.contains(&format!("instantiate_ec_gemv_split(8, {table})")), "split t{table}");
    }
    assert_eq!(ec_gemv_threadgroup_bytes(1, 11), 4 * 2048 + 4 * 8 * 32);
    assert_eq!(ec_gemv_threadgroup_bytes(1, 12), 4 * 4096 + 4 * 8 * 32);
    for m in 2..=8 {
        assert_eq!(ec_gemv_threadgroup_bytes(m, 10), 4 * 2048 + 4 * 8 * 8 * 32);
        assert_eq!(ec_gemv_threadgroup_bytes(m, 12), 4 * 4096 + 4 * 8 * 8 * 32);
    }
}

/// A split stream's parameter block: 2 coded bits and `low_bits` 2; 0 for a stream that is not split.
#[test]
fn params_block_of_a_split_stream() {
    use ecq::format::{EcTensor, EncodeOptions, SplitForm};
    use ecq::kernels_msl::EcParams;
    use ecq::quant::{quantize, QuantConfig};

    let weights: Vec<f32> = (0..40 * 256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
    let q = quantize(&weights, 40, 256, QuantConfig::default()).unwrap();
    let split =
        EcTensor::encode(&q, EncodeOptions { split: Some(SplitForm::Low2), ..EncodeOptions::default() }).unwrap();
    let p = EcParams::new(&split, 1).unwrap();
    assert_eq!((p.bits, p.low_bits), (2, 2));
    let split3 =
        EcTensor::encode(&q, EncodeOptions { split: Some(SplitForm::Low3), ..EncodeOptions::default() }).unwrap();
    let p = EcParams::new(&split3, 1).unwrap();
    assert_eq!((p.bits, p.low_bits), (1, 3));
    let plain = EcTensor::encode(&q, EncodeOptions::default()).unwrap();
    let p = EcParams::new(&plain, 1).unwrap();
    assert_eq!((p.bits, p.low_bits), (4, 0));
}
