//! The `ecq` command line: convert, inspect, verify and unpack ecq containers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ecq::format::{ArrayNames, ContainerWriter, Dtype, EcFile, EncodeOptions, SplitForm, MAX_SEGMENT};
use ecq::model::{self, ConvertOptions, Progress, Stage, TensorSelection, TensorStats};
use ecq::quant::{self, QuantConfig, ScaleDtype};
use ecq::rans;
use ecq::EcModel;

const ABOUT: &str = "Store language-model weights as quantized symbols compressed with rANS (ecq containers)";

const LONG_ABOUT: &str = "\
Store language-model weights as quantized symbols compressed with rANS.

An ecq container is a safetensors file: each encoded weight matrix keeps its MLX-style scales and biases
and replaces the packed 4-bit words by a compressed symbol stream. Other tensors (norms, 1-D biases) are
stored unchanged. The format is described in docs/FORMAT.md.

Typical use:
  ecq convert model.safetensors model.ecq.safetensors      quantize (4 bits, group 64) and compress
  ecq convert model.Q4_1.gguf model.ecq.safetensors --verify   re-encode a GGUF model losslessly
  ecq inspect model.ecq.safetensors                        sizes against the entropy bound
  ecq verify  model.ecq.safetensors                        decode everything, check all checksums
  ecq unpack  model.ecq.safetensors model.mlx.safetensors  back to an MLX-format quantized checkpoint

Exit status: 0 on success, 1 on any error or fault (the message says what and where).";

