//! Whole models: conversion into an ecq container ([`convert`]) and loading one ([`EcModel`]).
//!
//! [`convert`] reads a GGUF file, a safetensors file or a sharded safetensors model (`*.safetensors.index.json`
//! with its `weight_map`) and writes an ecq container one tensor at a time:
//! - GGUF Q4_0, Q4_1 and Q8_0 tensors are imported losslessly ([`GgufFile::quantized`]) and encoded as they
//!   are: symbols, scales and biases unchanged.
//! - MLX-quantized weights (`stem.weight` U32 with `stem.scales` and `stem.biases`) are imported losslessly
//!   ([`import_mlx`]). The bit width comes from [`ConvertOptions::mlx_bits`], else from a `quantization` entry
//!   of the file's metadata, else from `config.json` next to the input (`"quantization": {"group_size": G,
//!   "bits": B, "<stem>": {"bits": ..}}`, per-layer entries overriding the default); the group size follows
//!   from the shapes and must agree with the configuration when it names one.
//! - F32, F16 and BF16 matrices chosen by [`TensorSelection`] are quantized with [`crate::quant::quantize`]
//!   (scales and biases in the tensor's own dtype by default, as MLX does), in chunks of rows.
//! - Everything else (norms, 1-D biases, integer tensors, matrices whose width is not a multiple of the group
//!   size) passes through byte for byte.
//! - Any other GGUF type (Q6_K, ...) is an [`Error::UnsupportedDtype`] naming the tensor and its type, raised
//!   before anything is written.
//!
//! Memory stays bounded by one tensor whatever the model size: inputs are memory-mapped, each tensor is read,
//! encoded and spooled to disk by [`ContainerWriter`], and the mapped pages it occupied are released
//! ([`SafetensorsFile::release`], [`GgufFile::release`]) before the next one. Float tensors are converted to
//! `f32` a chunk of rows at a time, so no full-size `f32` copy is ever made. Peak resident memory stays under
//! 64 MiB + 4 bytes per weight of the largest tensor (its symbols, the encoder's words, scales and biases; with
//! `verify`, the source's symbols next to the decoded file): `tests/convert_memory.rs` asserts it on SmolLM2
//! and on a 2 GB float file (measured: 80 MiB, 109-129 MiB with `verify`, and 151 MiB; see BENCHMARKS.md).
//!
//! Output goes to a temporary file that is synced and renamed over the destination; on any error nothing is
//! left behind, and the input is never overwritten. With [`ConvertOptions::verify`] the written file is reopened
//! and every tensor decoded and compared with its source (symbols, scales and biases exactly, passthrough bytes
//! equal); a mismatch removes the output and returns [`Error::VerifyFailed`].

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::gguf::{self, GgmlType, GgufFile, GgufValue};
use crate::format::{
    import_mlx, ContainerWriter, Dtype, EcFile, EcTensor, EncodeOptions, SafetensorsFile, TensorView, VERSION_KEY,
};
use crate::matmul::EcMatmul;
use crate::quant::{self, QuantConfig, QuantizedMatrix, ScaleDtype};
use crate::rans;
use rayon::prelude::*;

/// Rows of a float tensor converted to `f32` and quantized at a time: bounded to about this many bytes of `f32`.
const FLOAT_CHUNK_BYTES: usize = 16 << 20;

/// Which float matrices [`convert`] quantizes. Already-quantized tensors (GGUF Q4_0/Q4_1/Q8_0, MLX triples)
/// are always encoded as they are, losslessly; this selection only concerns F32, F16 and BF16 matrices.
///
/// Patterns are globs over tensor names: `*` matches any run of characters (dots included), `?` one
/// character; everything else matches itself.
///
/// A float matrix is eligible when it is 2-D, non-empty and its column count is a multiple of the group size.
/// An eligible matrix is quantized when no `exclude` pattern matches it and either an `include` pattern matches
/// it or `include` is empty and the model is a float model. The default (both empty) therefore quantizes every
/// eligible matrix of a float model, embedding tables included, as `mlx_lm.convert -q` and llama.cpp's
/// quantizers do (pass `exclude = ["*embed*"]` to keep them float), and keeps the float matrices of an
/// already-quantized model (GGUF with Q types, MLX-quantized safetensors) as they are, because their producer
/// chose to leave them unquantized: converting such a model is lossless by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorSelection {
    /// Quantize the float matrices matching any of these (empty: the default rule above).
    pub include: Vec<String>,
    /// Never quantize float matrices matching any of these.
    pub exclude: Vec<String>,
}

impl TensorSelection {
    /// Whether an eligible float matrix `name` is quantized, in a model that already holds quantized tensors
    /// (`quantized_model`) or not.
    pub fn quantizes(&self, name: &str, quantized_model: bool) -> bool {
        if self.exclude.iter().any(|p| glob_match(p, name)) {
            return false;
        }
        if self.include.is_empty() {
            !quantized_model
        } else {
            self.include.iter().any(|p| glob_match(p, name))
        }
    }
}

