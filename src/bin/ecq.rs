//! The `ecq` command line: convert, inspect, verify and unpack ecq containers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ecq::format::{ArrayNames, ContainerWriter, Dtype, EcFile, EncodeOptions, SafetensorsFile, MAX_SEGMENT};
use ecq::quant::{self, QuantConfig, ScaleDtype};
use ecq::rans;

const ABOUT: &str = "Store language-model weights as quantized symbols compressed with rANS (ecq containers)";

const LONG_ABOUT: &str = "\
Store language-model weights as quantized symbols compressed with rANS.

An ecq container is a safetensors file: each encoded weight matrix keeps its MLX-style scales and biases
and replaces the packed 4-bit words by a compressed symbol stream. Other tensors (norms, 1-D biases) are
stored unchanged. The format is described in docs/FORMAT.md.

Typical use:
  ecq convert model.safetensors model.ecq.safetensors      quantize (4 bits, group 64) and compress
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
    /// Quantize and compress a safetensors model into an ecq container.
    ///
    /// Every 2-D F32, F16 or BF16 tensor whose column count is a multiple of the group size is quantized
    /// MLX-style (w = scale * q + bias per group of columns, scales and biases kept in the input's dtype)
    /// and its symbols are compressed. Every other tensor is copied unchanged. The output is written to a
    /// temporary file next to OUT and renamed when complete; the input is never overwritten.
    Convert {
        /// The input model: a .safetensors file with F32, F16 or BF16 weights.
        input: PathBuf,
        /// Where to write the ecq container (replaced if it exists; must not be the input).
        output: PathBuf,
        /// Bits per weight: 2, 3, 4, 5, 6 or 8.
        #[arg(long, default_value_t = 4)]
        bits: u32,
        /// Columns sharing one scale and bias: 32, 64 or 128.
        #[arg(long, default_value_t = 64)]
        group_size: usize,
        /// Probability precision P of the rANS frequency table, 1..=12 (12 codes closest to the entropy).
        #[arg(long, default_value_t = rans::DEFAULT_PRECISION)]
        precision: u32,
        /// Columns per segment S, rounded up to the group size: one 32-bit state per row per segment (about
        /// 32/S bits per weight of overhead; smaller S gives more independent tiles to decode in parallel).
        /// 0 (the default) splits each row into round(K/512) equal segments.
        #[arg(long, default_value_t = 0)]
        segment: usize,
    },
    /// Print a table of every tensor: shape, bits, stored size against the entropy bound, overhead.
    ///
    /// Columns: `stored` is the symbol stream in bits per weight (words, states, tile offsets and frequency
    /// table); `entropy` is the order-0 entropy of the decoded weight symbols in bits per weight (coding k
    /// weights per joint symbol can go slightly below it when neighbours are correlated); `+H` is how far
    /// `stored` is above it; `side` is states + offsets + table as a
    /// percentage of the words; `scale` and `bias` are their own bits per weight.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert { input, output, bits, group_size, precision, segment } => {
            convert(&input, &output, QuantConfig { bits, group_size, scale_dtype: ScaleDtype::F16 }, precision, segment)
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

/// Refuses to write `output` when it is the same file as `input` (by path or, on Unix, by inode).
fn refuse_same_file(input: &Path, output: &Path) -> CliResult<()> {
    let Ok(out_meta) = std::fs::metadata(output) else { return Ok(()) };
    let in_meta = std::fs::metadata(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let same_path = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
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
        return Err(format!("refusing to overwrite the input {}: choose a different output path", input.display()));
    }
    Ok(())
}

fn progress(len: usize) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {wide_msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb
}

fn err(e: ecq::Error) -> String {
    e.to_string()
}

