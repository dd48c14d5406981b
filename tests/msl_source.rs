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
    "reserved0",
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
    let want =
        ["words", "tile_offsets", "states", "decode_table", "scales", "biases", "x", "y", "tile_status", "params"];
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