/// Matches `name` against a glob of `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Settings of [`convert`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Bits and group size for float matrices that are quantized. Its `scale_dtype` is used only when
    /// `scales_follow_input` is false.
    pub quant: QuantConfig,
    /// Store the scales and biases of a quantized float matrix in the matrix's own dtype (F32, F16 or BF16), as
    /// MLX does. Default true.
    pub scales_follow_input: bool,
    /// Encoder settings: segment width (or the fewest tiles a matrix should have), probability precision, split form.
    pub encode: EncodeOptions,
    /// Which float matrices are quantized.
    pub select: TensorSelection,
    /// Bit width of MLX-quantized weights, overriding what the file's metadata or `config.json` say.
    pub mlx_bits: Option<u32>,
    /// After writing, reopen the output, decode every tensor and compare it with its source.
    pub verify: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            quant: QuantConfig::default(),
            scales_follow_input: true,
            encode: EncodeOptions::default(),
            select: TensorSelection::default(),
            mlx_bits: None,
            verify: false,
        }
    }
}

/// What [`convert`] is doing when it reports [`Progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading, encoding and spooling tensors.
    Convert,
    /// Reading the written file back and comparing it with the source.
    Verify,
}

/// A progress report: `done` of `total` tensors of the current stage finished, `tensor` the one in hand (empty
/// once `done == total`).
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// The stage.
    pub stage: Stage,
    /// Tensors finished in this stage.
    pub done: usize,
    /// Tensors in this stage.
    pub total: usize,
    /// The tensor being processed.
    pub tensor: &'a str,
}

/// The kind of file [`convert`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// A GGUF file.
    Gguf,
    /// One safetensors file.
    Safetensors,
    /// A sharded safetensors model read through its `*.safetensors.index.json`.
    ShardedSafetensors,
}

/// What happened to one tensor of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorAction {
    /// An already-quantized tensor imported losslessly and encoded.
    Imported {
        /// `GGUF Q4_1`, `MLX`, ...
        source: String,
        /// Bits per symbol.
        bits: u32,
        /// Columns per scale/bias group.
        group_size: usize,
    },
    /// A float matrix quantized and encoded.
    Quantized {
        /// Bits per symbol.
        bits: u32,
        /// Columns per scale/bias group.
        group_size: usize,
    },
    /// Copied unchanged.
    Passthrough,
}

/// One output tensor of a conversion.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertedTensor {
    /// The name in the output (for MLX triples, `stem.weight`).
    pub name: String,
    /// What was done.
    pub action: TensorAction,
    /// Weights of an encoded tensor (0 for passthrough).
    pub weights: u64,
    /// Stored bits of an encoded tensor's symbol stream ([`EcTensor::stream_bits`]; 0 for passthrough).
    pub stream_bits: u64,
}

/// The outcome of [`convert`].
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertReport {
    /// The input's kind.
    pub format: InputFormat,
    /// Every output tensor, in the order processed.
    pub tensors: Vec<ConvertedTensor>,
    /// Bytes of input (all shards).
    pub input_bytes: u64,
    /// Bytes of the written container.
    pub output_bytes: u64,
    /// Whether the output was read back and compared with the source.
    pub verified: bool,
}

impl ConvertReport {
    /// Number of encoded tensors.
    pub fn encoded(&self) -> usize {
        self.tensors.iter().filter(|t| t.action != TensorAction::Passthrough).count()
    }
    /// Number of passthrough tensors.
    pub fn passthrough(&self) -> usize {
        self.tensors.len() - self.encoded()
    }
    /// Weights in encoded tensors.
    pub fn weights(&self) -> u64 {
        self.tensors.iter().map(|t| t.weights).sum()
    }
    /// Stored bits of all symbol streams.
    pub fn stream_bits(&self) -> u64 {
        self.tensors.iter().map(|t| t.stream_bits).sum()
    }
}

/// One unit of work, planned before anything is written.
#[derive(Clone, Debug)]
enum Job {
    Gguf { name: String, ty: GgmlType },
    Mlx { stem: String, name: String, bits: u32, group_size: Option<usize> },
    Float { name: String, config: QuantConfig },
    Raw { name: String },
}

impl Job {
    fn name(&self) -> &str {
        match self {
            Job::Gguf { name, .. } | Job::Mlx { name, .. } | Job::Float { name, .. } | Job::Raw { name } => name,
        }
    }
}

/// One or more safetensors files seen as one set of tensors.
struct Shards {
    files: Vec<SafetensorsFile>,
    owner: BTreeMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl Shards {
    fn single(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path).map_err(|e| with_path(path, e))?;
        let owner = file.tensors().keys().map(|n| (n.clone(), 0)).collect();
        let metadata = file.metadata().clone();
        Ok(Self { files: vec![file], owner, metadata })
    }

