//! A validating, memory-mapped safetensors reader.
//!
//! The layout is `u64` little-endian header length `n`, `n` bytes of JSON, then the data section. The JSON maps
//! tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data section)
//! and may hold a `__metadata__` map of strings. [`SafetensorsFile::open`] checks all of it before any tensor
//! is touched: the header length against the file and [`MAX_HEADER_LEN`], the JSON, every dtype, that
//! `shape` times the dtype size equals the byte range, and that the ranges tile the data section exactly
//! (no overlap, no gap, nothing after the last tensor), as the safetensors specification requires.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
#[cfg(unix)]
use memmap2::UncheckedAdvice;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::quant::ScaleDtype;

/// Largest header accepted, in bytes (the limit the reference safetensors implementation uses).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Element type of a stored tensor, as named in the safetensors header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits.
    F8E5M2,
    /// 8-bit float, 4 exponent bits.
    F8E4M3,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// 32-bit float.
    F32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
}

impl Dtype {
    const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::U16,
        Dtype::I16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::U32,
        Dtype::I32,
        Dtype::F32,
        Dtype::U64,
        Dtype::I64,
        Dtype::F64,
    ];

    /// The name written in the header (`"F32"`, `"BF16"`, `"F8_E4M3"` ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::F32 => "F32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F64 => "F64",
        }
    }

    /// Parses a header dtype name; `None` for a name this build does not know.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The scale dtype this is, if it is one of F32, F16, BF16.
    pub fn to_scale_dtype(self) -> Option<ScaleDtype> {
        match self {
            Dtype::F32 => Some(ScaleDtype::F32),
            Dtype::F16 => Some(ScaleDtype::F16),
            Dtype::BF16 => Some(ScaleDtype::Bf16),
            _ => None,
        }
    }
}

impl From<ScaleDtype> for Dtype {
    fn from(d: ScaleDtype) -> Self {
        match d {
            ScaleDtype::F32 => Dtype::F32,
            ScaleDtype::F16 => Dtype::F16,
            ScaleDtype::Bf16 => Dtype::BF16,
        }
    }
}

impl From<Dtype> for safetensors::Dtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::Bool => safetensors::Dtype::BOOL,
            Dtype::U8 => safetensors::Dtype::U8,
            Dtype::I8 => safetensors::Dtype::I8,
            Dtype::F8E5M2 => safetensors::Dtype::F8_E5M2,
            Dtype::F8E4M3 => safetensors::Dtype::F8_E4M3,
            Dtype::U16 => safetensors::Dtype::U16,
            Dtype::I16 => safetensors::Dtype::I16,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::BF16 => safetensors::Dtype::BF16,
            Dtype::U32 => safetensors::Dtype::U32,
            Dtype::I32 => safetensors::Dtype::I32,
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::U64 => safetensors::Dtype::U64,
            Dtype::I64 => safetensors::Dtype::I64,
            Dtype::F64 => safetensors::Dtype::F64,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one tensor lies in a validated file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; their product times the dtype size is the byte length.
    pub shape: Vec<usize>,
    /// Byte range in the data section, `begin..end`.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements, the product of the shape.
    pub fn elements(&self) -> usize {
        // Checked against the byte length when the file was opened, so it cannot overflow.
        self.shape.iter().product()
    }
}

/// A tensor's bytes, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: &'a [usize],
    /// Little-endian element bytes, `elements * dtype.size()`. Not necessarily aligned to the element size.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The elements as `f32`, converting from F32, F16 or BF16.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.dtype {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    name: name.into(),
                    dtype: other.name().into(),
                    hint: "expected F32, F16 or BF16".into(),
                })
            }
        })
    }
}

/// A memory-mapped safetensors file whose header has been fully validated.
///
/// The file must not be modified while it is open (the map would change under the reader).
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (see the module documentation).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::file(format!("{len} bytes is too short for a safetensors file (at least 8)")));
        }
        // SAFETY: the map is read-only; the caller is told not to modify the file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let Header { data_start, tensors, metadata } = parse_header(&mmap)?;
        Ok(Self { path: path.to_path_buf(), mmap, data_start, tensors, metadata })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the data section in bytes (the file less its header), which the tensors cover exactly.
    pub fn data_len(&self) -> usize {
        self.mmap.len() - self.data_start
    }

    /// Every tensor, by name (sorted).
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Where tensor `name` lies.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::TensorNotFound(name.into()))
    }

    /// Tells the operating system that the mapped pages of tensor `name` are not needed for now, so they stop
    /// counting towards resident memory; a later [`view`](Self::view) maps them in from the file again.
    pub fn release(&self, name: &str) -> Result<()> {
        let view = self.view(name)?;
        release_pages(&self.mmap, view.data);
        Ok(())
    }

    /// Like [`release`](Self::release) for any part of a view of this file (a chunk of a tensor already read).
    /// Bytes that do not lie in this file's map are ignored.
    pub fn release_bytes(&self, data: &[u8]) {
        release_pages(&self.mmap, data);
    }

    /// Tensor `name`'s dtype, shape and bytes.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.info(name)?;
        let bytes: &[u8] = &self.mmap;
        let (b, e) = info.data_offsets;
        // Ranges were checked against the file length when it was opened.
        Ok(TensorView { dtype: info.dtype, shape: &info.shape, data: &bytes[self.data_start + b..self.data_start + e] })
    }
}

