//! The affine group quantizer: the error bound, symbol range, the constant-group rule, input dtypes and
//! typed errors.

use ecq::quant::{
    quantize, quantize_bf16, quantize_f16, quantize_slice, QuantConfig, QuantInput, QuantizedMatrix, ScaleDtype,
    SUPPORTED_BITS, SUPPORTED_GROUP_SIZES,
};
use ecq::Error;
use half::{bf16, f16};
use proptest::prelude::*;

/// Slack on top of `scale / 2`, relative to the largest magnitude in the dequantization `scale * q + bias`:
/// a few `f32` roundings (the product, the sum, and `(w - bias) / scale` in the quantizer).
const DEQUANT_REL_SLACK: f64 = 4.0 * f32::EPSILON as f64;

const DTYPES: [ScaleDtype; 3] = [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::Bf16];

/// Checks every invariant the quantizer promises for `input` (already as f32): symbols in range, stored
/// values representable, `bias <= min`, `bias + levels * scale >= max`, per-group error within `scale / 2`.
fn check_quantized(input: &[f32], q: &QuantizedMatrix) {
    q.validate().unwrap();
    let levels = ((1u32 << q.bits) - 1) as f64;
    let deq = q.dequantize();
    for (g, ((w, d), syms)) in input
        .chunks_exact(q.group_size)
        .zip(deq.chunks_exact(q.group_size))
        .zip(q.symbols.chunks_exact(q.group_size))
        .enumerate()
    {
        let (scale, bias) = (q.scales[g] as f64, q.biases[g] as f64);
        for v in [q.scales[g], q.biases[g]] {
            assert_eq!(q.scale_dtype.round(v).to_bits(), v.to_bits(), "group {g}: {v} not in {:?}", q.scale_dtype);
        }
        assert!(scale >= 0.0, "group {g}: negative scale {scale}");
        assert!(syms.iter().all(|&s| (s as f64) <= levels), "group {g}: symbol out of range");
        let lo = w.iter().fold(f64::INFINITY, |m, &v| m.min(v as f64));
        let hi = w.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        assert!(bias <= lo, "group {g}: bias {bias} above the minimum {lo}");
        assert!(bias + levels * scale >= hi, "group {g}: range [{bias}, +{levels} * {scale}] misses the maximum {hi}");
        let tol = scale / 2.0 + DEQUANT_REL_SLACK * (bias.abs() + levels * scale);
        for (i, (&w, &d)) in w.iter().zip(d).enumerate() {
            let err = (w as f64 - d as f64).abs();
            assert!(err <= tol, "group {g} weight {i}: |{w} - {d}| = {err} > {tol} (scale {scale}, bias {bias})");
        }
    }
}

/// A row-major matrix whose groups mix shapes: gaussian-like, heavy-tailed, tiny, shifted and constant.
fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..rows * cols)
        .map(|i| {
            let u = next();
            let v = match (i / 32) % 5 {
                0 => (u - 0.5) * 0.1,
                1 => 0.02 * (u - 0.5) / (0.01 + (1.0 - u) * u),
                2 => (u - 0.5) * 1e-6,
                3 => 3.0 + u,
                _ => 0.125,
            };
            v as f32
        })
        .collect()
}

#[test]
fn every_bits_and_group_size_within_half_a_scale() {
    for bits in SUPPORTED_BITS {
        for group_size in SUPPORTED_GROUP_SIZES {
            for scale_dtype in DTYPES {
                let (rows, cols) = (5, 384);
                let w = matrix(rows, cols, bits as u64 * 1000 + group_size as u64);
                let q = quantize(&w, rows, cols, QuantConfig { bits, group_size, scale_dtype }).unwrap();
                assert_eq!(
                    (q.rows, q.cols, q.bits, q.group_size, q.scale_dtype),
                    (rows, cols, bits, group_size, scale_dtype)
                );
                assert_eq!(q.scales.len(), rows * cols / group_size);
                check_quantized(&w, &q);
            }
        }
    }
}