    /// Opens the shards an index names. Shard names must be plain file names in the index's directory, every
    /// tensor of the map must be in its shard, and every tensor of a shard must be in the map.
    fn index(path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            metadata: serde_json::Map<String, serde_json::Value>,
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| {
            Error::file(format!("{}: not a safetensors index (a JSON object with `weight_map`): {e}", path.display()))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::new();
        let mut slot = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for shard in shard_names {
            let plain = Path::new(shard).components().count() == 1
                && matches!(Path::new(shard).components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                return Err(Error::file(format!(
                    "{}: shard `{shard}` is not a file name in the index's directory",
                    path.display()
                )));
            }
            let shard_path = dir.join(shard);
            let file = SafetensorsFile::open(&shard_path).map_err(|e| with_path(&shard_path, e))?;
            for (k, v) in file.metadata() {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            slot.insert(shard.clone(), files.len());
            files.push(file);
        }
        for (k, v) in &index.metadata {
            if let serde_json::Value::String(s) = v {
                metadata.entry(k.clone()).or_insert_with(|| s.clone());
            }
        }
        let mut owner = BTreeMap::new();
        for (name, shard) in &index.weight_map {
            let i = slot[shard];
            if !files[i].tensors().contains_key(name) {
                return Err(Error::file(format!(
                    "{}: the index puts tensor `{name}` in {shard}, which does not hold it",
                    path.display()
                )));
            }
            owner.insert(name.clone(), i);
        }
        for (shard, &i) in &slot {
            if let Some(name) = files[i].tensors().keys().find(|n| owner.get(*n) != Some(&i)) {
                return Err(Error::file(format!(
                    "{}: shard {shard} holds tensor `{name}`, which the index's weight_map does not assign to it",
                    path.display()
                )));
            }
        }
        Ok(Self { files, owner, metadata })
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        self.owner.get(name).map(|&i| &self.files[i]).ok_or_else(|| Error::TensorNotFound(name.into()))
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        self.file_of(name)?.view(name)
    }

    fn release(&self, name: &str) {
        if let Ok(f) = self.file_of(name) {
            let _ = f.release(name);
        }
    }

    fn release_bytes(&self, name: &str, data: &[u8]) {
        if let Ok(f) = self.file_of(name) {
            f.release_bytes(data);
        }
    }

    fn input_bytes(&self) -> u64 {
        self.files.iter().map(|f| std::fs::metadata(f.path()).map(|m| m.len()).unwrap_or(0)).sum()
    }
}

enum Source {
    Gguf(GgufFile),
    St(Shards, InputFormat),
}

impl Source {
    fn open(path: &Path) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if name.ends_with(".json") {
            return Ok(Source::St(Shards::index(path)?, InputFormat::ShardedSafetensors));
        }
        let mut magic = [0u8; 4];
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n == 4 && magic == gguf::GGUF_MAGIC || name.ends_with(".gguf") {
            return Ok(Source::Gguf(GgufFile::open(path)?));
        }
        Ok(Source::St(Shards::single(path)?, InputFormat::Safetensors))
    }

    fn format(&self) -> InputFormat {
        match self {
            Source::Gguf(_) => InputFormat::Gguf,
            Source::St(_, f) => *f,
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        match self {
            Source::Gguf(g) => vec![g.path().to_path_buf()],
            Source::St(s, _) => s.files.iter().map(|f| f.path().to_path_buf()).collect(),
        }
    }

    fn input_bytes(&self) -> u64 {
        match self {
            Source::Gguf(g) => std::fs::metadata(g.path()).map(|m| m.len()).unwrap_or(0),
            Source::St(s, _) => s.input_bytes(),
        }
    }
}

/// Prefixes the reason of a file error with the path it concerns.
fn with_path(path: &Path, e: Error) -> Error {
    match e {
        Error::InvalidFile { reason } => Error::file(format!("{}: {reason}", path.display())),
        other => other,
    }
}

/// Names the tensor in errors whose message does not.
fn in_tensor(name: &str, e: Error) -> Error {
    match e {
        Error::InvalidParameter { .. } | Error::ShapeMismatch { .. } | Error::CorruptStream { .. } => {
            Error::file(format!("tensor `{name}`: {e}"))
        }
        other => other,
    }
}

fn float_dtype(d: Dtype) -> Option<ScaleDtype> {
    d.to_scale_dtype()
}

/// MLX quantization parameters: a default and per-stem overrides, as config.json's `quantization` holds them.
#[derive(Default)]
struct MlxConfig {
    bits: Option<u32>,
    group_size: Option<usize>,
    per_stem: BTreeMap<String, (Option<u32>, Option<usize>)>,
}

impl MlxConfig {
    fn parse(value: &serde_json::Value, origin: String) -> Result<Self> {
        let obj =
            value.as_object().ok_or_else(|| Error::file(format!("{origin}: `quantization` is not a JSON object")))?;
        let num = |v: Option<&serde_json::Value>, what: &str| -> Result<Option<u64>> {
            match v {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| Error::file(format!("{origin}: `quantization` {what} {v} is not a whole number"))),
            }
        };
        let mut cfg = MlxConfig {
            bits: num(obj.get("bits"), "bits")?.map(|b| b as u32),
            group_size: num(obj.get("group_size"), "group_size")?.map(|g| g as usize),
            per_stem: BTreeMap::new(),
        };
        for (k, v) in obj {
            if let Some(o) = v.as_object() {
                let b = num(o.get("bits"), &format!("`{k}` bits"))?.map(|b| b as u32);
                let g = num(o.get("group_size"), &format!("`{k}` group_size"))?.map(|g| g as usize);
                cfg.per_stem.insert(k.clone(), (b, g));
            }
        }
        Ok(cfg)
    }

    /// Reads the file's `quantization` metadata, else `config.json` next to `input`.
    fn find(metadata: &BTreeMap<String, String>, input: &Path) -> Result<Option<Self>> {
        if let Some(q) = metadata.get("quantization") {
            let v: serde_json::Value = serde_json::from_str(q)
                .map_err(|e| Error::file(format!("metadata `quantization` is not JSON: {e}")))?;
            return Self::parse(&v, "metadata `quantization`".into()).map(Some);
        }
        let config = input.parent().unwrap_or(Path::new(".")).join("config.json");
        let Ok(text) = std::fs::read_to_string(&config) else { return Ok(None) };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(format!("{}: not JSON: {e}", config.display())))?;
        let q = v.get("quantization").or_else(|| v.get("quantization_config"));
        match q {
            Some(q) => Self::parse(q, config.display().to_string()).map(Some),
            None => Ok(None),
        }
    }

