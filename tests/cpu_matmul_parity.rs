//! `EcMatmul::cpu` against a float64 reference built from `QuantizedMatrix::dequantize`, on shapes that do not
//! divide evenly into tiles, segments or bytes, every bit width, several batch sizes.

use ecq::format::{EcTensor, EncodeOptions, SplitForm};
use ecq::quant::{quantize, QuantConfig, QuantizedMatrix, ScaleDtype, SUPPORTED_BITS};
use ecq::{EcMatmul, Error, Strategy};
use proptest::prelude::*;

/// Allowed error relative to `sum_g (scale_g * sum_k q |x| + |bias_g| * sum_k |x|)`, the magnitude the
/// `f32` accumulation works at (the affine split can cancel, so `sum |w x|` would understate it). Summation in
/// blocks of 8 lanes, per group, then over at most 65 groups rounds well under this.
const MATMUL_REL_TOL: f64 = 2e-6;

const ROWS: [usize; 3] = [67, 1, 33];
const COLS: [usize; 3] = [1088, 4160, 64];
const BATCH: [usize; 4] = [1, 3, 8, 33];

struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Heavy-tailed around 0, like real weights.
    fn weight(&mut self) -> f32 {
        let u = self.uniform();
        (0.02 * (u - 0.5) / (0.05 + u * (1.0 - u))) as f32
    }
}

fn layer(rows: usize, cols: usize, config: QuantConfig, seed: u64) -> QuantizedMatrix {
    let mut rng = Lcg(seed);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.weight()).collect();
    quantize(&w, rows, cols, config).unwrap()
}

/// Checks `y` (row-major `m x rows`) against the float64 product of the dequantized weights.
fn check_against_reference(q: &QuantizedMatrix, x: &[f32], m: usize, y: &[f32], what: &str) {
    let (n, k, gs) = (q.rows, q.cols, q.group_size);
    let w = q.dequantize();
    for v in 0..m {
        let xv = &x[v * k..(v + 1) * k];
        for row in 0..n {
            let want: f64 = (0..k).map(|c| w[row * k + c] as f64 * xv[c] as f64).sum();
            let magnitude: f64 = (0..k / gs)
                .map(|g| {
                    let i = row * (k / gs) + g;
                    let cols = g * gs..(g + 1) * gs;
                    let qx: f64 = cols.clone().map(|c| q.symbols[row * k + c] as f64 * (xv[c] as f64).abs()).sum();
                    let ax: f64 = cols.map(|c| (xv[c] as f64).abs()).sum();
                    q.scales[i] as f64 * qx + (q.biases[i] as f64).abs() * ax
                })
                .sum();
            let got = y[v * n + row];
            let tol = MATMUL_REL_TOL * magnitude + f64::MIN_POSITIVE;
            assert!(
                (got as f64 - want).abs() <= tol,
                "{what}: vector {v} row {row}: got {got}, want {want} (tolerance {tol:.3e})"
            );
        }
    }
}

fn inputs(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    (0..m * k).map(|_| (rng.uniform() * 4.0 - 2.0) as f32).collect()
}

/// Runs the CPU product for every batch size with NaN-poisoned outputs and checks each against the reference.
fn check_layer(q: &QuantizedMatrix, options: EncodeOptions, what: &str) {
    let tensor = EcTensor::encode(q, options).unwrap();
    let matmul = EcMatmul::cpu(&tensor);
    assert_eq!((matmul.rows(), matmul.cols(), matmul.strategy()), (q.rows, q.cols, Strategy::Cpu));
    for m in BATCH {
        let x = inputs(m, q.cols, (q.rows * 7 + q.cols * 13 + m) as u64);
        let mut y = vec![f32::NAN; m * q.rows];
        matmul.matmul(&x, m, &mut y).unwrap();
        check_against_reference(q, &x, m, &y, &format!("{what} M={m}"));
        if m == 1 {
            let mut y1 = vec![f32::NAN; q.rows];
            matmul.matvec(&x, &mut y1).unwrap();
            assert_eq!(y1, y, "{what}: matvec differs from matmul with M = 1");
        }
    }
}

#[test]
fn odd_shapes_every_bit_width() {
    for bits in SUPPORTED_BITS {
        for rows in ROWS {
            for cols in COLS {
                let config = QuantConfig { bits, ..QuantConfig::default() };
                let q = layer(rows, cols, config, (bits as usize * 100_000 + rows * 1000 + cols) as u64);
                check_layer(&q, EncodeOptions::default(), &format!("{bits} bits, {rows} x {cols}"));
            }
        }
    }
}

#[test]
fn many_small_segments() {
    // Segment 64: 1088 columns are 17 segments, so 3 row tiles x 17 = 51 tiles for 67 rows.
    for bits in SUPPORTED_BITS {
        let q = layer(67, 1088, QuantConfig { bits, ..QuantConfig::default() }, bits as u64);
        check_layer(
            &q,
            EncodeOptions { segment: 64, precision: 12, split: None, min_tiles: 0 },
            &format!("{bits} bits, segment 64"),
        );
    }
}

#[test]
fn other_group_sizes_and_scale_dtypes() {
    for (group_size, cols) in [(32, 1056), (128, 4224)] {
        for scale_dtype in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::Bf16] {
            let config = QuantConfig { bits: 4, group_size, scale_dtype };
            let q = layer(67, cols, config, group_size as u64);
            check_layer(&q, EncodeOptions::default(), &format!("group {group_size} {scale_dtype:?}"));
        }
    }
}

