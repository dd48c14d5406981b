//! Real-model checks on SmolLM2-135M-Instruct Q4_1 (fetch it with scripts/fetch-smollm2.sh; skipped loudly
//! when absent, failing when ECQ_REQUIRE_MODEL=1).
//!
//! Every Q4_1/Q8_0 tensor is imported, checked against an independent dequantization of its raw blocks,
//! encoded, decoded and compared exactly, and its stored symbol-stream size is compared with its order-0
//! entropy. Run with `--nocapture` for the per-tensor table.

#[path = "gguf_support/mod.rs"]
mod support;

use ecq::format::gguf::{GgmlType, GgufFile};
use ecq::format::{EcTensor, EncodeOptions, SplitForm};
use ecq::quant::QuantizedMatrix;
use ecq::rans;
use rayon::prelude::*;

/// Largest allowed excess of the total stored symbol stream over the order-0 entropy bound.
const MAX_STREAM_OVERHEAD: f64 = 0.02;

/// The encoder's default segment width for `cols` columns (the shape rule of `EncodeOptions::segment_for`, which
/// without `min_tiles` does not depend on the rows).
fn segment_for(cols: usize, group_size: usize) -> usize {
    EncodeOptions::default().segment_for(1, cols, group_size)
}

fn quantized_names(model: &GgufFile) -> Vec<String> {
    model
        .tensors()
        .iter()
        .filter(|t| matches!(t.ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0))
        .map(|t| t.name.clone())
        .collect()
}

fn order0_entropy_bits(q: &QuantizedMatrix) -> f64 {
    let mut counts = vec![0u64; 1 << q.bits];
    for &s in &q.symbols {
        counts[s as usize] += 1;
    }
    rans::entropy_bits(&counts) * q.symbols.len() as f64
}

#[test]
fn smollm2_lists_expected_tensors() {
    let Some(path) = support::require_smollm2("smollm2_lists_expected_tensors") else { return };
    let model = GgufFile::open(&path).unwrap();
    let count = |ty: GgmlType, n_dims: usize| {
        model.tensors().iter().filter(|t| t.ggml_type == ty && t.dims.len() == n_dims).count()
    };
    assert_eq!(count(GgmlType::Q4_1, 2), 210);
    assert_eq!(count(GgmlType::F32, 1), 61);
    assert_eq!(count(GgmlType::Q8_0, 2), 1);
    assert_eq!(model.tensors().len(), 272);
    let embd = model.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.shape(), vec![49152, 576]);
    assert_eq!(model.metadata_value("general.architecture").and_then(|v| v.as_str()), Some("llama"));
}

#[test]
fn smollm2_import_matches_reference_dequantization() {
    let Some(path) = support::require_smollm2("smollm2_import_matches_reference_dequantization") else { return };
    let model = GgufFile::open(&path).unwrap();
    let names = quantized_names(&model);
    assert_eq!(names.len(), 211);
    names.par_iter().for_each(|name| {
        let info = model.tensor_info(name).unwrap();
        let q = model.quantized(name).unwrap();
        let (rows, cols) = info.matrix_shape();
        assert_eq!((q.rows, q.cols, q.group_size), (rows, cols, 32), "{name}");
        let want = support::reference_dequant(info.ggml_type.0, model.tensor_bytes(name).unwrap());
        assert_eq!(support::first_difference(&q.dequantize(), &want), None, "{name}");
    });
}

struct Measured {
    name: String,
    rows: usize,
    cols: usize,
    bits: u32,
    segment: usize,
    entropy: f64,
    stream: u64,
    /// Bits of the 16-bit words alone.
    words: u64,
    /// Bits of the final states and tile offsets.
    states: u64,
    /// Ideal coded size of the joint symbols with the normalized table, `sum(count * -log2(freq / 2^P))`.
    table_cost: f64,
    /// Joint (pair for 4-bit) entropy of the symbols.
    joint_entropy: f64,
}

fn encode_all(model: &GgufFile, names: &[String], segment: impl Fn(usize) -> usize + Sync) -> Vec<Measured> {
    names
        .par_iter()
        .map(|name| {
            let q = model.quantized(name).unwrap();
            let segment = segment(q.cols);
            let t = EcTensor::encode(&q, EncodeOptions { segment, ..EncodeOptions::default() }).unwrap();
            let joint = rans::joint_counts(&q.symbols, t.layout()).unwrap();
            let back = t.to_quantized().unwrap();
            assert!(back.symbols == q.symbols, "{name}: decoded symbols differ");
            assert_eq!(
                back.scales.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                q.scales.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{name}: scales"
            );
            assert_eq!(
                back.biases.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                q.biases.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{name}: biases"
            );
            Measured {
                name: name.clone(),
                rows: q.rows,
                cols: q.cols,
                bits: q.bits,
                segment: t.layout().segment(),
                entropy: order0_entropy_bits(&q),
                stream: t.stream_bits(),
                words: 16 * t.stream().words.len() as u64,
                states: 32 * (t.stream().states.len() + t.stream().tile_offsets.len()) as u64,
                table_cost: t.table().cost_bits(&joint),
                joint_entropy: rans::entropy_bits(&joint) * joint.iter().sum::<u64>() as f64,
            }
        })
        .collect()
}

