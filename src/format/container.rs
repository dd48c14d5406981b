//! The ecq container: a safetensors file holding encoded tensors next to ordinary ones (docs/FORMAT.md).
//!
//! For an encoded weight `name` the file holds `name.ecq.words` (U16), `name.ecq.tile_offsets` (U32,
//! `tiles + 1`), `name.ecq.states` (U32, `[tiles, 32]`), `name.ecq.freqs` (U16, `2^(bits*k)`) and, under MLX
//! names, `stem.scales` and `stem.biases` (`[rows, cols / group_size]`, F32, F16 or BF16), where `stem` is
//! `name` without a trailing `.weight`. The header metadata holds `ecq.format_version` and one JSON entry
//! `name.ecq` per encoded tensor with its parameters and a CRC-32 of every array; `ecq.raw_crc32` holds the
//! CRC-32 of every other tensor, which passes through unchanged. A split tensor (version 2 for the form that
//! stores 2 bits of each weight, 3 for the one that stores 3) also holds `name.ecq.low` (U32), those bits.
//!
//! [`ContainerWriter`] streams: tensors are added one at a time and spooled to a temporary file next to the
//! destination, so memory stays bounded by the largest tensor. [`EcFile`] maps a file and validates the whole
//! header before any tensor is read; [`EcFile::tensor`] then checks the checksums and every stream invariant.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::safetensors_file::{Dtype, SafetensorsFile, TensorView};
use super::tensor::EcTensor;
use crate::error::{Error, Result};
use crate::quant::ScaleDtype;
use crate::rans::{EncodedStream, FreqTable, SplitForm, TileLayout, LANES, MAX_PRECISION, SPLIT_BITS};

/// The newest container format version this build writes and reads (it reads 1, 2 and 3). A file is written as
/// version 1 unless it holds a split tensor: version 2 where every split tensor stores 2 bits of each weight
/// ([`SplitForm::Low2`]), version 3 where one stores 3 ([`SplitForm::Low3`]).
pub const FORMAT_VERSION: u32 = 3;

/// The lowest format version that holds a tensor split in `form` (1 for one that is not split): what writers write
/// and readers require.
fn version_needed(form: Option<SplitForm>) -> u32 {
    match form {
        None => 1,
        Some(SplitForm::Low2) => 2,
        Some(SplitForm::Low3) => 3,
    }
}

/// Metadata key holding the format version, `"1"`, `"2"` or `"3"`.
pub const VERSION_KEY: &str = "ecq.format_version";
/// Metadata key holding the CRC-32 of every passthrough tensor, a JSON object `{name: crc}`.
pub const RAW_CRC_KEY: &str = "ecq.raw_crc32";
/// Largest segment width a version-1 file may declare. It bounds a tile to `32 * 65536` weights, so the
/// decoded size of a tensor is bounded by its number of states, which the file must actually hold.
pub const MAX_SEGMENT: usize = 1 << 16;

/// Refuses (an `InvalidParameter` error naming `output`) when `output` exists and is one of `inputs`, by path or,
/// on Unix, by device and inode: for writers that must not overwrite what they read. Inputs that do not exist
/// are skipped (opening them fails later with its own error).
pub fn refuse_overwrite<P: AsRef<Path>>(inputs: &[P], output: &Path) -> Result<()> {
    let Ok(out_meta) = std::fs::metadata(output) else { return Ok(()) };
    for input in inputs {
        let input = input.as_ref();
        let Ok(in_meta) = std::fs::metadata(input) else { continue };
        let same_path = matches!((input.canonicalize(), output.canonicalize()), (Ok(a), Ok(b)) if a == b);
        #[cfg(unix)]
        let same_inode = {
            use std::os::unix::fs::MetadataExt;
            in_meta.dev() == out_meta.dev() && in_meta.ino() == out_meta.ino()
        };
        #[cfg(not(unix))]
        let same_inode = {
            let _ = (&in_meta, &out_meta);
            false
        };
        if same_path || same_inode {
            return Err(Error::param(
                "output",
                format!("refusing to overwrite the input {}: choose a different output path", input.display()),
            ));
        }
    }
    Ok(())
}

/// Name suffixes of the stream arrays, reserved for encoded tensors (the last, a split tensor's, since version 2:
/// writers refuse it for passthrough tensors, readers take it as an ordinary name in version-1 files).
const STREAM_SUFFIXES: [&str; 5] = [".ecq.words", ".ecq.tile_offsets", ".ecq.states", ".ecq.freqs", ".ecq.low"];

