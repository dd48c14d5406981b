//! MLX affine-quantized weights (`mlx.nn.QuantizedLinear`) to and from [`QuantizedMatrix`], bit-exact both ways.
//!
//! MLX stores a quantized `rows x cols` weight `stem` as three safetensors arrays:
//! - `stem.weight`: `U32`, shape `[rows, cols * bits / 32]`, each row a little-endian bit stream (symbol `i` at
//!   bit `i * bits`), as [`pack_mlx`] writes it;
//! - `stem.scales` and `stem.biases`: `F16`, `BF16` or `F32`, shape `[rows, groups]`, with
//!   `group_size = cols / groups` and `w = scale * q + bias`.
//!
//! The bit width is not recorded in the arrays (MLX keeps it in `config.json`), so it is passed in.

use std::borrow::Cow;

use half::{bf16, f16};
use safetensors::tensor::View;

use super::safetensors_file::{Dtype, SafetensorsFile, TensorView};
use crate::error::{Error, Result};
use crate::quant::{pack_mlx, unpack_mlx, QuantizedMatrix, ScaleDtype};

/// One array ready to be written to safetensors: dtype, shape (outermost first) and little-endian bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlxArray {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Little-endian element bytes, `product(shape) * dtype.size()`.
    pub data: Vec<u8>,
}

impl MlxArray {
    /// The array as a [`TensorView`], as [`import_mlx`] takes it.
    pub fn view(&self) -> TensorView<'_> {
        TensorView { dtype: self.dtype, shape: &self.shape, data: &self.data }
    }
}

