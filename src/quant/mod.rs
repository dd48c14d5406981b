//! Affine group quantization in the MLX convention, `w = scale * q + bias`, and MLX bit packing.
//!
//! Each row is cut into groups of `group_size` columns. A group with minimum `lo` and maximum `hi` gets
//! `scale = (hi - lo) / (2^bits - 1)` and `bias = lo`, both rounded to the storage dtype first, and symbols
//! `q = clamp(round((w - bias) / scale), 0, 2^bits - 1)` computed with the rounded values, so that
//! dequantizing what is stored reproduces exactly what the quantizer meant. A constant group (`hi == lo`),
//! or one whose scale rounds to zero in the storage dtype, gets `scale = 0`, `bias = lo` and all symbols 0.
//!
//! GGUF Q4_0 (`bias = -8 d`) and Q4_1 (`scale = d`, `bias = m`) map onto this exactly with group 32.

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Bit widths the quantizer produces.
pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes the quantizer produces.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

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

/// Quantizes a row-major `rows x cols` matrix. `cols` must be a multiple of the group size and every weight
/// finite.
pub fn quantize(weights: &[f32], rows: usize, cols: usize, config: QuantConfig) -> Result<QuantizedMatrix> {
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
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(Error::param("weights", format!("weight {i} (row {}) is not finite", i / cols.max(1))));
    }
    let levels = ((1u32 << config.bits) - 1) as f32;
    let groups = n / gs;
    let mut symbols = vec![0u8; n];
    let mut scales = Vec::with_capacity(groups);
    let mut biases = Vec::with_capacity(groups);
    for (w, q) in weights.chunks_exact(gs).zip(symbols.chunks_exact_mut(gs)) {
        let (lo, hi) = w.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let bias = config.scale_dtype.round(lo);
        let scale = config.scale_dtype.round((hi - lo) / levels);
        if scale > 0.0 && scale.is_finite() {
            for (q, &v) in q.iter_mut().zip(w) {
                *q = ((v - bias) / scale).round().clamp(0.0, levels) as u8;
            }
            scales.push(scale);
        } else {
            scales.push(0.0);
        }
        biases.push(bias);
    }
    Ok(QuantizedMatrix {
        rows,
        cols,
        bits: config.bits,
        group_size: gs,
        symbols,
        scales,
        biases,
        scale_dtype: config.scale_dtype,
    })
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