    fn for_stem(&self, stem: &str) -> (Option<u32>, Option<usize>) {
        let (b, g) = self.per_stem.get(stem).copied().unwrap_or((None, None));
        (b.or(self.bits), g.or(self.group_size))
    }
}

/// Decides what to do with every tensor, before anything is written.
fn plan(source: &Source, input: &Path, options: &ConvertOptions) -> Result<Vec<Job>> {
    let gs = options.quant.group_size;
    let float_config = |dtype: Dtype| -> Option<QuantConfig> {
        let sd = float_dtype(dtype)?;
        Some(QuantConfig {
            scale_dtype: if options.scales_follow_input { sd } else { options.quant.scale_dtype },
            ..options.quant
        })
    };
    let eligible = |shape: &[usize]| shape.len() == 2 && shape[0] > 0 && shape[1] > 0 && shape[1] % gs == 0;
    let mut jobs = Vec::new();
    match source {
        Source::Gguf(g) => {
            let quantized_model =
                g.tensors().iter().any(|t| !matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16));
            for t in g.tensors() {
                let name = t.name.clone();
                match t.ggml_type {
                    GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => jobs.push(Job::Gguf { name, ty: t.ggml_type }),
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                        let dtype = match t.ggml_type {
                            GgmlType::F32 => Dtype::F32,
                            GgmlType::F16 => Dtype::F16,
                            _ => Dtype::BF16,
                        };
                        match float_config(dtype) {
                            Some(config)
                                if eligible(&t.shape()) && options.select.quantizes(&name, quantized_model) =>
                            {
                                jobs.push(Job::Float { name, config })
                            }
                            _ => jobs.push(Job::Raw { name }),
                        }
                    }
                    _ => return Err(gguf::unsupported(t)),
                }
            }
        }
        Source::St(s, _) => {
            if s.metadata.contains_key(VERSION_KEY) {
                return Err(Error::file(format!(
                    "{} is already an ecq container; unpack it to MLX format first to convert it again",
                    input.display()
                )));
            }
            let names: HashSet<&str> = s.owner.keys().map(String::as_str).collect();
            let mut consumed = HashSet::new();
            let mut mlx = Vec::new();
            for name in s.owner.keys() {
                let Some(stem) = name.strip_suffix(".weight") else { continue };
                let (scales, biases) = (format!("{stem}.scales"), format!("{stem}.biases"));
                if !(names.contains(scales.as_str()) && names.contains(biases.as_str())) {
                    continue;
                }
                let info = s.file_of(name)?.info(name)?;
                if info.dtype != Dtype::U32 {
                    continue;
                }
                consumed.insert(scales);
                consumed.insert(biases);
                mlx.push((stem.to_string(), name.clone()));
            }
            let config = if mlx.is_empty() { None } else { MlxConfig::find(&s.metadata, input)? };
            // Scales or biases of a packed integer weight that is not a full MLX triple (another quantization
            // scheme) are never quantized themselves, and mark the model as already quantized.
            let packed_side = |name: &str| {
                let stem = name.strip_suffix(".scales").or_else(|| name.strip_suffix(".biases"));
                stem.and_then(|st| s.view(&format!("{st}.weight")).ok())
                    .is_some_and(|w| matches!(w.dtype, Dtype::U32 | Dtype::U8 | Dtype::I32 | Dtype::I8))
            };
            let quantized_model = !mlx.is_empty() || s.owner.keys().any(|n| packed_side(n));
            let mut mlx = mlx.into_iter().peekable();
            for name in s.owner.keys() {
                if consumed.contains(name) {
                    continue;
                }
                if mlx.peek().is_some_and(|(_, n)| n == name) {
                    let (stem, name) = mlx.next().expect("peeked");
                    let (cfg_bits, group_size) = config.as_ref().map(|c| c.for_stem(&stem)).unwrap_or((None, None));
                    let bits = options.mlx_bits.or(cfg_bits).ok_or_else(|| {
                        Error::file(format!(
                            "`{name}` is an MLX-quantized weight (U32 with `{stem}.scales` and `{stem}.biases`) but \
                             its bit width is unknown: put the model's config.json next to the input or pass the \
                             bit width (--mlx-bits)"
                        ))
                    })?;
                    jobs.push(Job::Mlx { stem, name, bits, group_size });
                    continue;
                }
                let info = s.file_of(name)?.info(name)?;
                match float_config(info.dtype) {
                    Some(config)
                        if eligible(&info.shape)
                            && !packed_side(name)
                            && options.select.quantizes(name, quantized_model) =>
                    {
                        jobs.push(Job::Float { name: name.clone(), config })
                    }
                    _ => jobs.push(Job::Raw { name: name.clone() }),
                }
            }
        }
    }
    Ok(jobs)
}

