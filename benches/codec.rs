//! CPU codec speed on one core, against constriction's rANS coder on the same symbols, and the stored size over
//! the entropy for several precisions and segment widths.
//!
//! Run: `cargo bench --bench codec`. Prints the size table and a speed summary, then criterion's own figures.
//!
//! The layers: heavy-tailed weights (Student-t with 5 degrees of freedom, seeded) quantized the MLX way to 4 bits
//! with groups of 64 (order-0 entropy 3.67 bits/weight) and of 32 (3.82 bits/weight, close to the 3.85 of a
//! real group-32 4-bit model), coded as pair symbols (the format's joint symbols for 4-bit weights).
//!
//! Contenders, all on ONE thread:
//! - ecq fast: `encode_with(.., Kernel::Fast)` in a one-thread rayon pool; `decode_row_tile_with(.., Fast)` over
//!   every row tile on the calling thread (the AVX2 decoder where the CPU has it).
//! - ecq scalar: the same with `Kernel::Reference`, the plain scalar loops.
//! - ecq split: the same symbols encoded as a split stream (`EncodeOptions { split: Some(SplitForm::Low2), .. }`:
//!   the high 2 bits of each weight coded four to a step, the low 2 stored), decoded row tile by row tile with
//!   `EcTensor::decode_row_tile` (the fast decoder, then the merge with the low bits); decode only.
//! - constriction 0.4: `SmallAnsCoder` (32-bit state, 16-bit words, like ecq) with 12-bit fixed-point
//!   probabilities (the same frequencies as ecq's table, zero counts raised to one because its contiguous models
//!   need every symbol present): `SmallContiguousCategoricalEntropyModel` to encode and
//!   `SmallContiguousLookupDecoderModel` to decode, its fastest decoder. It codes the same pair symbols in one
//!   stream, in the order ecq's lanes would see them row by row.

#[path = "../tests/common/student_t.rs"]
mod student_t;
use std::hint::black_box;
use std::time::{Duration, Instant};
use student_t::student_t;

use constriction::stream::model::{SmallContiguousCategoricalEntropyModel, SmallContiguousLookupDecoderModel};
use constriction::stream::stack::SmallAnsCoder;
use constriction::stream::Decode;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ecq::format::{EcTensor, EncodeOptions, SplitForm};
use ecq::quant::{quantize, QuantConfig, QuantizedMatrix};
use ecq::rans::*;

/// Rows and columns of the timed layer (4M weights: large enough to leave the caches, quick to repeat).
const BENCH_ROWS: usize = 1024;
const BENCH_COLS: usize = 4096;
/// Probability precision of the timed streams: 12 bits, the precision of constriction's `Small` models, which
/// take the same frequencies (the crate's default, `DEFAULT_PRECISION`, is 11).
const PRECISION: u32 = 12;
/// The size table's layer: the 4096 x 4096 of the issue.
const SIZE_ROWS: usize = 4096;
const SIZE_COLS: usize = 4096;

fn layer(rows: usize, cols: usize, group_size: usize) -> QuantizedMatrix {
    let config = QuantConfig { group_size, ..QuantConfig::default() };
    quantize(&student_t(rows * cols, 5.0, 0.02, 42), rows, cols, config).unwrap()
}

/// Order-0 entropy of the weight symbols in bits per weight (over `2^bits` symbols, not pairs).
fn weight_entropy(q: &QuantizedMatrix) -> f64 {
    let mut counts = vec![0u64; 1 << q.bits];
    for &s in &q.symbols {
        counts[s as usize] += 1;
    }
    entropy_bits(&counts)
}

fn size_table() {
    let q = layer(SIZE_ROWS, SIZE_COLS, 64);
    let h = weight_entropy(&q);
    println!("\nstored size, {SIZE_ROWS} x {SIZE_COLS} 4-bit group 64, order-0 entropy {h:.4} bits/weight");
    println!("(words + states + offsets + table, per weight; ratio to the entropy)");
    print!("{:>6}", "P \\ S");
    for s in [256, 512, 1024] {
        print!("{:>20}", s);
    }
    println!();
    for p in [10, 11, 12] {
        print!("{p:>6}");
        for s in [256, 512, 1024] {
            let t =
                EcTensor::encode(&q, EncodeOptions { segment: s, precision: p, split: None, min_tiles: 0 }).unwrap();
            let bpw = t.stream_bits() as f64 / (SIZE_ROWS * SIZE_COLS) as f64;
            print!("{:>20}", format!("{bpw:.4} ({:+.2}%)", 100.0 * (bpw / h - 1.0)));
        }
        println!();
    }
}

