//! Affine group quantization in the MLX convention, `w = scale * q + bias`, and MLX bit packing.
//!
//! Each row is cut into groups of `group_size` columns (32, 64 or 128) and each weight becomes a symbol of
//! `bits` bits (2, 3, 4, 5, 6 or 8); the defaults are MLX's, 4 bits and groups of 64. Inputs are `f32`,
//! `f16` or `bf16` ([`quantize`], [`quantize_f16`], [`quantize_bf16`]); scales and biases are stored in a
//! [`ScaleDtype`], naturally the dtype of the input ([`QuantConfig::for_input`]).
//!
//! # The rule
//! A group with minimum `lo` and maximum `hi` gets `scale = (hi - lo) / (2^bits - 1)` and `bias = lo`, made
//! representable in the storage dtype with directed rounding: `bias` is `lo` rounded *down*, and `scale` is
//! the smallest storage value with `bias + (2^bits - 1) * scale >= hi`. Symbols are
//! `q = clamp(round((w - bias) / scale), 0, 2^bits - 1)`, computed with the stored values. So every weight
//! lies in `[bias, bias + (2^bits - 1) * scale]` and dequantizing what is stored is within `scale / 2` of the
//! input (up to `f32` rounding of `scale * q + bias`), whatever the storage dtype.
//!
//! Constant groups: when `hi` equals the rounded-down `bias` (a constant group whose value the storage dtype
//! holds exactly, always the case when scales have the input's dtype), the group is stored as `scale = 0`,
//! `bias = value`, all symbols 0, and dequantizes exactly. A constant group whose value the storage dtype
//! cannot hold follows the general rule (a tiny positive scale), within `scale / 2` of its value.
//!
//! Errors: non-finite weights, shapes that do not match, a column count that is not a multiple of the group
//! size, and groups whose bias or scale overflow the storage dtype (f16 tops out at 65504) are typed errors.
//!
//! GGUF Q4_0 (`bias = -8 d`) and Q4_1 (`scale = d`, `bias = m`) map onto this representation exactly with
//! group 32.
//!
//! # Packing
//! [`pack_mlx`] stores each row as one little-endian bit stream in `u32` words, symbol `i` at bit `i * bits`
//! (4-bit: symbol 0 in the low nibble of word 0). For 3, 5 and 6 bits symbols straddle word boundaries; this
//! is the same byte sequence MLX writes with its 3- and 5-byte packs.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Bit widths the quantizer produces.
pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes the quantizer produces.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];
/// The largest of [`SUPPORTED_GROUP_SIZES`].
const MAX_GROUP_SIZE: usize = 128;

/// The dtype scales and biases are stored in. Values held in memory as `f32` are always exactly
/// representable in it, so storing and loading is lossless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ScaleDtype {
    /// 32-bit float.
    F32,
    /// IEEE half precision (the MLX default for f16 models, and GGUF's `d` and `m`).
    #[default]
    F16,
    /// bfloat16.
    Bf16,
}

impl ScaleDtype {
    /// Rounds `v` to the nearest value representable in this dtype (ties to even).
    pub fn round(self, v: f32) -> f32 {
        match self {
            ScaleDtype::F32 => v,
            ScaleDtype::F16 => f16::from_f32(v).to_f32(),
            ScaleDtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }

    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            ScaleDtype::F32 => 4,
            ScaleDtype::F16 | ScaleDtype::Bf16 => 2,
        }
    }

    /// The safetensors dtype name: `F32`, `F16` or `BF16`.
    pub fn name(self) -> &'static str {
        match self {
            ScaleDtype::F32 => "F32",
            ScaleDtype::F16 => "F16",
            ScaleDtype::Bf16 => "BF16",
        }
    }
}

/// Quantizer settings. The default is MLX's: 4 bits, groups of 64, f16 scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantConfig {
    /// Bits per weight, one of [`SUPPORTED_BITS`].
    pub bits: u32,
    /// Columns per group, one of [`SUPPORTED_GROUP_SIZES`].
    pub group_size: usize,
    /// Storage dtype of scales and biases.
    pub scale_dtype: ScaleDtype,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self { bits: 4, group_size: 64, scale_dtype: ScaleDtype::F16 }
    }
}