#[test]
fn split_streams() {
    // 4-bit weights with the low 2 bits stored: every row count of ROWS, segments of 64 and the default, groups of
    // 32 and 128, and the constant-group case (a one-symbol alphabet of high parts).
    let split = |segment| EncodeOptions { segment, split: Some(SplitForm::Low2), ..EncodeOptions::default() };
    for rows in ROWS {
        let q = layer(rows, 1088, QuantConfig::default(), 900 + rows as u64);
        for segment in [0, 64] {
            let t = EcTensor::encode(&q, split(segment)).unwrap();
            assert!(t.low().is_some(), "{rows} rows: not split");
            assert_eq!(t.decode_symbols().unwrap(), q.symbols, "{rows} rows, segment {segment}: symbols");
            check_layer(&q, split(segment), &format!("split, {rows} x 1088, segment {segment}"));
        }
    }
    let q = layer(67, 4224, QuantConfig { group_size: 128, ..QuantConfig::default() }, 990);
    check_layer(&q, split(0), "split, group 128");
    let w: Vec<f32> = (0..33 * 1088).map(|i| ((i / 64) % 7) as f32 * 0.25 - 0.5).collect();
    let q = quantize(&w, 33, 1088, QuantConfig::default()).unwrap();
    check_layer(&q, split(0), "split, constant groups");
}

#[test]
fn split_needs_4_bits_and_columns_of_16() {
    // Other widths are not split; a 4-bit matrix whose columns or segment are not multiples of 16 is refused.
    let q = layer(9, 256, QuantConfig { bits: 8, ..QuantConfig::default() }, 5);
    let t = EcTensor::encode(&q, EncodeOptions { split: Some(SplitForm::Low2), ..EncodeOptions::default() }).unwrap();
    assert!(t.low().is_none() && t.layout().bits() == 8);
    // Groups of 8 (possible in a matrix built by hand; the quantizer makes groups of 32 to 128).
    let grouped = |cols: usize| {
        let groups = 9 * cols / 8;
        let (scales, biases) = (vec![0.5f32; groups], vec![-1.0f32; groups]);
        let symbols = (0..9 * cols).map(|i| (i % 16) as u8).collect();
        QuantizedMatrix { rows: 9, cols, bits: 4, group_size: 8, symbols, scales, biases, scale_dtype: ScaleDtype::F32 }
    };
    let err =
        EcTensor::encode(&grouped(40), EncodeOptions { split: Some(SplitForm::Low2), ..EncodeOptions::default() })
            .unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
    let options = EncodeOptions { segment: 24, split: Some(SplitForm::Low2), ..EncodeOptions::default() };
    let err = EcTensor::encode(&grouped(64), options).unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
}

#[test]
fn one_symbol_tensor() {
    // Every group constant: scale 0, every symbol 0, a one-symbol alphabet; y is bias * sum(x).
    let (rows, cols) = (33, 1088);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i / 64) % 7) as f32 * 0.25 - 0.5).collect();
    let q = quantize(&w, rows, cols, QuantConfig::default()).unwrap();
    assert!(q.symbols.iter().all(|&s| s == 0));
    check_layer(&q, EncodeOptions::default(), "constant groups");
}

#[test]
fn wrong_lengths_are_typed_errors() {
    let q = layer(67, 1088, QuantConfig::default(), 1);
    let matmul = EcMatmul::cpu(&EcTensor::encode(&q, EncodeOptions::default()).unwrap());
    let mut y = vec![0f32; 3 * 67];
    assert!(matches!(
        matmul.matmul(&vec![0f32; 3 * 1088 - 1], 3, &mut y),
        Err(Error::ShapeMismatch { expected: 3264, actual: 3263, .. })
    ));
    assert!(matches!(
        matmul.matmul(&vec![0f32; 3 * 1088], 3, &mut y[..200]),
        Err(Error::ShapeMismatch { expected: 201, actual: 200, .. })
    ));
    assert!(matches!(matmul.matvec(&[0f32; 64], &mut y[..67]), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn empty_shapes_do_not_panic() {
    for (rows, cols) in [(0, 64), (5, 0), (0, 0)] {
        let q = quantize(&[], rows, cols, QuantConfig::default()).unwrap();
        // Encoding an empty matrix may be refused; if it is accepted, the product must be all zeros.
        if let Ok(tensor) = EcTensor::encode(&q, EncodeOptions::default()) {
            let mut y = vec![f32::NAN; 2 * rows];
            EcMatmul::cpu(&tensor).matmul(&vec![1f32; 2 * cols], 2, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{rows} x {cols}: {y:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random shapes, bit widths, group sizes, segments and batch sizes, NaN-poisoned outputs.
    #[test]
    fn random_shapes(
        bits in prop::sample::select(SUPPORTED_BITS.to_vec()),
        group_size in prop::sample::select(vec![32usize, 64, 128]),
        rows in 1usize..100,
        groups in 1usize..12,
        segment_groups in 1usize..6,
        m in 1usize..6,
        seed in any::<u64>(),
    ) {
        let cols = groups * group_size;
        let q = layer(rows, cols, QuantConfig { bits, group_size, ..QuantConfig::default() }, seed);
        let options = EncodeOptions { segment: segment_groups * group_size, precision: 12, split: None, min_tiles: 0 };
        let tensor = EcTensor::encode(&q, options).unwrap();
        let x = inputs(m, cols, seed ^ 1);
        let mut y = vec![f32::NAN; m * rows];
        EcMatmul::cpu(&tensor).matmul(&x, m, &mut y).unwrap();
        check_against_reference(&q, &x, m, &y, &format!("{bits} bits, group {group_size}, {rows} x {cols}, M={m}"));
    }
}