struct Fixture {
    q: QuantizedMatrix,
    layout: TileLayout,
    table: FreqTable,
    dtable: DecodeTable,
    stream: EncodedStream,
    /// Pair symbols in row-major order, for constriction.
    pairs: Vec<u16>,
    coder_model: SmallContiguousCategoricalEntropyModel,
    lookup_model: SmallContiguousLookupDecoderModel,
    constriction_words: Vec<u16>,
    /// The same symbols as a split stream (docs/FORMAT.md, section 2.1), and its decode table.
    split: EcTensor,
    split_dtable: DecodeTable,
}

impl Fixture {
    fn new(group_size: usize) -> Self {
        let q = layer(BENCH_ROWS, BENCH_COLS, group_size);
        let layout = TileLayout::new(q.rows, q.cols, q.bits, DEFAULT_SEGMENT).unwrap();
        let counts = joint_counts(&q.symbols, &layout).unwrap();
        let table = FreqTable::from_counts(&counts, PRECISION).unwrap();
        let stream = encode(&q.symbols, &layout, &table).unwrap();
        let pairs: Vec<u16> = q.symbols.chunks_exact(2).map(|p| (p[0] | p[1] << 4) as u16).collect();
        let all: Vec<u64> = counts.iter().map(|&c| c.max(1)).collect();
        let dense = FreqTable::from_counts(&all, PRECISION).unwrap();
        let probs: Vec<u16> = dense.freqs().iter().map(|&f| f as u16).collect();
        let coder_model =
            SmallContiguousCategoricalEntropyModel::from_nonzero_fixed_point_probabilities(&probs, false).unwrap();
        let lookup_model =
            SmallContiguousLookupDecoderModel::from_nonzero_fixed_point_probabilities(&probs, false).unwrap();
        let constriction_words = constriction_encode(&pairs, &coder_model);
        let dtable = DecodeTable::new(&table);
        let options = EncodeOptions {
            segment: DEFAULT_SEGMENT,
            precision: PRECISION,
            split: Some(SplitForm::Low2),
            min_tiles: 0,
        };
        let split = EcTensor::encode(&q, options).unwrap();
        let split_dtable = DecodeTable::new(split.table());
        Self {
            q,
            layout,
            table,
            dtable,
            stream,
            pairs,
            coder_model,
            lookup_model,
            constriction_words,
            split,
            split_dtable,
        }
    }

    fn weights(&self) -> usize {
        self.q.rows * self.q.cols
    }
}

fn constriction_encode(pairs: &[u16], model: &SmallContiguousCategoricalEntropyModel) -> Vec<u16> {
    let mut coder = SmallAnsCoder::new();
    coder.encode_iid_symbols_reverse(pairs.iter().map(|&p| p as usize), model).unwrap();
    coder.into_compressed().unwrap()
}

fn constriction_decode(words: &[u16], model: &SmallContiguousLookupDecoderModel, out: &mut [u16]) {
    let mut coder = SmallAnsCoder::from_compressed_slice(words).unwrap();
    let n = out.len();
    for (o, s) in out.iter_mut().zip(coder.decode_iid_symbols(n, model)) {
        *o = s.unwrap() as u16;
    }
}

/// Decodes every row tile on the calling thread.
fn ecq_decode(f: &Fixture, kernel: Kernel, out: &mut [u8]) {
    for (rt, rows) in out.chunks_mut(LANES * f.layout.cols()).enumerate() {
        decode_row_tile_with(&f.stream, &f.layout, &f.dtable, rt, rows, kernel).unwrap();
    }
}

/// Decodes the split stream's row tiles on the calling thread, each merged with its low words (the fast decoder).
fn split_decode(f: &Fixture, out: &mut [u8]) {
    for (rt, rows) in out.chunks_mut(LANES * f.layout.cols()).enumerate() {
        f.split.decode_row_tile(&f.split_dtable, rt, rows).unwrap();
    }
}

fn one_thread() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap()
}

/// Best of `reps` runs, in weights per second.
fn best_rate(weights: usize, reps: usize, mut run: impl FnMut()) -> f64 {
    run();
    let best = (0..reps)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed()
        })
        .min()
        .unwrap();
    weights as f64 / best.as_secs_f64()
}