#[derive(Parser)]
#[command(name = "ecq", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a GGUF, safetensors or sharded safetensors model into an ecq container.
    ///
    /// Already-quantized weights are imported losslessly and their symbols compressed as they are: GGUF
    /// Q4_0, Q4_1 and Q8_0 tensors, and MLX-quantized safetensors (`NAME.weight` U32 with `NAME.scales` and
    /// `NAME.biases`; the bit width comes from the file's `quantization` metadata, config.json next to the input,
    /// or --mlx-bits). Other GGUF quantized types (Q6_K, ...) are refused with an error naming the tensor.
    ///
    /// 2-D F32, F16 or BF16 tensors whose column count is a multiple of the group size are quantized MLX-style
    /// (w = scale * q + bias per group of columns, scales and biases kept in the input's dtype): in a float
    /// model all of them, embedding tables included (--exclude '*embed*' keeps those float); in an
    /// already-quantized model none, unless --include names them. Every other tensor is copied unchanged.
    ///
    /// Tensors are processed one at a time from memory maps, so memory stays bounded by the largest tensor.
    /// The output is written to a temporary file next to OUT, synced and renamed when complete; on any error
    /// nothing is left behind, and the input is never overwritten.
    Convert {
        /// The input model: a .gguf file, a .safetensors file, or the *.safetensors.index.json of a sharded
        /// safetensors model.
        input: PathBuf,
        /// Where to write the ecq container (replaced if it exists; must not be the input).
        output: PathBuf,
        /// Bits per weight for quantized float tensors: 2, 3, 4, 5, 6 or 8.
        #[arg(long, default_value_t = 4)]
        bits: u32,
        /// Columns sharing one scale and bias in quantized float tensors: 32, 64 or 128.
        #[arg(long, default_value_t = 64)]
        group_size: usize,
        /// Probability precision P of the rANS frequency table, 1..=12 (12 codes closest to the entropy; 11, the
        /// default, halves the decode table for a few hundredths of a percent).
        #[arg(long, default_value_t = rans::DEFAULT_PRECISION)]
        precision: u32,
        /// Columns per segment S, rounded up to the group size: one 32-bit state per row per segment (about
        /// 32/S bits per weight of overhead; smaller S gives more independent tiles to decode in parallel).
        /// 0 (the default) splits each row into round(K/512) equal segments.
        #[arg(long, default_value_t = 0)]
        segment: usize,
        /// With the automatic segment: halve the segments of matrices with fewer tiles than this (tiles are 32
        /// rows by one segment), down to 128 columns, so a GPU with many compute units has enough tiles to decode
        /// at once. 0 (the default) keeps the smallest stream. On an NVIDIA H100, 2048 makes a 4096x4096 matrix's
        /// fused product 1.35x as fast for a stream 1.3% larger; on an H200, 3072 makes it 1.14x as fast as 2048
        /// does, for a stream 3.8% larger than the default; matrices that have that many tiles already keep theirs.
        /// Rows of more than 8 segments first take a power of two of them (14336 columns: 32 of 448, not 28 of
        /// 512), so that a GPU shares them out in equal parts.
        #[arg(long, default_value_t = 0)]
        min_tiles: usize,
        /// Split 4-bit matrices: code part of each weight and store the rest as it is. `--split` (or `--split=2`)
        /// codes the high 2 bits, four weights a decode step, and stores the low 2 (format version 2);
        /// `--split=3` codes one bit, eight weights a step, and stores 3 (format version 3; columns and segment
        /// multiples of 32). On SmolLM2-135M's 4-bit tensors the stream grows by 0.6-1.1% (`=3`:
        /// 0.7-1.6%), and the GPU decodes them faster.
        #[arg(long, value_name = "LOW_BITS", num_args = 0..=1, require_equals = true, default_missing_value = "2",
              value_parser = parse_split)]
        split: Option<SplitForm>,
        /// Quantize the float matrices whose names match this glob (`*` any run, `?` one character); repeatable.
        /// Without it: all eligible matrices of a float model, none of an already-quantized one.
        #[arg(long, value_name = "PATTERN")]
        include: Vec<String>,
        /// Keep the float matrices whose names match this glob unquantized; repeatable.
        #[arg(long, value_name = "PATTERN")]
        exclude: Vec<String>,
        /// Bit width of MLX-quantized weights when neither the file's metadata nor config.json gives it.
        #[arg(long, value_name = "BITS")]
        mlx_bits: Option<u32>,
        /// After writing, read the output back, decode every tensor and compare it with the input (symbols,
        /// scales and biases exactly, passthrough bytes equal). On a mismatch the output is removed.
        #[arg(long)]
        verify: bool,
    },
    /// Print a table of every tensor: shape, bits, stored size against the entropy bound, overhead.
    ///
    /// Columns: `bits` is the weight width (`split4` for a split 4-bit tensor, `split4/3` for one that stores 3
    /// bits of each weight); `stored` is the symbol stream in bits per weight (words, states, tile offsets,
    /// frequency table and a split tensor's low words); `entropy` is
    /// the order-0 entropy of the decoded weight symbols in bits per weight (coding k weights per joint symbol can
    /// go slightly below it when neighbours are correlated); `+H` is how far `stored` is above it; `side` is
    /// states + offsets + table as a percentage of the words (low words included); `scale` and `bias` are their
    /// own bits per weight; `all` is stored + scale + bias, everything the tensor costs. A `total` line
    /// sums every encoded tensor, and a table by role follows (layer numbers replaced by `*`).
    Inspect {
        /// An ecq container (a plain safetensors file is listed too, all tensors passthrough).
        file: PathBuf,
    },
    /// Decode every tensor and check every checksum and end state; exit 1 on any fault.
    Verify {
        /// An ecq container.
        file: PathBuf,
    },
    /// Expand an ecq container into an MLX-format quantized safetensors file.
    ///
    /// Each encoded `NAME.weight` becomes `NAME.weight` (U32, the symbols packed MLX-style, 32/bits per word),
    /// `NAME.scales` and `NAME.biases`; other tensors are copied. MLX reads bits and group size from the
    /// model's config.json (`"quantization": {"group_size": G, "bits": B}`); the values are printed at the end.
    Unpack {
        /// An ecq container.
        input: PathBuf,
        /// Where to write the MLX safetensors file (replaced if it exists; must not be the input).
        output: PathBuf,
    },
}

type CliResult<T> = Result<T, String>;