/// A float tensor's bytes, shape and dtype, wherever it comes from.
fn float_source<'a>(source: &'a Source, name: &str) -> Result<(Dtype, Vec<usize>, &'a [u8])> {
    match source {
        Source::Gguf(g) => match g.tensor(name)? {
            gguf::GgufTensor::Raw { dtype, shape, data } => Ok((dtype, shape, data)),
            gguf::GgufTensor::Quantized { .. } => {
                Err(Error::param("tensor", format!("`{name}` is not a float tensor")))
            }
        },
        Source::St(s, _) => {
            let v = s.view(name)?;
            Ok((v.dtype, v.shape.to_vec(), v.data))
        }
    }
}

fn release(source: &Source, name: &str) {
    match source {
        Source::Gguf(g) => {
            let _ = g.release(name);
        }
        Source::St(s, _) => s.release(name),
    }
}

/// Quantizes a float matrix a chunk of rows at a time, releasing each chunk's mapped pages once read.
fn quantize_float(source: &Source, name: &str, config: QuantConfig) -> Result<QuantizedMatrix> {
    let (dtype, shape, data) = float_source(source, name)?;
    let (rows, cols) = (shape[0], shape[1]);
    let size = dtype.size();
    let chunk_rows = (FLOAT_CHUNK_BYTES / (4 * cols).max(1)).max(1);
    let mut q = QuantizedMatrix {
        rows,
        cols,
        bits: config.bits,
        group_size: config.group_size,
        symbols: Vec::with_capacity(rows * cols),
        scales: Vec::with_capacity(rows * cols / config.group_size),
        biases: Vec::with_capacity(rows * cols / config.group_size),
        scale_dtype: config.scale_dtype,
    };
    for (c, bytes) in data.chunks(chunk_rows * cols * size).enumerate() {
        let n = bytes.len() / (cols * size);
        let w = TensorView { dtype, shape: &[], data: bytes }.to_f32(name)?;
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::file(format!(
                "tensor `{name}`: weight at row {}, column {} is {}; only finite weights can be quantized",
                c * chunk_rows + i / cols,
                i % cols,
                w[i]
            )));
        }
        let part = quant::quantize(&w, n, cols, config).map_err(|e| in_tensor(name, e))?;
        drop(w);
        match source {
            Source::Gguf(_) => {}
            Source::St(s, _) => s.release_bytes(name, bytes),
        }
        q.symbols.extend_from_slice(&part.symbols);
        q.scales.extend_from_slice(&part.scales);
        q.biases.extend_from_slice(&part.biases);
    }
    release(source, name);
    Ok(q)
}

/// The quantized matrix a job stands for, read from the source.
fn source_matrix(source: &Source, job: &Job) -> Result<QuantizedMatrix> {
    let q = match (job, source) {
        (Job::Gguf { name, .. }, Source::Gguf(g)) => {
            let q = g.quantized(name)?;
            let _ = g.release(name);
            q
        }
        (Job::Mlx { stem, name, bits, group_size }, Source::St(s, _)) => {
            let names = [name.clone(), format!("{stem}.scales"), format!("{stem}.biases")];
            let q = import_mlx(stem, &s.view(&names[0])?, &s.view(&names[1])?, &s.view(&names[2])?, *bits)?;
            for n in &names {
                s.release(n);
            }
            if let Some(g) = group_size {
                if *g != q.group_size {
                    return Err(Error::file(format!(
                        "MLX weight `{name}`: the quantization config says group_size {g}, but its shapes give \
                         {} ({} columns in {} groups)",
                        q.group_size,
                        q.cols,
                        q.cols / q.group_size
                    )));
                }
            }
            q
        }
        (Job::Float { name, config }, _) => quantize_float(source, name, *config)?,
        _ => return Err(Error::param("job", format!("`{}` does not match its source", job.name()))),
    };
    Ok(q)
}

fn scalar_metadata(v: &GgufValue) -> Option<String> {
    Some(match v {
        GgufValue::String(s) => s.clone(),
        GgufValue::Bool(b) => b.to_string(),
        GgufValue::F32(x) => x.to_string(),
        GgufValue::F64(x) => x.to_string(),
        GgufValue::I8(x) => x.to_string(),
        GgufValue::I16(x) => x.to_string(),
        GgufValue::I32(x) => x.to_string(),
        GgufValue::I64(x) => x.to_string(),
        GgufValue::Array { .. } => return None,
        other => other.as_u64()?.to_string(),
    })
}

fn is_reserved(key: &str) -> bool {
    key.starts_with("ecq.") || key.ends_with(".ecq") || key == "__metadata__"
}