/// The array names of encoded tensor `name`: six, and `low` for a split tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrayNames {
    /// `name.ecq.words`.
    pub words: String,
    /// `name.ecq.tile_offsets`.
    pub tile_offsets: String,
    /// `name.ecq.states`.
    pub states: String,
    /// `name.ecq.freqs`.
    pub freqs: String,
    /// `stem.scales`.
    pub scales: String,
    /// `stem.biases`.
    pub biases: String,
    /// `name.ecq.low`, a split tensor's low words.
    pub low: String,
}

impl ArrayNames {
    /// The names for encoded tensor `name`; `stem` is `name` without a trailing `.weight`.
    pub fn new(name: &str) -> Self {
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        Self {
            words: format!("{name}.ecq.words"),
            tile_offsets: format!("{name}.ecq.tile_offsets"),
            states: format!("{name}.ecq.states"),
            freqs: format!("{name}.ecq.freqs"),
            scales: format!("{stem}.scales"),
            biases: format!("{stem}.biases"),
            low: format!("{name}.ecq.low"),
        }
    }

    fn all(&self) -> [&str; 6] {
        [&self.words, &self.tile_offsets, &self.states, &self.freqs, &self.scales, &self.biases]
    }
}

/// CRC-32 (IEEE, as `crc32fast` computes it) of each array's little-endian bytes as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checksums {
    /// Of `words`.
    pub words: u32,
    /// Of `tile_offsets`.
    pub tile_offsets: u32,
    /// Of `states`.
    pub states: u32,
    /// Of `freqs`.
    pub freqs: u32,
    /// Of `scales`.
    pub scales: u32,
    /// Of `biases`.
    pub biases: u32,
    /// Of `low`, present for a split tensor only (version 2 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<u32>,
}

/// The JSON object stored under `name.ecq`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryJson {
    shape: Vec<u64>,
    bits: u32,
    group_size: u64,
    precision: u32,
    segment: u64,
    /// Version 2: low bits of each weight stored as they are (2, with `bits` 4; version 3: also 3), absent or 0
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    low_bits: Option<u32>,
    crc32: Checksums,
}

/// Parameters of one encoded tensor, as read from a validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedInfo {
    /// The tile layout of the coded symbols (rows, columns, bits, segment): 2 or 1 bits for a split tensor.
    pub layout: TileLayout,
    /// Low bits of each weight stored as they are: 2 or 3 for a split tensor ([`SplitForm::low_bits`]), else 0.
    pub low_bits: u32,
    /// Columns per scale/bias group.
    pub group_size: usize,
    /// Probability precision `P`.
    pub precision: u32,
    /// Storage dtype of scales and biases.
    pub scale_dtype: ScaleDtype,
    /// The stored checksums.
    pub checksums: Checksums,
    /// The names of the arrays.
    pub arrays: ArrayNames,
}

impl EncodedInfo {
    /// Bits per weight: the coded symbols' and the low bits stored as they are.
    pub fn bits(&self) -> u32 {
        self.layout.bits() + self.low_bits
    }

    /// The names of the arrays this tensor has: six, seven when split.
    pub fn array_names(&self) -> Vec<&str> {
        let mut names = self.arrays.all().to_vec();
        if self.low_bits > 0 {
            names.push(&self.arrays.low);
        }
        names
    }
}