#[test]
fn defaults_are_mlx_4_bits_group_64() {
    let c = QuantConfig::default();
    assert_eq!((c.bits, c.group_size, c.scale_dtype), (4, 64, ScaleDtype::F16));
    assert_eq!(QuantConfig::for_input::<f32>().scale_dtype, ScaleDtype::F32);
    assert_eq!(QuantConfig::for_input::<f16>().scale_dtype, ScaleDtype::F16);
    assert_eq!(QuantConfig::for_input::<bf16>().scale_dtype, ScaleDtype::Bf16);
    assert_eq!((QuantConfig::for_input::<bf16>().bits, QuantConfig::for_input::<bf16>().group_size), (4, 64));
}

#[test]
fn hand_checked_group() {
    // Values 0..31 at 5 bits: min 0, max 31, scale exactly 1, every value its own symbol.
    let w: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let q = quantize(&w, 1, 32, QuantConfig { bits: 5, group_size: 32, scale_dtype: ScaleDtype::F16 }).unwrap();
    assert_eq!(q.scales, [1.0]);
    assert_eq!(q.biases, [0.0]);
    assert_eq!(q.symbols, (0..32u8).collect::<Vec<_>>());
    assert_eq!(q.dequantize(), w);

    // 2 bits over [-1, 2]: scale 1, bias -1; 0.49 rounds to symbol 1 (0.0), 0.51 to symbol 2 (1.0).
    let mut w = vec![-1.0f32; 32];
    w[1] = 2.0;
    w[2] = -0.49;
    w[3] = 0.51;
    let q = quantize(&w, 1, 32, QuantConfig { bits: 2, group_size: 32, scale_dtype: ScaleDtype::F32 }).unwrap();
    assert_eq!((q.scales[0], q.biases[0]), (1.0, -1.0));
    assert_eq!(&q.symbols[..4], &[0, 3, 1, 2]);
}

#[test]
fn bias_rounds_down_and_scale_rounds_up_in_f16() {
    // 0.1 is not an f16 value: the bias must be the f16 just below it, never above the minimum.
    let mut w = vec![0.1f32; 64];
    w[63] = 0.7;
    let q = quantize(&w, 1, 64, QuantConfig::default()).unwrap();
    let bias = q.biases[0];
    assert!(bias <= 0.1 && f16::from_f32(bias).to_f32() == bias);
    assert!(f16::from_bits(f16::from_f32(bias).to_bits() + 1).to_f32() > 0.1, "bias is not the largest f16 <= 0.1");
    assert!(bias as f64 + 15.0 * q.scales[0] as f64 >= 0.7);
    check_quantized(&w, &q);
}

#[test]
fn constant_groups_reconstruct_exactly() {
    for bits in SUPPORTED_BITS {
        for group_size in SUPPORTED_GROUP_SIZES {
            // Values every storage dtype holds exactly (including 0 and negatives), one per group.
            let values = [0.0f32, -0.375, 1.5, 0.0078125, -96.0];
            let cols = group_size * values.len();
            let w: Vec<f32> = values.iter().flat_map(|&v| std::iter::repeat_n(v, group_size)).collect();
            for scale_dtype in DTYPES {
                let q = quantize(&w, 1, cols, QuantConfig { bits, group_size, scale_dtype }).unwrap();
                assert!(q.scales.iter().all(|&s| s == 0.0), "bits {bits}: constant groups get scale 0");
                assert!(q.symbols.iter().all(|&s| s == 0), "bits {bits}: constant groups get symbol 0");
                assert_eq!(q.biases, values);
                assert_eq!(q.dequantize(), w, "bits {bits} group {group_size} {scale_dtype:?}");
            }
        }
    }
}

