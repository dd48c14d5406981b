//! GGUF reader (versions 2 and 3) over a memory map, and lossless import of Q4_0, Q4_1 and Q8_0 tensors.
//!
//! READ ME FIRST
//! - Everything in the file is validated before it is used: magic, version, every count (bounded by the bytes
//!   left in the file before anything is allocated), every string (length in range, UTF-8 where it is kept),
//!   every metadata value type (arrays nest, at most [`MAX_ARRAY_DEPTH`] deep), every tensor info (name, at
//!   most four dims, type, offset), `general.alignment`, and every tensor's data range (aligned, inside the
//!   file, not overlapping another tensor, its size consistent with type and shape).
//! - GGUF lists dims innermost first: `ne0` is the contiguous dimension (columns, `K`), `ne1` the rows (`N`).
//!   [`GgufTensorInfo::shape`] gives the safetensors order, outermost first (`[N, K]` for a matrix).
//! - A tensor whose type this module cannot import (Q6_K, ...) is still listed; asking for its values gives
//!   [`Error::UnsupportedDtype`] naming the tensor and the type. A type id unknown to this build is listed
//!   too, but its size cannot be checked.
//!
//! Lossless import into [`QuantizedMatrix`] (`w = scale * q + bias`, groups of 32, f16 scales):
//! - Q4_1 (20 bytes: `d` f16, `m` f16, `qs[16]`): weight `j < 16` is the low nibble of `qs[j]`, weight
//!   `j + 16` the high nibble. `w = d * q + m`, so `scale = d`, `bias = m`.
//! - Q4_0 (18 bytes: `d` f16, `qs[16]`, same nibble order): `w = d * (q - 8)`, so `scale = d`,
//!   `bias = -8 d` (exact in f16 unless it overflows, which is an error).
//! - Q8_0 (34 bytes: `d` f16, `qs[32]` int8): `w = d * qs`, so symbol `q = qs + 128` (8 bits), `scale = d`,
//!   `bias = -128 d` (checked exact the same way).
//!
//! Dequantizing the imported matrix reproduces llama.cpp's f32 weights exactly (up to the sign of a zero
//! weight: `d * q + bias` gives `+0` where `d * (q - 8)` gives `-0` for negative `d`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

use super::safetensors_file::{release_pages, Dtype};

use crate::error::{Error, Result};
use crate::quant::{QuantizedMatrix, ScaleDtype};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dims a GGUF tensor may have.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays this reader accepts (arrays of arrays of ...).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Weights per block of Q4_0, Q4_1 and Q8_0, which is also the group size of the imported matrix.
pub const GGUF_BLOCK: usize = 32;

/// A ggml tensor type id, as written in a GGUF tensor info.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// Known ggml types: (id, name, weights per block, bytes per block).
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// 32-bit float.
    pub const F32: Self = Self(0);
    /// IEEE half precision.
    pub const F16: Self = Self(1);
    /// 4-bit, `w = d * (q - 8)`, blocks of 32.
    pub const Q4_0: Self = Self(2);
    /// 4-bit, `w = d * q + m`, blocks of 32.
    pub const Q4_1: Self = Self(3);
    /// 8-bit, `w = d * q` with signed `q`, blocks of 32.
    pub const Q8_0: Self = Self(8);
    /// 6-bit k-quant (listed, not importable).
    pub const Q6_K: Self = Self(14);
    /// bfloat16.
    pub const BF16: Self = Self(30);

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        GGML_TYPES.iter().find(|t| t.0 == self.0)
    }

    /// The ggml name (`Q4_1`, `Q6_K`, ...), or `None` for an id this build does not know.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|t| t.1)
    }

    /// Weights per block and bytes per block, or `None` for an id this build does not know.
    pub fn block(self) -> Option<(u64, u64)> {
        self.entry().map(|t| (t.2, t.3))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (type {})", self.0),
            None => write!(f, "unknown ggml type {}", self.0),
        }
    }
}