impl QuantConfig {
    /// Checks bits and group size against what the quantizer supports.
    pub fn validate(&self) -> Result<()> {
        if !SUPPORTED_BITS.contains(&self.bits) {
            return Err(Error::param("bits", format!("{} is not one of {SUPPORTED_BITS:?}", self.bits)));
        }
        if !SUPPORTED_GROUP_SIZES.contains(&self.group_size) {
            return Err(Error::param(
                "group_size",
                format!("{} is not one of {SUPPORTED_GROUP_SIZES:?}", self.group_size),
            ));
        }
        Ok(())
    }
}

/// A quantized `rows x cols` matrix: one symbol per weight plus a scale and bias per group.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    /// Rows `N` (output features).
    pub rows: usize,
    /// Columns `K` (input features), a multiple of `group_size`.
    pub cols: usize,
    /// Bits per symbol, `1..=8`.
    pub bits: u32,
    /// Columns per group.
    pub group_size: usize,
    /// Row-major symbols, `rows * cols`, each `< 2^bits`.
    pub symbols: Vec<u8>,
    /// Row-major `rows x cols / group_size` scales, exactly representable in `scale_dtype`.
    pub scales: Vec<f32>,
    /// Row-major `rows x cols / group_size` biases, exactly representable in `scale_dtype`.
    pub biases: Vec<f32>,
    /// Storage dtype of scales and biases.
    pub scale_dtype: ScaleDtype,
}

impl QuantizedMatrix {
    /// Groups per row, `cols / group_size`.
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// Checks that every array has the size the shape implies and every symbol fits in `bits`.
    pub fn validate(&self) -> Result<()> {
        if !(1..=8).contains(&self.bits) {
            return Err(Error::param("bits", format!("{} is outside 1..=8", self.bits)));
        }
        if self.group_size == 0 || self.cols % self.group_size != 0 {
            return Err(Error::param(
                "group_size",
                format!("{} columns are not a multiple of group size {}", self.cols, self.group_size),
            ));
        }
        let n = self.rows.checked_mul(self.cols).ok_or_else(|| Error::param("shape", "rows * cols overflows"))?;
        let g = self.rows * self.groups_per_row();
        for (what, len, expected) in
            [("symbols", self.symbols.len(), n), ("scales", self.scales.len(), g), ("biases", self.biases.len(), g)]
        {
            if len != expected {
                return Err(Error::ShapeMismatch { what: what.into(), expected, actual: len });
            }
        }
        let max = (1u32 << self.bits) - 1;
        if let Some(&q) = self.symbols.iter().find(|&&q| q as u32 > max) {
            return Err(Error::param("symbols", format!("symbol {q} does not fit in {} bits", self.bits)));
        }
        Ok(())
    }

    /// The weights these symbols stand for, `scale * q + bias`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (g, chunk) in out.chunks_exact_mut(self.group_size).enumerate() {
            let (scale, bias) = (self.scales[g], self.biases[g]);
            let q = &self.symbols[g * self.group_size..(g + 1) * self.group_size];
            for (w, &q) in chunk.iter_mut().zip(q) {
                *w = scale * q as f32 + bias;
            }
        }
        out
    }
}

/// An element type the quantizer accepts: `f32`, [`half::f16`] or [`half::bf16`].
pub trait QuantInput: Copy + Send + Sync {
    /// The scale dtype that matches this input (what MLX stores: scales in the dtype of the weights).
    const NATURAL_SCALE_DTYPE: ScaleDtype;
    /// The value as `f32` (exact for all three input types).
    fn to_f32(self) -> f32;
}

impl QuantInput for f32 {
    const NATURAL_SCALE_DTYPE: ScaleDtype = ScaleDtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
}