/// Converts the model at `input` into an ecq container at `output` (see the module documentation), calling
/// `progress` before each tensor and at the end of each stage.
///
/// ```no_run
/// use ecq::model::{convert, ConvertOptions};
///
/// let options = ConvertOptions { verify: true, ..ConvertOptions::default() };
/// let report = convert("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), "smollm2.ecq.safetensors".as_ref(), &options,
///     &mut |p| eprintln!("{:?} {}/{} {}", p.stage, p.done, p.total, p.tensor))?;
/// println!("{} encoded, {:.3} bits/weight", report.encoded(), report.stream_bits() as f64 / report.weights() as f64);
/// # Ok::<(), ecq::Error>(())
/// ```
pub fn convert(
    input: &Path,
    output: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport> {
    options.quant.validate()?;
    if !(1..=rans::MAX_PRECISION).contains(&options.encode.precision) {
        return Err(Error::param(
            "precision",
            format!("{} is outside 1..={}", options.encode.precision, rans::MAX_PRECISION),
        ));
    }
    if options.encode.segment > crate::format::MAX_SEGMENT {
        return Err(Error::param(
            "segment",
            format!("{} is outside 0..={} (0: from the shape)", options.encode.segment, crate::format::MAX_SEGMENT),
        ));
    }
    if let Some(b) = options.mlx_bits {
        if !(1..=8).contains(&b) {
            return Err(Error::param("mlx_bits", format!("{b} is outside 1..=8")));
        }
    }
    let source = Source::open(input)?;
    let mut inputs = source.paths();
    inputs.push(input.to_path_buf());
    crate::format::refuse_overwrite(&inputs, output)?;
    let jobs = plan(&source, input, options)?;

    let mut writer = ContainerWriter::create(output)?;
    match &source {
        Source::Gguf(g) => {
            for (k, v) in g.metadata() {
                if let Some(v) = scalar_metadata(v).filter(|_| !is_reserved(k)) {
                    writer.set_metadata(k, &v)?;
                }
            }
        }
        Source::St(s, _) => {
            for (k, v) in s.metadata.iter().filter(|(k, _)| !is_reserved(k) && k.as_str() != "quantization") {
                writer.set_metadata(k, v)?;
            }
        }
    }
    let total = jobs.len();
    let mut tensors = Vec::with_capacity(total);
    for (i, job) in jobs.iter().enumerate() {
        progress(Progress { stage: Stage::Convert, done: i, total, tensor: job.name() });
        let name = job.name();
        if let Job::Raw { .. } = job {
            let (dtype, shape, data) = match &source {
                Source::Gguf(g) => {
                    let info = g.tensor_info(name)?;
                    let dtype = match info.ggml_type {
                        GgmlType::F32 => Dtype::F32,
                        GgmlType::F16 => Dtype::F16,
                        _ => Dtype::BF16,
                    };
                    (dtype, info.shape(), g.tensor_bytes(name)?)
                }
                Source::St(s, _) => {
                    let v = s.view(name)?;
                    (v.dtype, v.shape.to_vec(), v.data)
                }
            };
            writer.add_raw(name, dtype, &shape, data)?;
            release(&source, name);
            tensors.push(ConvertedTensor {
                name: name.to_string(),
                action: TensorAction::Passthrough,
                weights: 0,
                stream_bits: 0,
            });
            continue;
        }
        let q = source_matrix(&source, job)?;
        let t = EcTensor::encode(&q, options.encode).map_err(|e| in_tensor(name, e))?;
        let (bits, group_size, weights) = (q.bits, q.group_size, (q.rows * q.cols) as u64);
        drop(q);
        writer.add_encoded(name, &t)?;
        let action = match job {
            Job::Gguf { ty, .. } => {
                TensorAction::Imported { source: format!("GGUF {}", ty.name().unwrap_or("?")), bits, group_size }
            }
            Job::Mlx { .. } => TensorAction::Imported { source: "MLX".into(), bits, group_size },
            _ => TensorAction::Quantized { bits, group_size },
        };
        tensors.push(ConvertedTensor { name: name.to_string(), action, weights, stream_bits: t.stream_bits() });
    }
    progress(Progress { stage: Stage::Convert, done: total, total, tensor: "" });
    writer.finish()?;
    if options.verify {
        if let Err(e) = verify(&source, &jobs, output, progress) {
            let _ = std::fs::remove_file(output);
            return Err(e);
        }
    }
    Ok(ConvertReport {
        format: source.format(),
        tensors,
        input_bytes: source.input_bytes(),
        output_bytes: std::fs::metadata(output).map(|m| m.len()).unwrap_or(0),
        verified: options.verify,
    })
}

fn mismatch(tensor: &str, what: impl Into<String>) -> Error {
    Error::VerifyFailed { tensor: tensor.into(), what: what.into() }
}

fn same_values(name: &str, what: &str, a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        return Err(mismatch(name, format!("{what}: {} values written, {} in the source", a.len(), b.len())));
    }
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
        return Err(mismatch(name, format!("{what}[{i}] is {} but the source has {}", a[i], b[i])));
    }
    Ok(())
}

/// Compares an encoded tensor with its source matrix: parameters, the bits of every scale and bias, and the
/// symbols, decoded one row tile at a time (in parallel) so that no second full-size copy is made.
fn same_encoded(name: &str, got: &EcTensor, want: &QuantizedMatrix) -> Result<()> {
    let params = (got.rows(), got.cols(), got.bits(), got.group_size(), got.scale_dtype());
    let source = (want.rows, want.cols, want.bits, want.group_size, want.scale_dtype);
    if params != source {
        return Err(mismatch(name, format!("parameters {params:?} differ from the source's {source:?}")));
    }
    same_values(name, "scales", got.scales(), &want.scales)?;
    same_values(name, "biases", got.biases(), &want.biases)?;
    let cols = got.cols();
    let dtable = rans::DecodeTable::new(got.table());
    (0..got.layout().row_tiles()).into_par_iter().try_for_each(|rt| {
        let row0 = rt * rans::LANES;
        let active = (got.rows() - row0).min(rans::LANES);
        let mut buf = vec![0u8; active * cols];
        got.decode_row_tile(&dtable, rt, &mut buf).map_err(|e| mismatch(name, format!("decoding failed: {e}")))?;
        let expected = &want.symbols[row0 * cols..(row0 + active) * cols];
        match buf.iter().zip(expected).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(i) => Err(mismatch(
                name,
                format!(
                    "symbol at row {}, column {} is {} but the source has {}",
                    row0 + i / cols,
                    i % cols,
                    buf[i],
                    expected[i]
                ),
            )),
        }
    })
}