fn summary(f: &Fixture) {
    let pool = one_thread();
    let n = f.weights();
    let h = weight_entropy(&f.q);
    let mut out = vec![0u8; n];
    let mut pairs_out = vec![0u16; f.pairs.len()];
    ecq_decode(f, Kernel::Fast, &mut out);
    assert_eq!(out, f.q.symbols, "fast decode mismatch");
    split_decode(f, &mut out);
    assert_eq!(out, f.q.symbols, "split decode mismatch");
    constriction_decode(&f.constriction_words, &f.lookup_model, &mut pairs_out);
    assert_eq!(pairs_out, f.pairs, "constriction decode mismatch");
    let reps = 7;
    let rows = [
        (
            "ecq fast",
            best_rate(n, reps, || ecq_decode(f, Kernel::Fast, black_box(&mut out))),
            best_rate(n, reps, || {
                black_box(pool.install(|| encode_with(&f.q.symbols, &f.layout, &f.table, Kernel::Fast).unwrap()));
            }),
        ),
        (
            "ecq scalar",
            best_rate(n, reps, || ecq_decode(f, Kernel::Reference, black_box(&mut out))),
            best_rate(n, reps, || {
                black_box(pool.install(|| encode_with(&f.q.symbols, &f.layout, &f.table, Kernel::Reference).unwrap()));
            }),
        ),
        (
            "constriction",
            best_rate(n, reps, || {
                constriction_decode(&f.constriction_words, &f.lookup_model, black_box(&mut pairs_out))
            }),
            best_rate(n, reps, || {
                black_box(constriction_encode(&f.pairs, &f.coder_model));
            }),
        ),
    ];
    println!(
        "\none core, {} x {} 4-bit group {}, entropy {h:.3} bits/weight, S = {}, P = {}, fast decoder {}",
        f.q.rows,
        f.q.cols,
        f.q.group_size,
        f.layout.segment(),
        f.table.precision(),
        Kernel::Fast.decoder_name()
    );
    println!("{:<14}{:>22}{:>22}", "coder", "decode G weights/s", "encode G weights/s");
    for (name, d, e) in rows {
        println!("{name:<14}{:>22.3}{:>22.3}", d / 1e9, e / 1e9);
    }
    let split = best_rate(n, reps, || split_decode(f, black_box(&mut out)));
    println!(
        "{:<14}{:>22.3}{:>22}  (the same symbols as a split stream, {:.4} bits/weight)",
        "ecq split",
        split / 1e9,
        "-",
        f.split.stream_bits() as f64 / n as f64
    );
    let ecq_bits = 16 * f.stream.words.len() + 32 * (f.stream.states.len() + f.stream.tile_offsets.len());
    println!(
        "stream size: ecq {:.4} bits/weight, constriction {:.4} bits/weight\n",
        ecq_bits as f64 / n as f64,
        16.0 * f.constriction_words.len() as f64 / n as f64
    );
}

fn bench(c: &mut Criterion) {
    size_table();
    let fixtures = [Fixture::new(64), Fixture::new(32)];
    for f in &fixtures {
        summary(f);
    }
    let pool = one_thread();
    for f in &fixtures {
        let n = f.weights();
        let mut out = vec![0u8; n];
        let mut pairs_out = vec![0u16; f.pairs.len()];
        let g_size = f.q.group_size;

        let mut g = c.benchmark_group(format!("decode_g{g_size}"));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("ecq_fast", |b| b.iter(|| ecq_decode(f, Kernel::Fast, &mut out)));
        g.bench_function("ecq_scalar", |b| b.iter(|| ecq_decode(f, Kernel::Reference, &mut out)));
        g.bench_function("ecq_split", |b| b.iter(|| split_decode(f, &mut out)));
        g.bench_function("constriction", |b| {
            b.iter(|| constriction_decode(&f.constriction_words, &f.lookup_model, &mut pairs_out))
        });
        g.finish();

        let mut g = c.benchmark_group(format!("encode_g{g_size}"));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("ecq_fast", |b| {
            b.iter(|| pool.install(|| encode_with(&f.q.symbols, &f.layout, &f.table, Kernel::Fast).unwrap()))
        });
        g.bench_function("ecq_scalar", |b| {
            b.iter(|| pool.install(|| encode_with(&f.q.symbols, &f.layout, &f.table, Kernel::Reference).unwrap()))
        });
        g.bench_function("constriction", |b| b.iter(|| constriction_encode(&f.pairs, &f.coder_model)));
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