fn role(name: &str) -> &str {
    match name.strip_prefix("blk.") {
        Some(rest) => rest.split_once('.').map_or(name, |(_, role)| role),
        None => name,
    }
}

fn summarize(label: &str, rows: &[&Measured]) -> (f64, f64) {
    let weights: f64 = rows.iter().map(|m| (m.rows * m.cols) as f64).sum();
    let entropy: f64 = rows.iter().map(|m| m.entropy).sum();
    let stream: f64 = rows.iter().map(|m| m.stream as f64).sum();
    println!(
        "{label:<28} {:>3} tensors {:>11.0} weights: stream {:.4} bits/weight, entropy {:.4}, overhead {:+.3}%",
        rows.len(),
        weights,
        stream / weights,
        entropy / weights,
        100.0 * (stream / entropy - 1.0)
    );
    let per_weight = |f: &dyn Fn(&Measured) -> f64| rows.iter().map(|m| f(m)).sum::<f64>() / weights;
    println!(
        "{:<28} = words {:.4} (table cost {:.4}, joint entropy {:.4}) + states/offsets {:.4} + table {:.4}",
        "",
        per_weight(&|m| m.words as f64),
        per_weight(&|m| m.table_cost),
        per_weight(&|m| m.joint_entropy),
        per_weight(&|m| m.states as f64),
        per_weight(&|m| (m.stream - m.words - m.states) as f64),
    );
    (stream, entropy)
}

#[test]
fn smollm2_encode_round_trip_within_2pct_of_entropy() {
    let Some(path) = support::require_smollm2("smollm2_encode_round_trip_within_2pct_of_entropy") else { return };
    let model = GgufFile::open(&path).unwrap();
    let names = quantized_names(&model);
    let measured = encode_all(&model, &names, |cols| segment_for(cols, 32));
    println!(
        "{:<28} {:>6} {:>5} {:>4} {:>4} {:>9} {:>9} {:>8}",
        "tensor", "rows", "cols", "bits", "S", "stream", "entropy", "over"
    );
    for m in &measured {
        let w = (m.rows * m.cols) as f64;
        println!(
            "{:<28} {:>6} {:>5} {:>4} {:>4} {:>9.4} {:>9.4} {:>+7.3}%",
            m.name,
            m.rows,
            m.cols,
            m.bits,
            m.segment,
            m.stream as f64 / w,
            m.entropy / w,
            100.0 * (m.stream as f64 / m.entropy - 1.0)
        );
    }
    println!();
    let by_kind = |pred: &dyn Fn(&Measured) -> bool| measured.iter().filter(|m| pred(m)).collect::<Vec<_>>();
    // One line per tensor role across the layers (blk.N.ffn_up.weight -> ffn_up.weight).
    let mut roles: Vec<&str> = measured.iter().map(|m| role(&m.name)).collect();
    roles.sort_unstable();
    roles.dedup();
    for r in roles {
        summarize(r, &by_kind(&|m| role(&m.name) == r));
    }
    summarize("4-bit, 576 columns", &by_kind(&|m| m.bits == 4 && m.cols == 576));
    summarize("4-bit, 1536 columns", &by_kind(&|m| m.bits == 4 && m.cols == 1536));
    summarize("4-bit (Q4_1) all", &by_kind(&|m| m.bits == 4));
    summarize("8-bit (Q8_0 token_embd)", &by_kind(&|m| m.bits == 8));
    let (stream, entropy) = summarize("all encoded", &by_kind(&|_| true));
    assert!(
        stream <= entropy * (1.0 + MAX_STREAM_OVERHEAD),
        "stream {stream} bits is more than {MAX_STREAM_OVERHEAD} over the entropy bound {entropy}"
    );
}

#[test]
fn segment_rule_examples() {
    assert_eq!(segment_for(576, 32), 576);
    assert_eq!(segment_for(1536, 32), 512);
    assert_eq!(segment_for(4096, 64), 512);
    assert_eq!(segment_for(800, 32), 416);
    assert_eq!(segment_for(100, 32), 128);
}