fn release_output(file: &EcFile, name: &str) {
    let st = file.safetensors();
    if let Ok(info) = file.encoded_info(name) {
        let a = &info.arrays;
        for array in [&a.words, &a.tile_offsets, &a.states, &a.freqs, &a.scales, &a.biases] {
            let _ = st.release(array);
        }
    } else {
        let _ = st.release(name);
    }
}

/// Reopens `output` and compares every tensor with its source.
fn verify(source: &Source, jobs: &[Job], output: &Path, progress: &mut dyn FnMut(Progress<'_>)) -> Result<()> {
    let file = EcFile::open(output)?;
    let total = jobs.len();
    let expected_raw = jobs.iter().filter(|j| matches!(j, Job::Raw { .. })).count();
    let (enc, raw) = (file.encoded_names().count(), file.raw_names().count());
    if (enc, raw) != (total - expected_raw, expected_raw) {
        return Err(mismatch(
            "*",
            format!(
                "the file holds {enc} encoded and {raw} passthrough tensors, expected {} and {expected_raw}",
                total - expected_raw
            ),
        ));
    }
    for (i, job) in jobs.iter().enumerate() {
        let name = job.name();
        progress(Progress { stage: Stage::Verify, done: i, total, tensor: name });
        if let Job::Raw { .. } = job {
            let got = file.raw(name)?;
            let (dtype, shape, data) = match source {
                Source::Gguf(g) => {
                    let info = g.tensor_info(name)?;
                    let d = match g.tensor(name)? {
                        gguf::GgufTensor::Raw { dtype, .. } => dtype,
                        _ => return Err(mismatch(name, "source is not a raw tensor")),
                    };
                    (d, info.shape(), g.tensor_bytes(name)?)
                }
                Source::St(s, _) => {
                    let v = s.view(name)?;
                    (v.dtype, v.shape.to_vec(), v.data)
                }
            };
            if got.dtype != dtype || got.shape != shape.as_slice() {
                return Err(mismatch(
                    name,
                    format!("stored as {} {:?}, the source is {dtype} {shape:?}", got.dtype, got.shape),
                ));
            }
            if got.data != data {
                let at = got.data.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
                return Err(mismatch(name, format!("passthrough bytes differ from the source at byte {at}")));
            }
        } else {
            let got = file.tensor(name)?;
            // `got` owns its arrays now: the mapped pages they were read from can go before the source is read.
            release_output(&file, name);
            let want = source_matrix(source, job)?;
            same_encoded(name, &got, &want)?;
        }
        release(source, name);
        release_output(&file, name);
    }
    progress(Progress { stage: Stage::Verify, done: total, total, tensor: "" });
    Ok(())
}

/// Sizes of one encoded tensor against the order-0 entropy of its symbols, all in bits.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStats {
    /// Tensor name.
    pub name: String,
    /// Rows `N`.
    pub rows: usize,
    /// Columns `K`.
    pub cols: usize,
    /// Bits per symbol.
    pub bits: u32,
    /// Columns per scale/bias group.
    pub group_size: usize,
    /// Stored symbol stream: words, states, tile offsets, frequency table and a split tensor's low words
    /// ([`EcTensor::stream_bits`]).
    pub stream_bits: u64,
    /// The payload: the 16-bit words and a split tensor's low words.
    pub word_bits: u64,
    /// Order-0 entropy of the decoded symbols times their count: the bound a static per-symbol code meets.
    pub entropy_bits: f64,
    /// Stored scales.
    pub scale_bits: u64,
    /// Stored biases.
    pub bias_bits: u64,
}

impl TensorStats {
    /// Weights, `rows * cols`.
    pub fn weights(&self) -> u64 {
        (self.rows * self.cols) as u64
    }
    /// States, offsets and table: `stream_bits - word_bits`.
    pub fn side_bits(&self) -> u64 {
        self.stream_bits - self.word_bits
    }
    /// Everything stored for the tensor: stream, scales and biases.
    pub fn total_bits(&self) -> u64 {
        self.stream_bits + self.scale_bits + self.bias_bits
    }
}

/// A loaded ecq container: tensors by name, and an [`EcMatmul`] for each encoded weight.
///
/// ```no_run
/// use ecq::EcModel;
///
/// let model = EcModel::open("smollm2.ecq.safetensors")?;
/// let up = model.matmul_cpu("blk.0.ffn_up.weight")?;
/// let x = vec![0.5f32; up.cols()];
/// let mut y = vec![0f32; up.rows()];
/// up.matvec(&x, &mut y)?;
/// let norm = model.raw("blk.0.attn_norm.weight")?;
/// assert_eq!(norm.shape, &[576]);
/// # Ok::<(), ecq::Error>(())
/// ```
///
/// The file is memory-mapped and its header validated by [`EcFile::open`]; tensors are read, checksummed and
/// validated when asked for.
#[derive(Debug)]
pub struct EcModel {
    file: EcFile,
}