/// Drops the resident pages of `map` that hold `data` (which must be a slice of `map`; anything else is ignored).
/// Only whole pages inside `data`'s page-rounded range are affected, and since the map is a read-only view of a
/// file, dropped pages are read from the file again on the next access: contents never change.
pub(crate) fn release_pages(map: &Mmap, data: &[u8]) {
    let base = map.as_ptr() as usize;
    let start = data.as_ptr() as usize;
    if data.is_empty() || start < base || start + data.len() > base + map.len() {
        return;
    }
    #[cfg(unix)]
    {
        // SAFETY: the map is a shared, read-only mapping of a file, so MADV_DONTNEED only discards clean page
        // cache references; any later read (through slices still borrowed or new ones) faults the same bytes
        // back in from the file. Nothing ever writes through this mapping.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start - base, data.len()) };
    }
    #[cfg(not(unix))]
    let _ = (base, start);
}

/// What a validated header says.
struct Header {
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

/// Validates a whole file image.
fn parse_header(bytes: &[u8]) -> Result<Header> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(Error::file("shorter than the 8-byte header length"));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    let available = bytes.len() as u64 - 8;
    if header_len > MAX_HEADER_LEN {
        return Err(Error::file(format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes")));
    }
    if header_len > available {
        return Err(Error::file(format!(
            "header length {header_len} runs past the end of the file ({available} bytes after the length); \
             the file is truncated or not safetensors"
        )));
    }
    let data_start = 8 + header_len as usize;
    let header =
        std::str::from_utf8(&bytes[8..data_start]).map_err(|e| Error::file(format!("header is not UTF-8: {e}")))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| Error::file(format!("header is not a JSON object: {e}")))?;
    let metadata: BTreeMap<String, String> = match entries.remove("__metadata__") {
        None => BTreeMap::new(),
        Some(v) => {
            serde_json::from_value(v).map_err(|e| Error::file(format!("__metadata__ is not a map of strings: {e}")))?
        }
    };
    let data_len = bytes.len() - data_start;
    let mut tensors = BTreeMap::new();
    for (name, value) in entries {
        let raw: RawInfo =
            serde_json::from_value(value).map_err(|e| Error::file(format!("tensor `{name}`: malformed entry: {e}")))?;
        let dtype = Dtype::from_name(&raw.dtype)
            .ok_or_else(|| Error::file(format!("tensor `{name}`: unknown dtype `{}`", raw.dtype)))?;
        let (begin, end) = raw.data_offsets;
        if begin > end || end > data_len as u64 {
            return Err(Error::file(format!(
                "tensor `{name}`: data offsets [{begin}, {end}] are not a range within the {data_len}-byte data section"
            )));
        }
        let mut bytes_len = Some(dtype.size() as u64);
        let mut shape = Vec::with_capacity(raw.shape.len().min(64));
        for &d in &raw.shape {
            bytes_len = bytes_len.and_then(|n| n.checked_mul(d));
            shape.push(
                usize::try_from(d).map_err(|_| Error::file(format!("tensor `{name}`: dimension {d} too large")))?,
            );
        }
        if bytes_len != Some(end - begin) {
            return Err(Error::file(format!(
                "tensor `{name}`: shape {:?} of {dtype} does not match its {} bytes",
                raw.shape,
                end - begin
            )));
        }
        tensors.insert(name, TensorInfo { dtype, shape, data_offsets: (begin as usize, end as usize) });
    }
    // The ranges must cover the data section exactly, in some order: no overlap, no gap, no trailing bytes.
    let mut ranges: Vec<(usize, usize, &str)> =
        tensors.iter().map(|(n, t)| (t.data_offsets.0, t.data_offsets.1, n.as_str())).collect();
    ranges.sort_unstable();
    let mut at = 0usize;
    for (b, e, name) in ranges {
        if b != at {
            let what = if b < at { "overlaps the previous tensor" } else { "leaves a gap after the previous tensor" };
            return Err(Error::file(format!("tensor `{name}`: data starting at {b} {what} (which ends at {at})")));
        }
        at = e;
    }
    if at != data_len {
        return Err(Error::file(format!(
            "tensors end at byte {at} of a {data_len}-byte data section; the file is truncated or has trailing bytes"
        )));
    }
    Ok(Header { data_start, tensors, metadata })
}