/// Writes an ecq container one tensor at a time (see the module documentation).
///
/// ```
/// use ecq::format::{ContainerWriter, Dtype, EcFile, EcTensor, EncodeOptions};
/// use ecq::quant::{quantize, QuantConfig};
///
/// # fn main() -> ecq::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("layer.safetensors");
/// let w: Vec<f32> = (0..40 * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
/// let q = quantize(&w, 40, 128, QuantConfig::default())?;
/// let tensor = EcTensor::encode(&q, EncodeOptions::default())?;
///
/// let mut writer = ContainerWriter::create(&path)?;
/// writer.add_encoded("mlp.up_proj.weight", &tensor)?;
/// writer.add_raw("norm.weight", Dtype::F32, &[2], &[0, 0, 128, 63, 0, 0, 0, 64])?;
/// writer.finish()?;
///
/// let file = EcFile::open(&path)?;
/// assert_eq!(file.tensor("mlp.up_proj.weight")?, tensor);
/// assert_eq!(file.tensor("mlp.up_proj.weight")?.to_quantized()?, q);
/// assert_eq!(file.raw("norm.weight")?.data, &[0, 0, 128, 63, 0, 0, 0, 64]);
/// assert!(file.safetensors().tensors().contains_key("mlp.up_proj.scales"));
/// # Ok(())
/// # }
/// ```
///
/// Tensor data goes to a spool file in the destination's directory as it is added; [`finish`](Self::finish)
/// writes header and data to a second temporary file, syncs it and renames it over the destination. If the
/// writer is dropped without `finish`, or `finish` fails, both temporaries are removed and the destination is
/// untouched.
#[derive(Debug)]
pub struct ContainerWriter {
    dest: PathBuf,
    spool_path: PathBuf,
    spool: Option<BufWriter<File>>,
    spool_len: u64,
    tmp_path: Option<PathBuf>,
    pending: Vec<Pending>,
    names: HashSet<String>,
    entries: BTreeMap<String, String>,
    raw_crc: BTreeMap<String, u32>,
    metadata: BTreeMap<String, String>,
    /// The format version the tensors added so far need: 1, or 2 or 3 for a split tensor.
    version: u32,
}

#[derive(Debug)]
struct Pending {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    spool_offset: u64,
    len: u64,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a new, uniquely named hidden file next to `dest`.
fn create_temp(dest: &Path, kind: &str) -> Result<(PathBuf, File)> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let mut last_err = None;
    for _ in 0..64 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{base}.{}.{n}.{kind}", std::process::id()));
        match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Err(Error::io(dir, last_err.unwrap_or_else(|| std::io::Error::other("no free temporary name"))))
}

fn is_reserved_key(key: &str) -> bool {
    key.starts_with("ecq.") || key.ends_with(".ecq")
}