/// One tensor of an [`EcModel`].
// Returned one at a time, never stored in bulk: the size of the encoded variant's fields does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ModelTensor<'a> {
    /// An encoded weight matrix.
    Encoded(EcTensor),
    /// A passthrough tensor: dtype, shape and bytes borrowed from the map.
    Raw(TensorView<'a>),
}

impl EcModel {
    /// Opens and validates an ecq container.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Ok(Self { file: EcFile::open(path).map_err(|e| with_path(path, e))? })
    }

    /// Wraps an already opened container.
    pub fn from_file(file: EcFile) -> Self {
        Self { file }
    }

    /// The underlying container.
    pub fn file(&self) -> &EcFile {
        &self.file
    }

    /// Every tensor name, encoded and passthrough, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.file.encoded_names().chain(self.file.raw_names()).collect();
        names.sort_unstable();
        names
    }

    /// Names of the encoded weights, sorted.
    pub fn encoded_names(&self) -> impl Iterator<Item = &str> {
        self.file.encoded_names()
    }

    /// Whether `name` is an encoded weight.
    pub fn is_encoded(&self, name: &str) -> bool {
        self.file.encoded_info(name).is_ok()
    }

    /// Tensor `name`, encoded or passthrough, checksums verified.
    pub fn tensor(&self, name: &str) -> Result<ModelTensor<'_>> {
        if self.is_encoded(name) {
            self.file.tensor(name).map(ModelTensor::Encoded)
        } else {
            self.file.raw(name).map(ModelTensor::Raw)
        }
    }

    /// Encoded weight `name` (an error naming the tensor if it is absent or a passthrough tensor).
    pub fn encoded(&self, name: &str) -> Result<EcTensor> {
        if !self.is_encoded(name) && self.file.raw(name).is_ok() {
            return Err(Error::param(
                "name",
                format!("tensor `{name}` is stored unencoded (passthrough); only encoded weights have an EcMatmul"),
            ));
        }
        self.file.tensor(name)
    }

    /// Passthrough tensor `name`: dtype, shape and bytes, checksum verified.
    pub fn raw(&self, name: &str) -> Result<TensorView<'_>> {
        self.file.raw(name)
    }

    /// The CPU [`EcMatmul`] of encoded weight `name`.
    pub fn matmul_cpu(&self, name: &str) -> Result<EcMatmul> {
        Ok(EcMatmul::cpu(&self.encoded(name)?))
    }

    /// The [`EcMatmul`] of encoded weight `name` on `ctx`'s device with `strategy`.
    #[cfg(feature = "gpu")]
    pub fn matmul(&self, ctx: &crate::gpu::GpuContext, name: &str, strategy: crate::Strategy) -> Result<EcMatmul> {
        EcMatmul::new(ctx, &self.encoded(name)?, strategy)
    }

    /// A CPU [`EcMatmul`] for every encoded weight, by name.
    pub fn matmuls_cpu(&self) -> Result<BTreeMap<String, EcMatmul>> {
        self.file.encoded_names().map(|n| Ok((n.to_string(), self.matmul_cpu(n)?))).collect()
    }

    /// Sizes of encoded weight `name` against its entropy bound (decodes it to count the symbols).
    pub fn stats(&self, name: &str) -> Result<TensorStats> {
        let t = self.encoded(name)?;
        let symbols = t.decode_symbols()?;
        let mut hist = vec![0u64; 1 << t.bits()];
        for &q in &symbols {
            hist[q as usize] += 1;
        }
        let half = t.scale_bits() / 2;
        let stats = TensorStats {
            name: name.to_string(),
            rows: t.rows(),
            cols: t.cols(),
            bits: t.bits(),
            group_size: t.group_size(),
            stream_bits: t.stream_bits(),
            word_bits: 16 * t.stream().words.len() as u64 + 32 * t.low().map_or(0, |l| l.len()) as u64,
            entropy_bits: rans::entropy_bits(&hist) * symbols.len() as f64,
            scale_bits: half,
            bias_bits: half,
        };
        self.release(name);
        Ok(stats)
    }

    /// Releases the mapped pages of tensor `name` (see [`SafetensorsFile::release`]).
    pub fn release(&self, name: &str) {
        release_output(&self.file, name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_stars_and_question_marks() {
        assert!(glob_match("*", "a.b.c"));
        assert!(glob_match("*embed*", "model.embed_tokens.weight"));
        assert!(glob_match("blk.?.ffn_*.weight", "blk.3.ffn_up.weight"));
        assert!(!glob_match("blk.?.ffn_*.weight", "blk.13.ffn_up.weight"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn selection_default_depends_on_the_model() {
        let s = TensorSelection::default();
        assert!(s.quantizes("model.embed_tokens.weight", false));
        assert!(!s.quantizes("lm_head.weight", true));
        let s = TensorSelection { include: vec!["lm_*".into()], exclude: vec!["*embed*".into()] };
        assert!(s.quantizes("lm_head.weight", true));
        assert!(!s.quantizes("model.embed_tokens.weight", false));
        assert!(!s.quantizes("model.layers.0.mlp.up_proj.weight", false));
    }
}