#[test]
fn constant_group_in_its_own_dtype_is_exact() {
    // Any f32 constant is exact with f32 scales; any f16 constant with f16 scales; bf16 likewise.
    let c = 0.123_456_79f32;
    let q = quantize(&[c; 64], 1, 64, QuantConfig::for_input::<f32>()).unwrap();
    assert_eq!((q.scales[0], q.biases[0], q.dequantize()), (0.0, c, vec![c; 64]));

    let h = f16::from_f32(c);
    let q = quantize_f16(&[h; 64], 1, 64, QuantConfig::for_input::<f16>()).unwrap();
    assert_eq!((q.scales[0], q.dequantize()), (0.0, vec![h.to_f32(); 64]));

    let b = bf16::from_f32(c);
    let q = quantize_bf16(&[b; 64], 1, 64, QuantConfig::for_input::<bf16>()).unwrap();
    assert_eq!((q.scales[0], q.dequantize()), (0.0, vec![b.to_f32(); 64]));
}

#[test]
fn constant_group_outside_the_storage_dtype_stays_within_half_a_scale() {
    // 0.1 has no f16: the general rule applies (bias below, a tiny scale) and the bound still holds.
    let w = [0.1f32; 64];
    let q = quantize(&w, 1, 64, QuantConfig::default()).unwrap();
    assert!(q.scales[0] > 0.0);
    check_quantized(&w, &q);
    let err = (q.dequantize()[0] as f64 - 0.1f32 as f64).abs();
    assert!(err <= f16::from_f32(0.1).to_f32() as f64 * f16::EPSILON.to_f64(), "error {err} above one f16 ulp");
}

/// f16/bf16 input quantizes exactly like the same values given as f32, for every configuration.
fn same_as_f32<T: QuantInput + Copy>(from: impl Fn(f32) -> T, quant: impl Fn(&[T], QuantConfig) -> QuantizedMatrix) {
    let (rows, cols) = (3, 256);
    for bits in SUPPORTED_BITS {
        for group_size in SUPPORTED_GROUP_SIZES {
            let w: Vec<T> = matrix(rows, cols, bits as u64).into_iter().map(&from).collect();
            let as_f32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let config = QuantConfig { bits, group_size, scale_dtype: T::NATURAL_SCALE_DTYPE };
            let q = quant(&w, config);
            assert_eq!(q, quantize(&as_f32, rows, cols, config).unwrap());
            check_quantized(&as_f32, &q);
        }
    }
}

#[test]
fn f16_input() {
    same_as_f32(f16::from_f32, |w, c| quantize_f16(w, 3, 256, c).unwrap());
}

#[test]
fn bf16_input() {
    same_as_f32(bf16::from_f32, |w, c| quantize_bf16(w, 3, 256, c).unwrap());
}

#[test]
fn generic_entry_point_matches() {
    let w: Vec<f16> = matrix(2, 128, 9).into_iter().map(f16::from_f32).collect();
    let c = QuantConfig::for_input::<f16>();
    assert_eq!(quantize_slice(&w, 2, 128, c).unwrap(), quantize_f16(&w, 2, 128, c).unwrap());
}

fn is_invalid_parameter(r: ecq::Result<QuantizedMatrix>, name: &str) -> bool {
    matches!(r, Err(Error::InvalidParameter { name: n, .. }) if n == name)
}

#[test]
fn non_finite_input_is_a_typed_error() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.5f32; 128];
        w[77] = bad;
        assert!(is_invalid_parameter(quantize(&w, 2, 64, QuantConfig::default()), "weights"), "{bad}");
        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        assert!(is_invalid_parameter(quantize_f16(&h, 2, 64, QuantConfig::default()), "weights"), "{bad}");
        let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        assert!(is_invalid_parameter(quantize_bf16(&b, 2, 64, QuantConfig::default()), "weights"), "{bad}");
    }
}

#[test]
fn bad_shapes_are_typed_errors() {
    let w = vec![0.5f32; 256];
    let c = QuantConfig::default();
    assert!(matches!(quantize(&w, 3, 64, c), Err(Error::ShapeMismatch { expected: 192, actual: 256, .. })));
    assert!(is_invalid_parameter(quantize(&w, 4, 64, QuantConfig { group_size: 128, ..c }), "cols"));
    assert!(is_invalid_parameter(quantize(&w, 8, 32, QuantConfig { group_size: 64, ..c }), "cols"));
    assert!(matches!(quantize(&w, usize::MAX, 64, c), Err(Error::InvalidParameter { name: "shape", .. })));
}