/// The value type of a GGUF metadata entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// `u8`.
    U8,
    /// `i8`.
    I8,
    /// `u16`.
    U16,
    /// `i16`.
    I16,
    /// `u32`.
    U32,
    /// `i32`.
    I32,
    /// `f32`.
    F32,
    /// One byte, 0 or 1.
    Bool,
    /// `u64` length and UTF-8 bytes.
    String,
    /// Element type, `u64` count and the elements.
    Array,
    /// `u64`.
    U64,
    /// `i64`.
    I64,
    /// `f64`.
    F64,
}

impl GgufValueType {
    fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a scalar of this type; `None` for strings and arrays.
    fn scalar_size(self) -> Option<usize> {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// Fewest bytes one value of this type occupies in the file (bounds counts before allocating).
    fn min_size(self) -> usize {
        match self {
            GgufValueType::String => 8,
            GgufValueType::Array => 12,
            t => t.scalar_size().unwrap_or(1),
        }
    }
}

/// A metadata value. Arrays are validated and skipped: only their element type and length are kept.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array, skipped: its element type and length.
    Array {
        /// Element type.
        elem: GgufValueType,
        /// Number of elements.
        len: u64,
    },
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's entry in the GGUF header, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dims as GGUF writes them, innermost first: `dims[0]` is `ne0`, the contiguous dimension.
    pub dims: Vec<u64>,
    /// ggml type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data, or `None` for a type id this build does not know.
    pub size: Option<u64>,
}

impl GgufTensorInfo {
    /// Shape outermost first, as safetensors writes it (`[rows, cols]` for a matrix).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (validated not to overflow when the file was opened).
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Columns `K` (`ne0`) and rows `N` (the product of the outer dims) of the tensor seen as a matrix.
    pub fn matrix_shape(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        let rows = self.dims.iter().skip(1).product::<u64>() as usize;
        (rows, cols)
    }
}

/// A tensor read out of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufTensor<'a> {
    /// A Q4_0, Q4_1 or Q8_0 tensor imported losslessly; `shape` is outermost first, and the matrix has
    /// `cols = shape[last]` and `rows` = the product of the others.
    Quantized {
        /// Shape outermost first.
        shape: Vec<usize>,
        /// Symbols, scales and biases.
        matrix: QuantizedMatrix,
    },
    /// An F32, F16 or BF16 tensor: its bytes as stored (little-endian), borrowed from the memory map.
    Raw {
        /// `F32`, `F16` or `BF16`.
        dtype: Dtype,
        /// Shape outermost first.
        shape: Vec<usize>,
        /// The data bytes.
        data: &'a [u8],
    },
}