/// So that `safetensors::serialize` can write the arrays directly.
impl View for &MlxArray {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The three arrays MLX stores for one quantized weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlxQuantized {
    /// Packed symbols, `U32 [rows, cols * bits / 32]`.
    pub weight: MlxArray,
    /// Scales, `[rows, groups]`.
    pub scales: MlxArray,
    /// Biases, `[rows, groups]`.
    pub biases: MlxArray,
}

impl MlxQuantized {
    /// The arrays under their MLX names, `stem.weight`, `stem.scales` and `stem.biases`, for
    /// `safetensors::serialize`.
    pub fn named(&self, stem: &str) -> [(String, &MlxArray); 3] {
        [
            (format!("{stem}.weight"), &self.weight),
            (format!("{stem}.scales"), &self.scales),
            (format!("{stem}.biases"), &self.biases),
        ]
    }
}

/// The scale dtype MLX arrays of `dtype` hold, or `None` if MLX scales cannot have that dtype.
pub fn scale_dtype_of(dtype: Dtype) -> Option<ScaleDtype> {
    dtype.to_scale_dtype()
}

/// Imports the MLX arrays of quantized weight `stem` (used in error messages) with `bits` bits per symbol.
///
/// Checks dtypes (`U32` weight; scales and biases of one dtype among `F16`, `BF16`, `F32`), shapes
/// (2-D, matching rows, `groups` dividing the columns), byte lengths, and that every scale and bias is finite.
pub fn import_mlx(
    stem: &str,
    weight: &TensorView<'_>,
    scales: &TensorView<'_>,
    biases: &TensorView<'_>,
    bits: u32,
) -> Result<QuantizedMatrix> {
    if !(1..=8).contains(&bits) {
        return Err(Error::param("bits", format!("{bits} is outside 1..=8")));
    }
    if weight.dtype != Dtype::U32 {
        return Err(Error::UnsupportedDtype {
            name: format!("{stem}.weight"),
            dtype: weight.dtype.to_string(),
            hint: "MLX quantized weights are U32 words of packed symbols".into(),
        });
    }
    let scale_dtype = scale_dtype_of(scales.dtype).ok_or_else(|| Error::UnsupportedDtype {
        name: format!("{stem}.scales"),
        dtype: scales.dtype.to_string(),
        hint: "MLX scales are F16, BF16 or F32".into(),
    })?;
    if biases.dtype != scales.dtype {
        return Err(Error::UnsupportedDtype {
            name: format!("{stem}.biases"),
            dtype: biases.dtype.to_string(),
            hint: format!("biases must have the scales' dtype, {}", scales.dtype),
        });
    }
    let (rows, words_per_row) = matrix_dims(&format!("{stem}.weight"), weight.shape)?;
    let (scale_rows, groups) = matrix_dims(&format!("{stem}.scales"), scales.shape)?;
    if biases.shape != scales.shape {
        return Err(Error::file(format!(
            "{stem}.biases has shape {:?} but {stem}.scales has {:?}; they must match",
            biases.shape, scales.shape
        )));
    }
    if scale_rows != rows {
        return Err(Error::ShapeMismatch {
            what: format!("rows of {stem}.scales"),
            expected: rows,
            actual: scale_rows,
        });
    }
    if (words_per_row * 32) % bits as usize != 0 {
        return Err(Error::file(format!(
            "{stem}.weight rows of {words_per_row} words do not hold whole {bits}-bit symbols; is `bits` right?"
        )));
    }
    let cols = words_per_row * 32 / bits as usize;
    if groups == 0 || cols % groups != 0 {
        return Err(Error::file(format!(
            "{stem}: {cols} columns ({words_per_row} words of {bits}-bit symbols) do not split into {groups} groups; \
             is `bits` right?"
        )));
    }
    let words = le_words(&format!("{stem}.weight"), weight.data, rows * words_per_row)?;
    let symbols = unpack_mlx(&words, cols, bits)?;
    let scale_values = le_floats(&format!("{stem}.scales"), scales.data, rows * groups, scale_dtype)?;
    let bias_values = le_floats(&format!("{stem}.biases"), biases.data, rows * groups, scale_dtype)?;
    let q = QuantizedMatrix {
        rows,
        cols,
        bits,
        group_size: cols / groups,
        symbols,
        scales: scale_values,
        biases: bias_values,
        scale_dtype,
    };
    q.validate()?;
    Ok(q)
}

/// Imports `stem.weight`, `stem.scales` and `stem.biases` from a safetensors file (see [`import_mlx`]).
pub fn import_mlx_from(file: &SafetensorsFile, stem: &str, bits: u32) -> Result<QuantizedMatrix> {
    let get = |suffix: &str| file.view(&format!("{stem}.{suffix}"));
    import_mlx(stem, &get("weight")?, &get("scales")?, &get("biases")?, bits)
}

/// Exports a quantized matrix as the three MLX arrays; [`import_mlx`] of the result gives `q` back exactly.
/// `cols * bits` must be a multiple of 32 (true for every group size of at least 32).
pub fn export_mlx(q: &QuantizedMatrix) -> Result<MlxQuantized> {
    q.validate()?;
    let words = pack_mlx(&q.symbols, q.cols, q.bits)?;
    let groups = q.groups_per_row();
    let weight = MlxArray {
        dtype: Dtype::U32,
        shape: vec![q.rows, q.cols * q.bits as usize / 32],
        data: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    };
    let floats = |values: &[f32]| -> Result<MlxArray> {
        if let Some(x) = values.iter().find(|&&x| !x.is_finite() || q.scale_dtype.round(x).to_bits() != x.to_bits()) {
            return Err(Error::param(
                "scales",
                format!("{x} is not a finite value representable in {}", q.scale_dtype.name()),
            ));
        }
        let data = match q.scale_dtype {
            ScaleDtype::F16 => values.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            ScaleDtype::Bf16 => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            ScaleDtype::F32 => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        };
        Ok(MlxArray { dtype: q.scale_dtype.into(), shape: vec![q.rows, groups], data })
    };
    Ok(MlxQuantized { weight, scales: floats(&q.scales)?, biases: floats(&q.biases)? })
}

fn matrix_dims(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [rows, cols] => Ok((rows, cols)),
        _ => Err(Error::file(format!("{name} has shape {shape:?}; MLX quantized arrays are 2-D [rows, n]"))),
    }
}

fn le_words(name: &str, data: &[u8], expected: usize) -> Result<Vec<u32>> {
    if data.len() != expected * 4 {
        return Err(Error::ShapeMismatch {
            what: format!("bytes of {name}"),
            expected: expected * 4,
            actual: data.len(),
        });
    }
    Ok(data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn le_floats(name: &str, data: &[u8], expected: usize, dtype: ScaleDtype) -> Result<Vec<f32>> {
    let size = dtype.size();
    if data.len() != expected * size {
        return Err(Error::ShapeMismatch {
            what: format!("bytes of {name}"),
            expected: expected * size,
            actual: data.len(),
        });
    }
    let values: Vec<f32> = match dtype {
        ScaleDtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ScaleDtype::Bf16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ScaleDtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    };
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(Error::file(format!("{name} value {i} is {}; scales and biases must be finite", values[i])));
    }
    Ok(values)
}