impl QuantInput for f16 {
    const NATURAL_SCALE_DTYPE: ScaleDtype = ScaleDtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl QuantInput for bf16 {
    const NATURAL_SCALE_DTYPE: ScaleDtype = ScaleDtype::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl QuantConfig {
    /// MLX's defaults (4 bits, groups of 64) with scales stored in the dtype of the input `T`.
    pub fn for_input<T: QuantInput>() -> Self {
        Self { scale_dtype: T::NATURAL_SCALE_DTYPE, ..Self::default() }
    }
}

/// Quantizes a row-major `rows x cols` matrix of `f32`. `cols` must be a multiple of the group size and every
/// weight finite. See the module documentation for the rule.
pub fn quantize(weights: &[f32], rows: usize, cols: usize, config: QuantConfig) -> Result<QuantizedMatrix> {
    quantize_slice(weights, rows, cols, config)
}

/// [`quantize`] for `f16` weights. [`QuantConfig::for_input::<f16>()`](QuantConfig::for_input) stores f16
/// scales, as MLX does.
pub fn quantize_f16(weights: &[f16], rows: usize, cols: usize, config: QuantConfig) -> Result<QuantizedMatrix> {
    quantize_slice(weights, rows, cols, config)
}

/// [`quantize`] for `bf16` weights. [`QuantConfig::for_input::<bf16>()`](QuantConfig::for_input) stores bf16
/// scales, as MLX does.
pub fn quantize_bf16(weights: &[bf16], rows: usize, cols: usize, config: QuantConfig) -> Result<QuantizedMatrix> {
    quantize_slice(weights, rows, cols, config)
}

/// [`quantize`] for any [`QuantInput`] element type.
pub fn quantize_slice<T: QuantInput>(
    weights: &[T],
    rows: usize,
    cols: usize,
    config: QuantConfig,
) -> Result<QuantizedMatrix> {
    config.validate()?;
    let gs = config.group_size;
    if cols % gs != 0 {
        return Err(Error::param(
            "cols",
            format!("{cols} columns are not a multiple of group size {gs}; pick a group size that divides it"),
        ));
    }
    let n = rows.checked_mul(cols).ok_or_else(|| Error::param("shape", "rows * cols overflows"))?;
    if weights.len() != n {
        return Err(Error::ShapeMismatch { what: "weights".into(), expected: n, actual: weights.len() });
    }
    if let Some(i) = weights.iter().position(|w| !w.to_f32().is_finite()) {
        return Err(Error::param("weights", format!("weight {i} (row {}) is not finite", i / cols.max(1))));
    }
    let dtype = config.scale_dtype;
    let levels = (1u32 << config.bits) - 1;
    let groups = n / gs;
    let mut symbols = vec![0u8; n];
    let mut scales = vec![0f32; groups];
    let mut biases = vec![0f32; groups];
    // Groups are independent: quantize them in parallel. A group whose scale or bias does not fit in `dtype`
    // is marked with a NaN scale and reported below (the first such group, whatever the thread count).
    symbols
        .par_chunks_exact_mut(gs)
        .zip(weights.par_chunks_exact(gs))
        .zip(scales.par_iter_mut().zip(biases.par_iter_mut()))
        .for_each(|((q, src), (scale_out, bias_out))| {
            // validate() bounds the group size by MAX_GROUP_SIZE.
            let mut buf = [0f32; MAX_GROUP_SIZE];
            let w = &mut buf[..gs];
            for (w, &v) in w.iter_mut().zip(src) {
                *w = v.to_f32();
            }
            let (lo, hi) = w.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let Some((scale, bias)) = group_params(lo, hi, levels, dtype) else {
                *scale_out = f32::NAN;
                return;
            };
            if scale > 0.0 {
                for (q, &v) in q.iter_mut().zip(w.iter()) {
                    *q = ((v - bias) / scale).round().clamp(0.0, levels as f32) as u8;
                }
            }
            *scale_out = scale;
            *bias_out = bias;
        });
    if let Some(g) = scales.iter().position(|s| s.is_nan()) {
        let w = &weights[g * gs..(g + 1) * gs];
        let lo = w.iter().map(|v| v.to_f32()).fold(f32::INFINITY, f32::min);
        let hi = w.iter().map(|v| v.to_f32()).fold(f32::NEG_INFINITY, f32::max);
        return Err(Error::param(
            "weights",
            format!(
                "group {g} (row {}) spans [{lo}, {hi}], which {} scales cannot hold; use ScaleDtype::F32",
                g * gs / cols.max(1),
                dtype.name()
            ),
        ));
    }
    Ok(QuantizedMatrix { rows, cols, bits: config.bits, group_size: gs, symbols, scales, biases, scale_dtype: dtype })
}

/// Scale and bias of a group with minimum `lo` and maximum `hi` (both finite): `bias` is `lo` rounded down to
/// `dtype`, `scale` the smallest `dtype` value with `bias + levels * scale >= hi`, or 0 when `hi == bias`.
/// `None` when either does not fit in `dtype`.
fn group_params(lo: f32, hi: f32, levels: u32, dtype: ScaleDtype) -> Option<(f32, f32)> {
    let bias = round_down(lo, dtype);
    if !bias.is_finite() {
        return None;
    }
    // The span in f64 is exact for any two f32 values, so the bound below is checked without rounding.
    let span = hi as f64 - bias as f64;
    if span == 0.0 {
        return Some((0.0, bias));
    }
    let mut scale = dtype.round((span / levels as f64) as f32);
    while (scale as f64) * (levels as f64) < span {
        scale = next_up(scale, dtype);
    }
    scale.is_finite().then_some((scale, bias))
}

/// The largest value of `dtype` that is `<= v`.
fn round_down(v: f32, dtype: ScaleDtype) -> f32 {
    let r = dtype.round(v);
    if r > v {
        -next_up(-r, dtype)
    } else {
        r
    }
}

/// The smallest value of `dtype` greater than `v` (`v` finite and representable in `dtype`).
fn next_up(v: f32, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F32 => next_up_bits(v.to_bits(), 32, f32::from_bits),
        ScaleDtype::F16 => next_up_bits(f16::from_f32(v).to_bits() as u32, 16, |b| f16::from_bits(b as u16).to_f32()),
        ScaleDtype::Bf16 => {
            next_up_bits(bf16::from_f32(v).to_bits() as u32, 16, |b| bf16::from_bits(b as u16).to_f32())
        }
    }
}

/// Next float up from the IEEE bit pattern `bits` of a `width`-bit float (sign in the top bit).
fn next_up_bits(bits: u32, width: u32, from: impl Fn(u32) -> f32) -> f32 {
    let sign = 1u32 << (width - 1);
    let next = if bits == sign {
        1 // -0 -> smallest positive subnormal
    } else if bits & sign == 0 {
        bits + 1
    } else {
        bits - 1
    };
    from(next)
}

/// Packs row-major symbols the MLX way: each row is a little-endian bit stream (symbol `i` of the row at bit
/// `i * bits`) stored in `u32` words, `cols * bits / 32` words per row. `cols * bits` must be a multiple of 32,
/// which holds for every group size of at least 32.
pub fn pack_mlx(symbols: &[u8], cols: usize, bits: u32) -> Result<Vec<u32>> {
    let words_per_row = mlx_words_per_row(cols, bits)?;
    if cols == 0 {
        return Ok(Vec::new());
    }
    if symbols.len() % cols != 0 {
        return Err(Error::param("symbols", format!("{} symbols are not whole rows of {cols}", symbols.len())));
    }
    let mut out = vec![0u32; symbols.len() / cols * words_per_row];
    for (row, packed) in symbols.chunks_exact(cols).zip(out.chunks_exact_mut(words_per_row)) {
        for (i, &q) in row.iter().enumerate() {
            let bit = i * bits as usize;
            let v = (q as u64) << (bit % 32);
            packed[bit / 32] |= v as u32;
            if bit % 32 + bits as usize > 32 {
                packed[bit / 32 + 1] |= (v >> 32) as u32;
            }
        }
    }
    Ok(out)
}

/// Inverse of [`pack_mlx`]: `words` holds whole rows of `cols * bits / 32` words each.
pub fn unpack_mlx(words: &[u32], cols: usize, bits: u32) -> Result<Vec<u8>> {
    let words_per_row = mlx_words_per_row(cols, bits)?;
    if words_per_row == 0 {
        return Ok(Vec::new());
    }
    if words.len() % words_per_row != 0 {
        return Err(Error::param("words", format!("{} words are not whole rows of {words_per_row}", words.len())));
    }
    let mask = (1u64 << bits) - 1;
    let mut out = vec![0u8; words.len() / words_per_row * cols];
    for (packed, row) in words.chunks_exact(words_per_row).zip(out.chunks_exact_mut(cols)) {
        for (i, q) in row.iter_mut().enumerate() {
            let bit = i * bits as usize;
            let lo = packed[bit / 32] as u64;
            let hi = packed.get(bit / 32 + 1).copied().unwrap_or(0) as u64;
            *q = (((lo | hi << 32) >> (bit % 32)) & mask) as u8;
        }
    }
    Ok(out)
}

/// `u32` words per packed row of `cols` symbols of `bits` bits.
pub fn mlx_words_per_row(cols: usize, bits: u32) -> Result<usize> {
    if !(1..=8).contains(&bits) {
        return Err(Error::param("bits", format!("{bits} is outside 1..=8")));
    }
    if (cols * bits as usize) % 32 != 0 {
        return Err(Error::param("cols", format!("{cols} columns of {bits} bits do not fill whole u32 words")));
    }
    Ok(cols * bits as usize / 32)
}