/// A GGUF file, memory-mapped and validated.
///
/// ```no_run
/// use ecq::format::gguf::{GgufFile, GgufTensor};
/// use ecq::format::{EcTensor, EncodeOptions};
///
/// let model = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// for info in model.tensors() {
///     println!("{} {} {:?}", info.name, info.ggml_type, info.shape());
/// }
/// if let GgufTensor::Quantized { matrix, .. } = model.tensor("blk.0.ffn_up.weight")? {
///     let encoded = EcTensor::encode(&matrix, EncodeOptions::default())?;
///     assert_eq!(encoded.to_quantized()?, matrix);
/// }
/// # Ok::<(), ecq::Error>(())
/// ```
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and validates a GGUF file (see the module docs for what is checked).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 24 {
            return Err(Error::file(format!(
                "GGUF {}: file has {len} bytes, fewer than the 24-byte header",
                path.display()
            )));
        }
        // SAFETY: the map is read-only; like every memory-mapped reader, ecq assumes the file is not modified
        // while it is open. Every read below is bounds-checked against the map's length.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = parse(&map).map_err(|reason| Error::file(format!("GGUF {}: {reason}", path.display())))?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self {
            path,
            map,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version, 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Metadata entries in file order (arrays skipped: see [`GgufValue::Array`]).
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }
    /// The metadata value stored under `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor info for `name`.
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| Error::TensorNotFound(name.into()))
    }

    /// The raw data bytes of `name`, whatever its type (its size must be known).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name)?;
        let size = info.size.ok_or_else(|| unsupported(info))?;
        // In range: checked against the map's length when the file was opened.
        Ok(&self.map[info.offset as usize..(info.offset + size) as usize])
    }

    /// Tells the operating system that the mapped pages holding `name`'s data are not needed for now, so they
    /// stop counting towards resident memory; a later read maps them in from the file again. Converters call it
    /// after each tensor to keep memory bounded on models larger than RAM.
    pub fn release(&self, name: &str) -> Result<()> {
        let data = self.tensor_bytes(name)?;
        release_pages(&self.map, data);
        Ok(())
    }

    /// Reads `name`: Q4_0, Q4_1 and Q8_0 as a [`QuantizedMatrix`], F32, F16 and BF16 as raw bytes. Any other
    /// type is [`Error::UnsupportedDtype`].
    pub fn tensor(&self, name: &str) -> Result<GgufTensor<'_>> {
        let info = self.tensor_info(name)?;
        let shape = info.shape();
        let raw = |dtype| Ok(GgufTensor::Raw { dtype, shape: shape.clone(), data: self.tensor_bytes(name)? });
        match info.ggml_type {
            GgmlType::F32 => raw(Dtype::F32),
            GgmlType::F16 => raw(Dtype::F16),
            GgmlType::BF16 => raw(Dtype::BF16),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                Ok(GgufTensor::Quantized { matrix: self.quantized(name)?, shape })
            }
            _ => Err(unsupported(info)),
        }
    }

    /// Imports a Q4_0, Q4_1 or Q8_0 tensor losslessly (see the module docs for the mapping).
    pub fn quantized(&self, name: &str) -> Result<QuantizedMatrix> {
        let info = self.tensor_info(name)?;
        let block_bytes = match info.ggml_type {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            _ => return Err(unsupported(info)),
        };
        let (rows, cols) = info.matrix_shape();
        let data = self.tensor_bytes(name)?;
        // Checked at open: cols is a multiple of the block and the size is blocks * block_bytes.
        let blocks = rows * (cols / GGUF_BLOCK);
        debug_assert_eq!(data.len(), blocks * block_bytes);
        let mut symbols = vec![0u8; rows * cols];
        let mut scales = Vec::with_capacity(blocks);
        let mut biases = Vec::with_capacity(blocks);
        let bad_scale = |b: usize, what: &str, v: f32| {
            Error::file(format!(
                "GGUF {}: tensor `{name}` ({}) block {b}: {what} {v} cannot be stored exactly as an f16 scale/bias",
                self.path.display(),
                info.ggml_type
            ))
        };
        for (b, (block, q)) in data.chunks_exact(block_bytes).zip(symbols.chunks_exact_mut(GGUF_BLOCK)).enumerate() {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let (scale, bias, qs) = match info.ggml_type {
                GgmlType::Q4_1 => (d, f16::from_le_bytes([block[2], block[3]]).to_f32(), &block[4..]),
                GgmlType::Q4_0 => (d, -8.0 * d, &block[2..]),
                _ => (d, -128.0 * d, &block[2..]),
            };
            if !d.is_finite() {
                return Err(bad_scale(b, "d", d));
            }
            if !bias.is_finite() || ScaleDtype::F16.round(bias).to_bits() != bias.to_bits() {
                return Err(bad_scale(b, "bias", bias));
            }
            if info.ggml_type == GgmlType::Q8_0 {
                for (q, &s) in q.iter_mut().zip(qs) {
                    *q = (s as i8 as i16 + 128) as u8;
                }
            } else {
                for (j, &byte) in qs.iter().enumerate() {
                    q[j] = byte & 0x0f;
                    q[j + 16] = byte >> 4;
                }
            }
            scales.push(scale);
            biases.push(bias);
        }
        let bits = if info.ggml_type == GgmlType::Q8_0 { 8 } else { 4 };
        Ok(QuantizedMatrix {
            rows,
            cols,
            bits,
            group_size: GGUF_BLOCK,
            symbols,
            scales,
            biases,
            scale_dtype: ScaleDtype::F16,
        })
    }
}