#[test]
fn unsupported_settings_are_typed_errors() {
    let w = vec![0.5f32; 256];
    for bits in [0, 1, 7, 9, 16] {
        assert!(is_invalid_parameter(quantize(&w, 2, 128, QuantConfig { bits, ..Default::default() }), "bits"));
    }
    for group_size in [0, 16, 48, 256] {
        let c = QuantConfig { group_size, ..Default::default() };
        assert!(is_invalid_parameter(quantize(&w, 1, 256, c), "group_size"), "{group_size}");
    }
}

#[test]
fn values_f16_cannot_hold_are_a_typed_error() {
    // The bias would overflow f16.
    let w = vec![-1e6f32; 64];
    assert!(is_invalid_parameter(quantize(&w, 1, 64, QuantConfig::default()), "weights"));
    // The bias fits but the scale does not: (1e6 - 0) / 3 > 65504.
    let mut w = vec![0f32; 64];
    w[5] = 1e6;
    assert!(is_invalid_parameter(quantize(&w, 1, 64, QuantConfig { bits: 2, ..Default::default() }), "weights"));
    // With f32 scales both are fine.
    let q = quantize(&w, 1, 64, QuantConfig { bits: 2, group_size: 64, scale_dtype: ScaleDtype::F32 }).unwrap();
    check_quantized(&w, &q);
}

fn config_strategy() -> impl Strategy<Value = QuantConfig> {
    (prop::sample::select(SUPPORTED_BITS.to_vec()), prop::sample::select(SUPPORTED_GROUP_SIZES.to_vec()), 0..3usize)
        .prop_map(|(bits, group_size, d)| QuantConfig { bits, group_size, scale_dtype: DTYPES[d] })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random shapes and value ranges: every invariant holds for every configuration.
    #[test]
    fn random_matrices_keep_the_bound(
        config in config_strategy(),
        rows in 1usize..5,
        groups in 1usize..4,
        center in -100.0f32..100.0,
        spread in prop::sample::select(vec![0.0f32, 1e-7, 1e-3, 0.02, 1.0, 50.0]),
        seed in any::<u64>(),
    ) {
        let cols = groups * config.group_size;
        let w: Vec<f32> = matrix(rows, cols, seed).iter().map(|&v| center + spread * v).collect();
        let q = quantize(&w, rows, cols, config).unwrap();
        check_quantized(&w, &q);
    }

    /// Arbitrary finite bit patterns within f16 range, quantized with f16 scales.
    #[test]
    fn arbitrary_f16_values(bits_in in prop::collection::vec(any::<u16>(), 64), config in config_strategy()) {
        let w: Vec<f16> = bits_in.iter().map(|&b| f16::from_bits(b)).map(|v| if v.is_finite() { v } else { f16::ONE }).collect();
        let group_size = 32;
        let config = QuantConfig { group_size, scale_dtype: ScaleDtype::F32, ..config };
        let q = quantize_f16(&w, 2, group_size, config).unwrap();
        check_quantized(&w.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), &q);
    }
}

#[test]
fn the_first_group_f16_cannot_hold_is_named() {
    // Groups 3 and 40 overflow f16; the error names group 3 whatever the thread count.
    let mut w = vec![0.5f32; 64 * 64];
    w[3 * 64 + 1] = 1e6;
    w[40 * 64 + 7] = -1e6;
    match quantize(&w, 2, 2048, QuantConfig::default()) {
        Err(Error::InvalidParameter { name: "weights", reason }) => {
            assert!(reason.starts_with("group 3 (row 0)"), "{reason}")
        }
        other => panic!("expected an error naming group 3, got {other:?}"),
    }
}