fn convert(input: &Path, output: &Path, config: QuantConfig, precision: u32, segment: usize) -> CliResult<()> {
    config.validate().map_err(err)?;
    if !(1..=rans::MAX_PRECISION).contains(&precision) {
        return Err(format!("--precision {precision} is outside 1..={}", rans::MAX_PRECISION));
    }
    if segment > MAX_SEGMENT {
        return Err(format!("--segment {segment} is outside 0..={MAX_SEGMENT}"));
    }
    refuse_same_file(input, output)?;
    let src = SafetensorsFile::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
    if src.metadata().contains_key(ecq::format::VERSION_KEY) {
        return Err(format!("{} is already an ecq container; `ecq unpack` it first", input.display()));
    }
    let start = Instant::now();
    let mut writer = ContainerWriter::create(output).map_err(err)?;
    for (k, v) in src.metadata() {
        writer.set_metadata(k, v).map_err(err)?;
    }
    let options = EncodeOptions { segment, precision };
    let pb = progress(src.tensors().len());
    let (mut encoded, mut passed, mut weights, mut stored_bits) = (0usize, 0usize, 0u64, 0u64);
    for (name, info) in src.tensors() {
        pb.set_message(name.clone());
        let view = src.view(name).map_err(err)?;
        let scale_dtype = info.dtype.to_scale_dtype();
        let encodable = info.shape.len() == 2
            && info.shape[0] > 0
            && info.shape[1] > 0
            && info.shape[1] % config.group_size == 0
            && scale_dtype.is_some();
        if let (true, Some(scale_dtype)) = (encodable, scale_dtype) {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let w = view.to_f32(name).map_err(err)?;
            let q = quant::quantize(&w, rows, cols, QuantConfig { scale_dtype, ..config })
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            drop(w);
            let t = ecq::format::EcTensor::encode(&q, options).map_err(|e| format!("tensor `{name}`: {e}"))?;
            writer.add_encoded(name, &t).map_err(err)?;
            encoded += 1;
            weights += (rows * cols) as u64;
            stored_bits += t.stream_bits();
        } else {
            writer.add_raw(name, view.dtype, view.shape, view.data).map_err(err)?;
            passed += 1;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    writer.finish().map_err(err)?;
    let in_size = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    let out_size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: {encoded} tensors encoded ({weights} weights, {:.3} bits/weight of symbol stream), {passed} passed \
         through; {in_size} -> {out_size} bytes in {:.1} s",
        output.display(),
        if weights > 0 { stored_bits as f64 / weights as f64 } else { 0.0 },
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn open(path: &Path) -> CliResult<EcFile> {
    EcFile::open(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Per-tensor figures for `inspect`, all in bits.
#[derive(Default)]
struct Sizes {
    weights: u64,
    stream: u64,
    words: u64,
    entropy: f64,
    scales: u64,
    biases: u64,
}

fn measure(file: &EcFile, name: &str) -> ecq::Result<(String, Sizes)> {
    let t = file.tensor(name)?;
    let symbols = t.decode_symbols()?;
    let mut hist = vec![0u64; 1 << t.bits()];
    for &q in &symbols {
        hist[q as usize] += 1;
    }
    let weights = symbols.len() as u64;
    let half_scale = t.scale_bits() / 2;
    let sizes = Sizes {
        weights,
        stream: t.stream_bits(),
        words: 16 * t.stream().words.len() as u64,
        entropy: rans::entropy_bits(&hist) * weights as f64,
        scales: half_scale,
        biases: half_scale,
    };
    Ok((format!("{}-bit", t.bits()), sizes))
}

fn inspect(path: &Path) -> CliResult<()> {
    let file = open(path)?;
    let st = file.safetensors();
    let width = st.tensors().keys().map(|n| n.len()).max().unwrap_or(6).max(6);
    println!(
        "{:<width$}  {:>14}  {:>6}  {:>5}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}  {:>6}",
        "tensor", "shape", "bits", "group", "stored", "entropy", "+H %", "side %", "scale", "bias"
    );
    let ratio = |a: f64, b: u64| if b > 0 { a / b as f64 } else { 0.0 };
    let mut total = Sizes::default();
    let mut faults = 0usize;
    let mut raw_bytes = 0usize;
    let mut rows: Vec<(String, bool)> = file.encoded_names().map(|n| (n.to_string(), true)).collect();
    rows.extend(file.raw_names().map(|n| (n.to_string(), false)));
    rows.sort();
    for (name, is_encoded) in rows {
        if !is_encoded {
            let info = st.info(&name).map_err(err)?;
            raw_bytes += info.data_offsets.1 - info.data_offsets.0;
            println!(
                "{name:<width$}  {:>14}  {:>6}  {:>5}  passthrough",
                format!("{:?}", info.shape),
                info.dtype.name(),
                "-"
            );
            continue;
        }
        let info = file.encoded_info(&name).map_err(err)?;
        let shape = format!("[{}, {}]", info.layout.rows(), info.layout.cols());
        match measure(&file, &name) {
            Ok((bits, s)) => {
                println!(
                    "{name:<width$}  {shape:>14}  {bits:>6}  {:>5}  {:>7.4}  {:>7.4}  {:>6.2}  {:>6.2}  {:>6.3}  {:>6.3}",
                    info.group_size,
                    ratio(s.stream as f64, s.weights),
                    ratio(s.entropy, s.weights),
                    if s.entropy > 0.0 { 100.0 * (s.stream as f64 / s.entropy - 1.0) } else { 0.0 },
                    ratio(100.0 * (s.stream - s.words) as f64, s.words),
                    ratio(s.scales as f64, s.weights),
                    ratio(s.biases as f64, s.weights),
                );
                total.weights += s.weights;
                total.stream += s.stream;
                total.words += s.words;
                total.entropy += s.entropy;
                total.scales += s.scales;
                total.biases += s.biases;
            }
            Err(e) => {
                faults += 1;
                println!("{name:<width$}  {shape:>14}  FAULT: {e}");
            }
        }
    }
    let s = &total;
    println!(
        "{:<width$}  {:>14}  {:>6}  {:>5}  {:>7.4}  {:>7.4}  {:>6.2}  {:>6.2}  {:>6.3}  {:>6.3}",
        "total",
        format!("{} w", s.weights),
        "",
        "",
        ratio(s.stream as f64, s.weights),
        ratio(s.entropy, s.weights),
        if s.entropy > 0.0 { 100.0 * (s.stream as f64 / s.entropy - 1.0) } else { 0.0 },
        ratio(100.0 * (s.stream - s.words) as f64, s.words),
        ratio(s.scales as f64, s.weights),
        ratio(s.biases as f64, s.weights),
    );
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
            Ok((t, n)) => println!(
                "ok     {name}: [{}, {}] {}-bit, {n} symbols decoded, {} tiles end at 2^16, 6 checksums match",
                t.rows(),
                t.cols(),
                t.bits(),
                t.layout().tiles()
            ),
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

fn unpack(input: &Path, output: &Path) -> CliResult<()> {
    refuse_same_file(input, output)?;
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
        pb.inc(1);
    }
    for name in &raws {
        pb.set_message(name.clone());
        let v = file.raw(name).map_err(err)?;
        writer.add_raw(name, v.dtype, v.shape, v.data).map_err(err)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    writer.finish().map_err(err)?;
    println!("{}: {} quantized tensors unpacked, {} copied", output.display(), names.len(), raws.len());
    for (bits, group_size) in params {
        println!("config.json: \"quantization\": {{\"group_size\": {group_size}, \"bits\": {bits}}}");
    }
    Ok(())
}