/// `min_tiles` halves the segments of matrices with fewer tiles than it asks for, never below `MIN_AUTO_SEGMENT`
/// columns, and leaves the others (and an explicit segment) alone.
#[test]
fn segment_rule_min_tiles() {
    let at = |min_tiles: usize, rows: usize, cols: usize, group_size: usize| {
        EncodeOptions { min_tiles, ..EncodeOptions::default() }.segment_for(rows, cols, group_size)
    };
    // 128 row tiles of 8 segments: 16 segments reach 2048 tiles, 32 reach 3072; 1536 takes 16 as well.
    assert_eq!(at(2048, 4096, 4096, 64), 256);
    assert_eq!(at(3072, 4096, 4096, 64), 128);
    assert_eq!(at(1024, 4096, 4096, 64), 512);
    assert_eq!(at(1536, 4096, 4096, 64), 256);
    // Already 448 x 8 tiles. Rows of more than 8 segments take a power of two of them first: 28 of 14336 columns
    // 32 of 448 (128 x 32 = 4096 tiles), 22 of 11008 16 of 704 (whole groups; the last 448), 12 of 6144 16 of 384;
    // 8 of 4096 stay 8.
    for min_tiles in [2048, 3072] {
        assert_eq!(at(min_tiles, 14336, 4096, 64), 512);
        assert_eq!(at(min_tiles, 4096, 14336, 64), 448);
    }
    assert_eq!(at(1, 4096, 11008, 64), 704);
    assert_eq!(at(1, 4096, 6144, 64), 384);
    assert_eq!(at(1, 4096, 4096, 64), 512);
    assert_eq!(rans::EVEN_PARTS_ABOVE, 8);
    // Few row tiles: as many halvings as 128 columns allow (one segment of 576 columns in 4 of 144, rounded up to
    // whole groups: 3 of 192, or 160; 3 of 1536 in 12 of 128).
    assert_eq!(at(2048, 1536, 576, 64), 192);
    assert_eq!(at(2048, 1536, 576, 32), 160);
    assert_eq!(at(2048, 576, 1536, 32), 128);
    assert_eq!(at(1 << 20, 4096, 4096, 64), rans::MIN_AUTO_SEGMENT);
    assert_eq!(rans::MIN_AUTO_SEGMENT, 128);
    // Rows narrower than two of the shortest segments keep one.
    assert_eq!(at(2048, 64, 200, 64), 256);
    assert_eq!(at(2048, 64, 200, 8), 200);
    // 0 is the shape rule alone; an explicit segment is taken as it is.
    for (rows, cols) in [(4096, 4096), (1536, 576), (576, 1536), (14336, 4096)] {
        assert_eq!(at(0, rows, cols, 32), segment_for(cols, 32));
    }
    let fixed = EncodeOptions { segment: 512, min_tiles: 2048, ..EncodeOptions::default() };
    assert_eq!(fixed.segment_for(4096, 4096, 64), 512);
}

/// Copies of the real file cut at lengths inside the metadata, inside the tensor infos and inside the data
/// all fail with InvalidFile.
#[test]
fn smollm2_truncated_copies_fail_cleanly() {
    let Some(path) = support::require_smollm2("smollm2_truncated_copies_fail_cleanly") else { return };
    let bytes = std::fs::read(&path).unwrap();
    let data_offset = GgufFile::open(&path).unwrap().data_offset() as usize;
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    for len in [
        0,
        23,
        24,
        1000,
        100_000,
        data_offset / 2,
        data_offset - 200,
        data_offset - 1,
        data_offset + 5000,
        bytes.len() - 1,
    ] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        match GgufFile::open(&cut) {
            Err(ecq::Error::InvalidFile { .. }) => {}
            other => panic!("length {len}: expected InvalidFile, got {other:?}"),
        }
    }
}

/// Split streams (high 2 bits coded, low 2 stored) of every 4-bit tensor decode to the same symbols, and cost
/// at most 1% more stream than the same tensors not split (measured: 0.6%).
#[test]
fn smollm2_split_streams_round_trip_within_1pct_of_unsplit() {
    let Some(path) = support::require_smollm2("smollm2_split_streams_round_trip_within_1pct_of_unsplit") else {
        return;
    };
    let model = GgufFile::open(&path).unwrap();
    let names = quantized_names(&model);
    let sizes: Vec<(u64, u64)> = names
        .par_iter()
        .filter_map(|name| {
            let q = model.quantized(name).unwrap();
            if q.bits != rans::SPLIT_BITS {
                return None;
            }
            let split =
                EcTensor::encode(&q, EncodeOptions { split: Some(SplitForm::Low2), ..EncodeOptions::default() })
                    .unwrap();
            assert!(split.low().is_some(), "{name}: not split");
            assert!(split.decode_symbols().unwrap() == q.symbols, "{name}: split stream decodes to other symbols");
            let plain = EcTensor::encode(&q, EncodeOptions::default()).unwrap();
            Some((split.stream_bits(), plain.stream_bits()))
        })
        .collect();
    assert!(sizes.len() >= 200, "only {} 4-bit tensors", sizes.len());
    let (split, plain): (u64, u64) = sizes.iter().fold((0, 0), |(a, b), &(s, p)| (a + s, b + p));
    let cost = split as f64 / plain as f64 - 1.0;
    println!("split streams: {} tensors, {split} bits against {plain} not split ({:+.3}%)", sizes.len(), 100.0 * cost);
    assert!(cost < 0.01, "split streams cost {:.3}% more than unsplit", 100.0 * cost);
}