impl ContainerWriter {
    /// Starts a container that [`finish`](Self::finish) will write to `path`. Nothing is written to `path`
    /// itself until then; the spool file is created now, so an unwritable directory fails here.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let dest = path.as_ref().to_path_buf();
        if dest.file_name().is_none() {
            return Err(Error::param("path", format!("{} does not name a file", dest.display())));
        }
        let (spool_path, spool) = create_temp(&dest, "ecq-spool")?;
        Ok(Self {
            dest,
            spool_path,
            spool: Some(BufWriter::with_capacity(1 << 20, spool)),
            spool_len: 0,
            tmp_path: None,
            pending: Vec::new(),
            names: HashSet::new(),
            entries: BTreeMap::new(),
            raw_crc: BTreeMap::new(),
            metadata: BTreeMap::new(),
            version: 1,
        })
    }

    /// Adds a free-form metadata entry. Keys starting with `ecq.` or ending with `.ecq` are reserved.
    pub fn set_metadata(&mut self, key: &str, value: &str) -> Result<()> {
        if is_reserved_key(key) || key == "__metadata__" {
            return Err(Error::param("metadata", format!("key `{key}` is reserved for the ecq format")));
        }
        self.metadata.insert(key.into(), value.into());
        Ok(())
    }

    fn claim(&mut self, name: &str) -> Result<()> {
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::param("name", format!("`{name}` cannot name a tensor")));
        }
        if !self.names.insert(name.to_string()) {
            return Err(Error::param("name", format!("tensor `{name}` is added twice (names must be unique)")));
        }
        Ok(())
    }

    /// Adds an encoded tensor under `name` (its six arrays, seven when split, and its metadata entry).
    pub fn add_encoded(&mut self, name: &str, tensor: &EcTensor) -> Result<()> {
        let layout = tensor.layout();
        if layout.segment() > MAX_SEGMENT {
            return Err(Error::param(
                "segment",
                format!(
                    "{} columns exceeds the format's limit of {MAX_SEGMENT}; encode with a smaller segment",
                    layout.segment()
                ),
            ));
        }
        if STREAM_SUFFIXES.iter().any(|s| name.ends_with(s)) || name.is_empty() {
            return Err(Error::param("name", format!("`{name}` cannot name an encoded tensor")));
        }
        let arrays = ArrayNames::new(name);
        let low = tensor.low();
        let mut claimed = arrays.all().to_vec();
        if low.is_some() {
            claimed.push(&arrays.low);
        }
        // The encoded name itself is claimed too, so no passthrough tensor can share it.
        for a in claimed.iter().copied().chain([name]) {
            if self.names.contains(a) {
                return Err(Error::param("name", format!("tensor `{a}` (of encoded `{name}`) is added twice")));
            }
        }
        for a in claimed.into_iter().chain([name]) {
            self.claim(a)?;
        }
        let key = format!("{name}.ecq");
        let stream = tensor.stream();
        let tiles = layout.tiles();
        let groups = [layout.rows(), layout.cols() / tensor.group_size()];
        let freqs: Vec<u16> = tensor.table().freqs().iter().map(|&f| f as u16).collect();
        let sd = tensor.scale_dtype();
        let scale_le = move |v: f32| -> [u8; 4] {
            match sd {
                ScaleDtype::F32 => v.to_le_bytes(),
                ScaleDtype::F16 => {
                    let b = half::f16::from_f32(v).to_le_bytes();
                    [b[0], b[1], 0, 0]
                }
                ScaleDtype::Bf16 => {
                    let b = half::bf16::from_f32(v).to_le_bytes();
                    [b[0], b[1], 0, 0]
                }
            }
        };
        let crc = Checksums {
            words: self.put(&arrays.words, Dtype::U16, &[stream.words.len()], &stream.words, |v| v.to_le_bytes())?,
            tile_offsets: self
                .put(&arrays.tile_offsets, Dtype::U32, &[tiles + 1], &stream.tile_offsets, |v| v.to_le_bytes())?,
            states: self.put(&arrays.states, Dtype::U32, &[tiles, LANES], &stream.states, |v| v.to_le_bytes())?,
            freqs: self.put(&arrays.freqs, Dtype::U16, &[freqs.len()], &freqs, |v| v.to_le_bytes())?,
            scales: self.put_scales(&arrays.scales, sd, &groups, tensor.scales(), scale_le)?,
            biases: self.put_scales(&arrays.biases, sd, &groups, tensor.biases(), scale_le)?,
            low: match low {
                Some(low) => Some(self.put(&arrays.low, Dtype::U32, &[low.len()], low, |v| v.to_le_bytes())?),
                None => None,
            },
        };
        let split = tensor.split();
        self.version = self.version.max(version_needed(split));
        let entry = EntryJson {
            shape: vec![layout.rows() as u64, layout.cols() as u64],
            bits: tensor.bits(),
            group_size: tensor.group_size() as u64,
            precision: tensor.table().precision(),
            segment: layout.segment() as u64,
            low_bits: split.map(SplitForm::low_bits),
            crc32: crc,
        };
        self.entries.insert(key, serde_json::to_string(&entry).expect("plain struct serializes"));
        Ok(())
    }

    /// Adds a tensor that passes through unchanged: `bytes` are its little-endian elements.
    pub fn add_raw(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<()> {
        if STREAM_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            return Err(Error::param(
                "name",
                format!("`{name}` is reserved for encoded tensors (is the input already an ecq file?)"),
            ));
        }
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let expected = elements.and_then(|n| n.checked_mul(dtype.size()));
        if expected != Some(bytes.len()) {
            return Err(Error::param(
                "bytes",
                format!("tensor `{name}`: {} bytes do not match shape {shape:?} of {dtype}", bytes.len()),
            ));
        }
        self.claim(name)?;
        let crc = self.spool_bytes(name, dtype, shape, bytes)?;
        self.raw_crc.insert(name.to_string(), crc);
        Ok(())
    }

    fn put_scales(
        &mut self,
        name: &str,
        dtype: ScaleDtype,
        shape: &[usize],
        values: &[f32],
        le: impl Fn(f32) -> [u8; 4],
    ) -> Result<u32> {
        let size = dtype.size();
        let mut bytes = Vec::with_capacity(values.len() * size);
        for &v in values {
            bytes.extend_from_slice(&le(v)[..size]);
        }
        self.spool_bytes(name, dtype.into(), shape, &bytes)
    }

    fn put<T: Copy, const N: usize>(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        values: &[T],
        le: impl Fn(T) -> [u8; N],
    ) -> Result<u32> {
        // Converted in chunks, so an array is never held twice in memory.
        const CHUNK: usize = 1 << 14;
        let mut hasher = crc32fast::Hasher::new();
        let offset = self.spool_len;
        let mut buf = Vec::with_capacity(CHUNK * N);
        for chunk in values.chunks(CHUNK) {
            buf.clear();
            for &v in chunk {
                buf.extend_from_slice(&le(v));
            }
            hasher.update(&buf);
            self.write_spool(&buf)?;
        }
        self.pending.push(Pending {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            spool_offset: offset,
            len: (values.len() * N) as u64,
        });
        Ok(hasher.finalize())
    }

    fn spool_bytes(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<u32> {
        let offset = self.spool_len;
        self.write_spool(bytes)?;
        self.pending.push(Pending {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            spool_offset: offset,
            len: bytes.len() as u64,
        });
        Ok(crc32fast::hash(bytes))
    }

    fn write_spool(&mut self, bytes: &[u8]) -> Result<()> {
        let spool = self.spool.as_mut().ok_or_else(|| Error::param("writer", "already finished"))?;
        spool.write_all(bytes).map_err(|e| Error::io(&self.spool_path, e))?;
        self.spool_len += bytes.len() as u64;
        Ok(())
    }

    /// Writes the container to its destination: header and data to a temporary file in the same directory,
    /// `fsync`, then an atomic rename over the destination.
    pub fn finish(mut self) -> Result<()> {
        let spool = self.spool.take().ok_or_else(|| Error::param("writer", "already finished"))?;
        let mut spool = spool.into_inner().map_err(|e| Error::io(&self.spool_path, e.into_error()))?;

        // Larger elements first: the data section starts 8-byte aligned, so every tensor then starts at a
        // multiple of its own element size (safetensors allows no padding between tensors).
        let mut order: Vec<usize> = (0..self.pending.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.pending[i].dtype.size()));

        let mut header = serde_json::Map::new();
        let mut metadata = self.metadata.clone();
        if !self.entries.is_empty() {
            let version = self.version;
            metadata.insert(VERSION_KEY.into(), version.to_string());
            metadata.extend(self.entries.iter().map(|(k, v)| (k.clone(), v.clone())));
            if !self.raw_crc.is_empty() {
                metadata.insert(RAW_CRC_KEY.into(), serde_json::to_string(&self.raw_crc).expect("map serializes"));
            }
        }
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::to_value(&metadata).expect("map serializes"));
        }
        let mut at = 0u64;
        for &i in &order {
            let p = &self.pending[i];
            header.insert(
                p.name.clone(),
                serde_json::json!({"dtype": p.dtype.name(), "shape": p.shape, "data_offsets": [at, at + p.len]}),
            );
            at += p.len;
        }
        let mut header = serde_json::to_string(&header).expect("json value serializes").into_bytes();
        // Pad with spaces so the data section starts at a multiple of 8.
        header.resize(header.len().div_ceil(8) * 8, b' ');

        let (tmp_path, tmp) = create_temp(&self.dest, "ecq-tmp")?;
        self.tmp_path = Some(tmp_path.clone());
        let io = |e| Error::io(&tmp_path, e);
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        out.write_all(&header).map_err(io)?;
        for &i in &order {
            let p = &self.pending[i];
            spool.seek(SeekFrom::Start(p.spool_offset)).map_err(|e| Error::io(&self.spool_path, e))?;
            let copied = std::io::copy(&mut (&mut spool).take(p.len), &mut out).map_err(io)?;
            if copied != p.len {
                return Err(Error::io(&self.spool_path, std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        let out = out.into_inner().map_err(|e| Error::io(&tmp_path, e.into_error()))?;
        out.sync_all().map_err(io)?;
        drop(out);
        fs::rename(&tmp_path, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.tmp_path = None;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every platform can open a directory, so this is best effort.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for ContainerWriter {
    fn drop(&mut self) {
        self.spool = None;
        let _ = fs::remove_file(&self.spool_path);
        if let Some(tmp) = self.tmp_path.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// A validated ecq container (or any safetensors file: without ecq metadata every tensor is raw).
#[derive(Debug)]
pub struct EcFile {
    file: SafetensorsFile,
    version: Option<u32>,
    encoded: BTreeMap<String, EncodedInfo>,
    raw: BTreeMap<String, Option<u32>>,
}

fn invalid(name: &str, reason: impl std::fmt::Display) -> Error {
    Error::file(format!("encoded tensor `{name}`: {reason}"))
}

impl EcFile {
    /// Maps `path` and validates everything the header says: the safetensors layout, the format version, every
    /// encoded tensor's parameters and the dtype and shape of its six arrays, and that every tensor is accounted
    /// for. Array contents (checksums, offsets, states, tables) are checked by [`tensor`](Self::tensor).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let meta = file.metadata();
        let version = match meta.get(VERSION_KEY).map(String::as_str) {
            Some("1") => Some(1),
            Some("2") => Some(2),
            Some("3") => Some(3),
            Some(v) => return Err(Error::UnsupportedVersion { found: v.into(), supported: FORMAT_VERSION }),
            None => None,
        };
        for key in meta.keys() {
            if key.starts_with("ecq.") && key != VERSION_KEY && key != RAW_CRC_KEY {
                return Err(Error::file(format!("unknown reserved metadata key `{key}`")));
            }
            if version.is_none() && is_reserved_key(key) {
                return Err(Error::file(format!("metadata key `{key}` needs `{VERSION_KEY}`, which is missing")));
            }
        }
        let mut encoded = BTreeMap::new();
        let mut claimed: HashSet<String> = HashSet::new();
        for (key, value) in meta {
            let Some(name) = key.strip_suffix(".ecq") else { continue };
            let info = parse_entry(&file, name, value, version.unwrap_or(1))?;
            for a in info.array_names() {
                if !claimed.insert(a.to_string()) {
                    return Err(invalid(name, format!("array `{a}` also belongs to another encoded tensor")));
                }
            }
            encoded.insert(name.to_string(), info);
        }
        // A writer writes version 3 only for a file that holds a tensor storing 3 bits of each weight.
        let needed = encoded.values().map(|i| version_needed(SplitForm::from_low_bits(i.low_bits))).max();
        if version == Some(3) && needed != Some(3) {
            return Err(Error::file(
                "a version-3 file must hold a split tensor with `low_bits` 3, and this one does not",
            ));
        }
        let raw_crc: BTreeMap<String, u32> = match meta.get(RAW_CRC_KEY) {
            Some(v) => serde_json::from_str(v)
                .map_err(|e| Error::file(format!("`{RAW_CRC_KEY}` is not a map of CRC-32 values: {e}")))?,
            None => BTreeMap::new(),
        };
        let unclaimed = || file.tensors().keys().filter(|n| !claimed.contains(n.as_str()));
        for name in unclaimed() {
            let reserved = if version >= Some(2) { &STREAM_SUFFIXES[..] } else { &STREAM_SUFFIXES[..4] };
            if let Some(s) = reserved.iter().find(|s| name.ends_with(*s)) {
                let owner = &name[..name.len() - s.len()];
                return Err(Error::file(format!("array `{name}` has no `{owner}.ecq` metadata entry")));
            }
        }
        let mut raw = BTreeMap::new();
        for name in unclaimed() {
            if encoded.contains_key(name) {
                return Err(Error::file(format!("tensor `{name}` is both encoded and passthrough")));
            }
            let crc = raw_crc.get(name).copied();
            if version.is_some() && crc.is_none() {
                return Err(Error::file(format!("tensor `{name}` has no checksum in `{RAW_CRC_KEY}`")));
            }
            raw.insert(name.clone(), crc);
        }
        if let Some(name) = raw_crc.keys().find(|n| !raw.contains_key(*n)) {
            return Err(Error::file(format!("`{RAW_CRC_KEY}` lists `{name}`, which is not a passthrough tensor")));
        }
        Ok(Self { file, version, encoded, raw })
    }

    /// The underlying safetensors file (every array, the metadata).
    pub fn safetensors(&self) -> &SafetensorsFile {
        &self.file
    }

    /// The format version, or `None` for a plain safetensors file with no encoded tensors.
    pub fn format_version(&self) -> Option<u32> {
        self.version
    }

    /// Names of the encoded tensors, sorted.
    pub fn encoded_names(&self) -> impl Iterator<Item = &str> {
        self.encoded.keys().map(String::as_str)
    }

    /// Names of the passthrough tensors, sorted.
    pub fn raw_names(&self) -> impl Iterator<Item = &str> {
        self.raw.keys().map(String::as_str)
    }

    /// Metadata entries that are not part of the ecq format (carried over from the source model).
    pub fn user_metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        self.file.metadata().iter().filter(|(k, _)| !is_reserved_key(k)).map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Parameters of encoded tensor `name`, from the validated header.
    pub fn encoded_info(&self, name: &str) -> Result<&EncodedInfo> {
        self.encoded.get(name).ok_or_else(|| Error::TensorNotFound(name.into()))
    }

    /// Reads encoded tensor `name`: verifies every array's checksum, then builds it with
    /// [`EcTensor::from_parts`], which checks offsets, states and the frequency table. Decoding (and its
    /// end-state check) is left to the caller.
    pub fn tensor(&self, name: &str) -> Result<EcTensor> {
        let info = self.encoded_info(name)?;
        let a = &info.arrays;
        let crc = &info.checksums;
        let words = self.checked(name, &a.words, crc.words)?;
        let offsets = self.checked(name, &a.tile_offsets, crc.tile_offsets)?;
        let states = self.checked(name, &a.states, crc.states)?;
        let freqs = self.checked(name, &a.freqs, crc.freqs)?;
        let scales = self.checked(name, &a.scales, crc.scales)?;
        let biases = self.checked(name, &a.biases, crc.biases)?;
        // Present exactly for a split tensor (checked at open).
        let low = crc.low.map(|c| self.checked(name, &a.low, c)).transpose()?;

        let u16s = |d: &[u8]| d.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect::<Vec<_>>();
        let u32s =
            |d: &[u8]| d.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<_>>();
        let stream =
            EncodedStream { words: u16s(words.data), tile_offsets: u32s(offsets.data), states: u32s(states.data) };
        let freqs: Vec<u32> = u16s(freqs.data).into_iter().map(u32::from).collect();
        let table = FreqTable::from_freqs(freqs, info.precision).map_err(|e| invalid(name, e))?;
        let scales = scales.to_f32(&a.scales)?;
        let biases = biases.to_f32(&a.biases)?;
        for (what, v) in [("scales", &scales), ("biases", &biases)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(invalid(name, format!("{what}[{i}] = {} is not finite", v[i])));
            }
        }
        let low = low.map(|l| u32s(l.data));
        EcTensor::from_parts(info.layout, info.group_size, table, stream, scales, biases, info.scale_dtype, low)
            .map_err(|e| invalid(name, e))
    }

    /// Passthrough tensor `name`, after verifying its checksum (when the file has one).
    pub fn raw(&self, name: &str) -> Result<TensorView<'_>> {
        let crc = *self.raw.get(name).ok_or_else(|| Error::TensorNotFound(name.into()))?;
        let view = self.file.view(name)?;
        if let Some(expected) = crc {
            let actual = crc32fast::hash(view.data);
            if actual != expected {
                return Err(Error::ChecksumMismatch { tensor: name.into(), array: name.into(), expected, actual });
            }
        }
        Ok(view)
    }

    fn checked(&self, name: &str, array: &str, expected: u32) -> Result<TensorView<'_>> {
        let view = self.file.view(array)?;
        let actual = crc32fast::hash(view.data);
        if actual != expected {
            return Err(Error::ChecksumMismatch { tensor: name.into(), array: array.into(), expected, actual });
        }
        Ok(view)
    }
}

/// Parses and checks the `name.ecq` entry of a file of format `version` and the dtype and shape of the arrays
/// it names.
fn parse_entry(file: &SafetensorsFile, name: &str, value: &str, version: u32) -> Result<EncodedInfo> {
    if name.is_empty() {
        return Err(Error::file("metadata key `.ecq` names no tensor"));
    }
    let e: EntryJson = serde_json::from_str(value).map_err(|err| invalid(name, format!("malformed entry: {err}")))?;
    let [rows, cols] = e.shape[..] else {
        return Err(invalid(name, format!("shape {:?} is not [rows, cols]", e.shape)));
    };
    let to_usize = |v: u64, what: &str| usize::try_from(v).map_err(|_| invalid(name, format!("{what} {v} too large")));
    let (rows, cols) = (to_usize(rows, "rows")?, to_usize(cols, "cols")?);
    let (group_size, segment) = (to_usize(e.group_size, "group_size")?, to_usize(e.segment, "segment")?);
    if !(1..=8).contains(&e.bits) {
        return Err(invalid(name, format!("bits {} outside 1..=8", e.bits)));
    }
    if e.low_bits.is_some() && version < 2 {
        return Err(invalid(name, "field `low_bits` needs format version 2"));
    }
    let form = match e.low_bits.unwrap_or(0) {
        0 => None,
        l if e.bits == SPLIT_BITS && SplitForm::from_low_bits(l).is_some() => SplitForm::from_low_bits(l),
        l => {
            return Err(invalid(
                name,
                format!("low_bits {l} with {} bits: only 2 or 3 with {SPLIT_BITS} bits is defined", e.bits),
            ))
        }
    };
    let needed = version_needed(form);
    if version < needed {
        return Err(invalid(name, format!("`low_bits` {} needs format version {needed}", e.low_bits.unwrap_or(0))));
    }
    let low_bits = form.map_or(0, SplitForm::low_bits);
    if form.is_some() != e.crc32.low.is_some() {
        return Err(invalid(name, "a checksum of `low` is given exactly when `low_bits` is 2 or 3"));
    }
    if let Some(form) = form {
        form.check_shape(cols, segment).map_err(|err| invalid(name, err))?;
    }
    if !(1..=MAX_PRECISION).contains(&e.precision) {
        return Err(invalid(name, format!("precision {} outside 1..={MAX_PRECISION}", e.precision)));
    }
    if !(1..=MAX_SEGMENT).contains(&segment) {
        return Err(invalid(name, format!("segment {segment} outside 1..={MAX_SEGMENT}")));
    }
    if group_size == 0 || cols % group_size != 0 || segment % group_size != 0 {
        return Err(invalid(
            name,
            format!("group_size {group_size} must divide both the columns ({cols}) and the segment ({segment})"),
        ));
    }
    let layout = TileLayout::new(rows, cols, e.bits - low_bits, segment).map_err(|err| invalid(name, err))?;
    let arrays = ArrayNames::new(name);
    let get = |array: &str| -> Result<&super::safetensors_file::TensorInfo> {
        file.tensors().get(array).ok_or_else(|| invalid(name, format!("array `{array}` is missing")))
    };
    let expect = |array: &str, dtypes: &[Dtype], shape: &[usize]| -> Result<Dtype> {
        let t = get(array)?;
        if !dtypes.contains(&t.dtype) {
            return Err(invalid(name, format!("array `{array}` has dtype {}, expected one of {dtypes:?}", t.dtype)));
        }
        if t.shape != shape {
            return Err(invalid(name, format!("array `{array}` has shape {:?}, expected {shape:?}", t.shape)));
        }
        Ok(t.dtype)
    };
    // Each tile costs 32 states and an offset in the file: a count the file cannot hold is refused before any
    // size is derived from it.
    let tiles = layout.tiles();
    let data_len = file.data_len();
    if tiles.checked_mul(4 * LANES + 4).is_none_or(|b| b > data_len) {
        return Err(invalid(name, format!("{tiles} tiles of states cannot fit in the {data_len}-byte file data")));
    }
    let words = get(&arrays.words)?;
    if words.dtype != Dtype::U16 || words.shape.len() != 1 {
        return Err(invalid(
            name,
            format!("array `{}` is {} {:?}, expected a 1-D U16 array", arrays.words, words.dtype, words.shape),
        ));
    }
    expect(&arrays.tile_offsets, &[Dtype::U32], &[tiles + 1])?;
    expect(&arrays.states, &[Dtype::U32], &[tiles, LANES])?;
    expect(&arrays.freqs, &[Dtype::U16], &[layout.alphabet()])?;
    let scale_shape = [rows, cols / group_size];
    let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
    let sd = expect(&arrays.scales, &floats, &scale_shape)?;
    let bd = expect(&arrays.biases, &floats, &scale_shape)?;
    if sd != bd {
        return Err(invalid(name, format!("scales are {sd} but biases are {bd}; they must share one dtype")));
    }
    let scale_dtype = sd.to_scale_dtype().expect("checked to be a float dtype");
    if let Some(form) = form {
        // Bounded by the tile count checked above: at most 32 * 65536 weights a tile, one word per 16 (Low2) or
        // three per 32 (Low3).
        expect(&arrays.low, &[Dtype::U32], &[form.low_words(rows, cols)])?;
    }
    Ok(EncodedInfo { layout, low_bits, group_size, precision: e.precision, scale_dtype, checksums: e.crc32, arrays })
}