/// `--split`'s value: the low bits stored, 2 or 3.
fn parse_split(v: &str) -> Result<SplitForm, String> {
    v.parse().ok().and_then(SplitForm::from_low_bits).ok_or_else(|| format!("`{v}`: 2 or 3 low bits"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert {
            input,
            output,
            bits,
            group_size,
            precision,
            segment,
            min_tiles,
            split,
            include,
            exclude,
            mlx_bits,
            verify,
        } => {
            let options = ConvertOptions {
                quant: QuantConfig { bits, group_size, scale_dtype: ScaleDtype::F16 },
                encode: EncodeOptions { segment, precision, split, min_tiles },
                select: TensorSelection { include, exclude },
                mlx_bits,
                verify,
                ..ConvertOptions::default()
            };
            convert(&input, &output, &options)
        }
        Command::Inspect { file } => inspect(&file),
        Command::Verify { file } => verify(&file),
        Command::Unpack { input, output } => unpack(&input, &output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn progress(len: usize) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>7} {elapsed_precise} [{bar:40}] {pos}/{len} {wide_msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb
}

fn err(e: ecq::Error) -> String {
    e.to_string()
}

fn convert(input: &Path, output: &Path, options: &ConvertOptions) -> CliResult<()> {
    if !(1..=rans::MAX_PRECISION).contains(&options.encode.precision) {
        return Err(format!("--precision {} is outside 1..={}", options.encode.precision, rans::MAX_PRECISION));
    }
    if options.encode.segment > MAX_SEGMENT {
        return Err(format!("--segment {} is outside 0..={MAX_SEGMENT}", options.encode.segment));
    }
    if options.encode.segment != 0 && options.encode.min_tiles != 0 {
        return Err("--min-tiles shortens the automatic segments; it cannot be given with --segment".to_string());
    }
    let start = Instant::now();
    let pb = progress(0);
    let mut stage = None;
    let mut on_progress = |p: Progress<'_>| {
        if stage != Some(p.stage) {
            stage = Some(p.stage);
            pb.set_prefix(match p.stage {
                Stage::Convert => "convert",
                Stage::Verify => "verify",
            });
            pb.set_length(p.total as u64);
        }
        pb.set_position(p.done as u64);
        pb.set_message(p.tensor.to_string());
    };
    let report = model::convert(input, output, options, &mut on_progress);
    pb.finish_and_clear();
    let report = report.map_err(err)?;
    let weights = report.weights();
    println!(
        "{}: {} tensors encoded ({weights} weights, {:.3} bits/weight of symbol stream), {} passed through; {} -> {} \
         bytes in {:.1} s{}",
        output.display(),
        report.encoded(),
        if weights > 0 { report.stream_bits() as f64 / weights as f64 } else { 0.0 },
        report.passthrough(),
        report.input_bytes,
        report.output_bytes,
        start.elapsed().as_secs_f64(),
        if report.verified { "; verified: every tensor equals its source" } else { "" }
    );
    Ok(())
}

fn open(path: &Path) -> CliResult<EcFile> {
    EcFile::open(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Figures summed over several tensors, all in bits.
#[derive(Default)]
struct Sum {
    tensors: usize,
    weights: u64,
    stream: u64,
    words: u64,
    entropy: f64,
    scales: u64,
    biases: u64,
}

impl Sum {
    fn add(&mut self, s: &TensorStats) {
        self.tensors += 1;
        self.weights += s.weights();
        self.stream += s.stream_bits;
        self.words += s.word_bits;
        self.entropy += s.entropy_bits;
        self.scales += s.scale_bits;
        self.biases += s.bias_bits;
    }

    /// The numeric columns of the table: stored, entropy, +H %, side %, scale, bias, all.
    fn columns(&self) -> String {
        let w = self.weights.max(1) as f64;
        format!(
            "{:>7.4}  {:>7.4}  {:>6.2}  {:>6.2}  {:>6.3}  {:>6.3}  {:>7.4}",
            self.stream as f64 / w,
            self.entropy / w,
            if self.entropy > 0.0 { 100.0 * (self.stream as f64 / self.entropy - 1.0) } else { 0.0 },
            if self.words > 0 { 100.0 * (self.stream - self.words) as f64 / self.words as f64 } else { 0.0 },
            self.scales as f64 / w,
            self.biases as f64 / w,
            (self.stream + self.scales + self.biases) as f64 / w,
        )
    }
}

/// A tensor's role across layers: the first all-digit component of its name replaced by `*`
/// (`blk.3.ffn_up.weight` -> `blk.*.ffn_up.weight`).
fn role(name: &str) -> String {
    let mut parts: Vec<&str> = name.split('.').collect();
    if let Some(p) = parts.iter_mut().find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        *p = "*";
    }
    parts.join(".")
}

fn inspect(path: &Path) -> CliResult<()> {
    let model = EcModel::open(path).map_err(err)?;
    let file = model.file();
    let st = file.safetensors();
    let width = st.tensors().keys().map(|n| n.len()).max().unwrap_or(6).max(6);
    let header = |first: &str| {
        println!(
            "{first:<width$}  {:>14}  {:>6}  {:>5}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}",
            "shape", "bits", "group", "stored", "entropy", "+H %", "side %", "scale", "bias", "all"
        )
    };
    header("tensor");
    let mut total = Sum::default();
    let mut roles: std::collections::BTreeMap<String, Sum> = Default::default();
    let mut faults = 0usize;
    let mut raw_bytes = 0usize;
    for name in model.names() {
        if !model.is_encoded(name) {
            let info = st.info(name).map_err(err)?;
            raw_bytes += info.data_offsets.1 - info.data_offsets.0;
            println!(
                "{name:<width$}  {:>14}  {:>6}  {:>5}  passthrough",
                format!("{:?}", info.shape),
                info.dtype.name(),
                "-"
            );
            continue;
        }
        let info = file.encoded_info(name).map_err(err)?;
        let shape = format!("[{}, {}]", info.layout.rows(), info.layout.cols());
        match model.stats(name) {
            Ok(s) => {
                let mut one = Sum::default();
                one.add(&s);
                // A split tensor shows as `split4` (4-bit weights, the low 2 bits stored) or `split4/3` (3 stored).
                let bits = match info.low_bits {
                    0 => format!("{}-bit", s.bits),
                    2 => format!("split{}", s.bits),
                    l => format!("split{}/{l}", s.bits),
                };
                println!("{name:<width$}  {shape:>14}  {:>6}  {:>5}  {}", bits, s.group_size, one.columns());
                total.add(&s);
                roles.entry(role(name)).or_default().add(&s);
            }
            Err(e) => {
                faults += 1;
                println!("{name:<width$}  {shape:>14}  FAULT: {e}");
            }
        }
    }
    println!("{:<width$}  {:>14}  {:>6}  {:>5}  {}", "total", format!("{} w", total.weights), "", "", total.columns());
    if roles.len() > 1 && roles.len() < total.tensors {
        println!();
        header("role");
        for (r, sum) in &roles {
            println!(
                "{r:<width$}  {:>14}  {:>6}  {:>5}  {}",
                format!("{} tensors", sum.tensors),
                "",
                "",
                sum.columns()
            );
        }
    }
    let file_size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} encoded, {} passthrough ({raw_bytes} bytes); file {file_size} bytes",
        file.encoded_names().count(),
        file.raw_names().count()
    );
    if faults > 0 {
        return Err(format!("{faults} tensors could not be read; run `ecq verify` for details"));
    }
    Ok(())
}

fn verify(path: &Path) -> CliResult<()> {
    let file = open(path)?;
    let mut faults = 0usize;
    let mut checked = 0usize;
    let names: Vec<String> = file.encoded_names().map(String::from).collect();
    for name in &names {
        checked += 1;
        match file.tensor(name).and_then(|t| t.decode_symbols().map(|s| (t, s.len()))) {
            Ok((t, n)) => {
                // One checksum per array of the tensor: six, seven when split.
                let arrays = file.encoded_info(name).map_err(|e| e.to_string())?.array_names().len();
                println!(
                    "ok     {name}: [{}, {}] {}-bit{}, {n} symbols decoded, {} tiles end at 2^16, {arrays} checksums match",
                    t.rows(),
                    t.cols(),
                    t.bits(),
                    if t.low().is_some() { " split" } else { "" },
                    t.layout().tiles(),
                )
            }
            Err(e) => {
                faults += 1;
                println!("FAULT  {name}: {e}");
            }
        }
    }
    let raws: Vec<String> = file.raw_names().map(String::from).collect();
    let has_crc = file.format_version().is_some();
    for name in &raws {
        checked += 1;
        match file.raw(name) {
            Ok(v) if has_crc => println!("ok     {name}: passthrough {} {:?}, checksum matches", v.dtype, v.shape),
            Ok(v) => println!("ok     {name}: passthrough {} {:?} (plain safetensors: no checksum)", v.dtype, v.shape),
            Err(e) => {
                faults += 1;
                println!("FAULT  {name}: {e}");
            }
        }
    }
    if faults > 0 {
        return Err(format!("{}: {faults} of {checked} tensors are faulty", path.display()));
    }
    println!("{}: all {checked} tensors verified", path.display());
    Ok(())
}

fn scale_bytes(values: &[f32], dtype: ScaleDtype) -> Vec<u8> {
    match dtype {
        ScaleDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ScaleDtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        ScaleDtype::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// The `quantization` object of an MLX config.json for these tensors: the most common bits and group size, and
/// a `stem: {bits, group_size}` entry for each tensor that differs. `ecq convert` reads it back from the
/// metadata, so an unpacked file converts again without options.
fn quantization_config(per_stem: &[(String, (u32, usize))]) -> Option<serde_json::Value> {
    let mut counts: std::collections::BTreeMap<(u32, usize), usize> = Default::default();
    for (_, p) in per_stem {
        *counts.entry(*p).or_default() += 1;
    }
    let (&(bits, group_size), _) = counts.iter().max_by_key(|(_, &n)| n)?;
    let mut q = serde_json::json!({"group_size": group_size, "bits": bits});
    for (stem, (b, g)) in per_stem.iter().filter(|(_, p)| *p != (bits, group_size)) {
        q[stem.as_str()] = serde_json::json!({"group_size": g, "bits": b});
    }
    Some(q)
}

fn unpack(input: &Path, output: &Path) -> CliResult<()> {
    ecq::format::refuse_overwrite(&[input], output).map_err(err)?;
    let file = open(input)?;
    let mut writer = ContainerWriter::create(output).map_err(err)?;
    for (k, v) in file.user_metadata() {
        writer.set_metadata(k, v).map_err(err)?;
    }
    writer.set_metadata("format", "mlx").map_err(err)?;
    let names: Vec<String> = file.encoded_names().map(String::from).collect();
    let raws: Vec<String> = file.raw_names().map(String::from).collect();
    let pb = progress(names.len() + raws.len());
    let mut params = std::collections::BTreeSet::new();
    let mut per_stem = Vec::new();
    for name in &names {
        pb.set_message(name.clone());
        let q = file.tensor(name).and_then(|t| t.to_quantized()).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let packed = quant::pack_mlx(&q.symbols, q.cols, q.bits).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let arrays = ArrayNames::new(name);
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        let bytes: Vec<u8> = packed.iter().flat_map(|w| w.to_le_bytes()).collect();
        let words_per_row = quant::mlx_words_per_row(q.cols, q.bits).map_err(err)?;
        writer.add_raw(&format!("{stem}.weight"), Dtype::U32, &[q.rows, words_per_row], &bytes).map_err(err)?;
        let groups = [q.rows, q.groups_per_row()];
        let sd: Dtype = q.scale_dtype.into();
        writer.add_raw(&arrays.scales, sd, &groups, &scale_bytes(&q.scales, q.scale_dtype)).map_err(err)?;
        writer.add_raw(&arrays.biases, sd, &groups, &scale_bytes(&q.biases, q.scale_dtype)).map_err(err)?;
        params.insert((q.bits, q.group_size));
        per_stem.push((stem.to_string(), (q.bits, q.group_size)));
        pb.inc(1);
    }
    for name in &raws {
        pb.set_message(name.clone());
        let v = file.raw(name).map_err(err)?;
        writer.add_raw(name, v.dtype, v.shape, v.data).map_err(err)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    if let Some(q) = quantization_config(&per_stem) {
        writer.set_metadata("quantization", &q.to_string()).map_err(err)?;
    }
    writer.finish().map_err(err)?;
    println!("{}: {} quantized tensors unpacked, {} copied", output.display(), names.len(), raws.len());
    for (bits, group_size) in params {
        println!("config.json: \"quantization\": {{\"group_size\": {group_size}, \"bits\": {bits}}}");
    }
    Ok(())
}