pub(crate) fn unsupported(info: &GgufTensorInfo) -> Error {
    Error::UnsupportedDtype {
        name: info.name.clone(),
        dtype: info.ggml_type.to_string(),
        hint: "GGUF import reads F32, F16, BF16, Q4_0, Q4_1 and Q8_0; re-quantize the model to one of these \
               (llama-quantize ... Q4_1) or convert it from safetensors"
            .into(),
    }
}

/// What [`parse`] finds in the header.
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
}

/// A bounds-checked little-endian reader; every error says where and what was being read.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {} needs {n} bytes at offset {} but the file has {} bytes",
                what(),
                self.pos,
                self.buf.len()
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        Ok(self.bytes(N, what)?.try_into().expect("slice of length N"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_size` bytes each, bounded by the bytes left in the file.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize, String> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(format!(
                "{} is {n}, but the {} bytes left in the file hold at most {max}",
                what(),
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    /// A string's raw bytes (length bounded by the file).
    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "truncated or corrupt: {} claims {len} bytes at offset {} but only {} are left in the file",
                what(),
                self.pos,
                self.remaining()
            ));
        }
        self.bytes(len as usize, what)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let pos = self.pos;
        let bytes = self.string_bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| format!("{} at offset {pos} is not UTF-8 ({e})", what()))
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufValueType, String> {
        let id = self.u32(&|| format!("value type of {}", what()))?;
        GgufValueType::from_id(id)
            .ok_or_else(|| format!("{} has unknown value type {id} (GGUF defines 0..=12)", what()))
    }

    /// Reads one value of type `t`. Arrays are walked (every element validated) but not kept.
    fn value(&mut self, t: GgufValueType, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue, String> {
        use GgufValueType as T;
        Ok(match t {
            T::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            T::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T::U32 => GgufValue::U32(self.u32(what)?),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T::Bool => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("{} is a bool with byte value {b} (must be 0 or 1)", what())),
            },
            T::String => GgufValue::String(self.string(what)?),
            T::U64 => GgufValue::U64(self.u64(what)?),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("{} nests arrays deeper than {MAX_ARRAY_DEPTH}", what()));
                }
                let elem = self.value_type(&|| format!("element of {}", what()))?;
                let len = self.count(elem.min_size(), &|| format!("length of {}", what()))?;
                match elem.scalar_size() {
                    Some(size) => {
                        self.bytes(len * size, what)?;
                    }
                    None => {
                        for i in 0..len {
                            let item = || format!("element {i} of {}", what());
                            if elem == T::String {
                                // Skipped strings are only bounds-checked: tokenizer vocabularies may hold
                                // byte tokens that are not UTF-8 on their own.
                                self.string_bytes(&item)?;
                            } else {
                                self.value(elem, depth + 1, &item)?;
                            }
                        }
                    }
                }
                GgufValue::Array { elem, len: len as u64 }
            }
        })
    }
}

/// Parses and validates the header of a GGUF file held in `buf`; errors are plain reasons.
fn parse(buf: &[u8]) -> Result<Header, String> {
    let mut r = Reader { buf, pos: 0 };
    let magic: [u8; 4] = r.array(&|| "magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""));
    }
    let version = r.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (this reader handles versions 2 and 3)".into()),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err("big-endian GGUF is not supported; convert the model to a little-endian GGUF".into())
        }
        v => return Err(format!("unknown GGUF version {v} (this reader handles versions 2 and 3)")),
    }
    // Bounds: a tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes, and a
    // metadata entry at least 8 (key length) + 4 (type) + 1 (value) bytes.
    let tensor_count = r.u64(&|| "tensor count".into())?;
    let kv_count = r.count(13, &|| "metadata entry count".into())?;
    if tensor_count > (r.remaining() / 24) as u64 {
        return Err(format!("tensor count {tensor_count} cannot fit in the {} bytes left in the file", r.remaining()));
    }
    let tensor_count = tensor_count as usize;

    let mut metadata = Vec::with_capacity(kv_count);
    let mut keys = HashSet::with_capacity(kv_count);
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..kv_count {
        let key = r.string(&|| format!("key of metadata entry {i}"))?;
        let what = || format!("metadata `{key}`");
        let t = r.value_type(&what)?;
        let value = r.value(t, 0, &what)?;
        if key == "general.alignment" {
            alignment = match value {
                GgufValue::U32(a) if a > 0 && a.is_power_of_two() => a.into(),
                ref v => return Err(format!("general.alignment must be a u32 power of two, got {v:?}")),
            };
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }

    let mut tensors = Vec::with_capacity(tensor_count);
    let mut names = HashSet::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = r.string(&|| format!("name of tensor {i}"))?;
        let what = |field: &str| format!("{field} of tensor `{name}`");
        let n_dims = r.u32(&|| what("n_dims"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dims; GGUF allows at most {MAX_DIMS}"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = r.u64(&|| what(&format!("dim {d}")))?;
            if dim > i64::MAX as u64 {
                return Err(format!("tensor `{name}` dim {d} is {dim}, beyond the signed 64-bit range"));
            }
            dims.push(dim);
        }
        let ggml_type = GgmlType(r.u32(&|| what("type"))?);
        let rel_offset = r.u64(&|| what("offset"))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor name `{name}` appears twice"));
        }
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let elements = elements
            .filter(|&n| n <= isize::MAX as u64)
            .ok_or_else(|| format!("tensor `{name}` dims {dims:?} have too many elements"))?;
        let size = match ggml_type.block() {
            None => None,
            Some((block, bytes)) => {
                let ne0 = dims.first().copied().unwrap_or(1);
                if ne0 % block != 0 {
                    return Err(format!(
                        "tensor `{name}` is {ggml_type} with {ne0} columns (ne0), not a multiple of its block of \
                         {block}"
                    ));
                }
                Some((elements / block).checked_mul(bytes).ok_or_else(|| format!("tensor `{name}` is too large"))?)
            }
        };
        if rel_offset % alignment != 0 {
            return Err(format!(
                "tensor `{name}` data offset {rel_offset} is not a multiple of the alignment {alignment}"
            ));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset: rel_offset, size });
    }

    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    if !tensors.is_empty() && data_offset > file_len {
        return Err(format!("tensor data should start at offset {data_offset} but the file has {file_len} bytes"));
    }
    for t in &mut tensors {
        let start = data_offset.checked_add(t.offset).filter(|&s| s <= file_len).ok_or_else(|| {
            format!(
                "tensor `{}` data offset {} (absolute {}) lies past the end of the {file_len}-byte file",
                t.name,
                t.offset,
                data_offset as u128 + t.offset as u128
            )
        })?;
        if let Some(size) = t.size {
            if size > file_len - start {
                return Err(format!(
                    "tensor `{}` ({}, dims {:?}) needs {size} bytes at offset {start}, but the file has only {} \
                     bytes left: truncated, or dims or offset are wrong",
                    t.name,
                    t.ggml_type,
                    t.dims,
                    file_len - start
                ));
            }
        }
        t.offset = start;
    }
    // No two tensors' data may overlap.
    let mut ranges: Vec<(u64, u64, &str)> =
        tensors.iter().filter_map(|t| t.size.map(|s| (t.offset, t.offset + s, t.name.as_str()))).collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!(
                "tensor `{}` data (offset {}) overlaps tensor `{}` (bytes {}..{})",
                w[1].2, w[1].0, w[0].2, w[0].0, w[0].1
            ));
        }
    }
    Ok(Header { version, alignment, data_offset, metadata, tensors })
}
