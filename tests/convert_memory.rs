//! Peak resident memory of `ecq convert`, measured on the real SmolLM2 model and on a synthetic ~2 GB float
//! safetensors file that the test writes streaming (never held in memory).
//!
//! The bound asserted, for a conversion whose largest tensor has `n` weights:
//!
//!     peak RSS <= FIXED_BYTES + BYTES_PER_WEIGHT * n      (64 MiB + 4 bytes per weight)
//!
//! which is a quarter of the bound "4x the largest tensor" for f32 inputs (16 bytes per weight) and about that
//! bound for 8-bit ones. Mapped input pages count towards RSS; the converter releases them after each chunk and
//! tensor, which is what keeps a 2 GB input near the footprint of one tensor.
//!
//! Peak RSS comes from `/usr/bin/time -v` ("Maximum resident set size") when it exists, else from the child's
//! VmHWM in /proc, polled until it exits (forced with ECQ_RSS_FROM_PROC=1). Run in release for speed:
//! `cargo test --release --test convert_memory -- --nocapture`.

#[path = "gguf_support/mod.rs"]
mod support;

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use ecq::format::gguf::GgufFile;

const ECQ: &str = env!("CARGO_BIN_EXE_ecq");

/// Fixed part of the bound: the process, its thread pool, I/O buffers and one chunk of rows as f32 (16 MiB).
const FIXED_BYTES: u64 = 64 << 20;
/// Per weight of the largest tensor: its symbols (1 byte), the encoder's words and their concatenated copy
/// (up to 2 x 7.5 bits for 8-bit symbols), scales and biases; or, in `--verify`, the decoded source.
const BYTES_PER_WEIGHT: u64 = 4;

fn bound(largest_weights: u64) -> u64 {
    FIXED_BYTES + BYTES_PER_WEIGHT * largest_weights
}

/// Runs `ecq args...` and returns its peak resident set in bytes and its wall time in seconds, failing the test
/// if it fails.
fn peak_rss(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (u64, f64) {
    let start = std::time::Instant::now();
    let rss = run_measured(args);
    (rss, start.elapsed().as_secs_f64())
}

fn run_measured(args: &[&dyn AsRef<std::ffi::OsStr>]) -> u64 {
    let time = Path::new("/usr/bin/time");
    if time.exists() && std::env::var_os("ECQ_RSS_FROM_PROC").is_none() {
        let mut c = Command::new(time);
        c.arg("-v").arg(ECQ);
        for a in args {
            c.arg(a);
        }
        let out = c.output().expect("run /usr/bin/time ecq");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ecq failed: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("Maximum resident set size"))
            .unwrap_or_else(|| panic!("no maximum resident set size in:\n{stderr}"));
        let kb: u64 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
        return kb * 1024;
    }
    let mut c = Command::new(ECQ);
    for a in args {
        c.arg(a);
    }
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("run ecq");
    let status_path = format!("/proc/{}/status", child.id());
    let mut hwm = 0u64;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(l) = s.lines().find(|l| l.starts_with("VmHWM:")) {
                let kb: u64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
                hwm = hwm.max(kb * 1024);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "ecq failed");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    hwm
}

/// Free bytes on the filesystem holding `dir`, from `df -Pk`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kb: u64 = text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()?;
    Some(kb * 1024)
}

/// Writes a safetensors file of `tensors` (name, dtype F32 or F16, shape) with pseudo-random weights, one row
/// at a time through a 1 MiB buffer.
fn write_synthetic(path: &Path, tensors: &[(&str, &str, [usize; 2])]) -> u64 {
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for &(name, dtype, shape) in tensors {
        let size = if dtype == "F32" { 4 } else { 2 };
        let len = (shape[0] * shape[1] * size) as u64;
        header.insert(name.into(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + len]}));
        at += len;
    }
    let mut h = serde_json::to_string(&header).unwrap().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    out.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&h).unwrap();
    let mut rng = support::Rng(7);
    let mut row = Vec::new();
    for &(_, dtype, [rows, cols]) in tensors {
        for _ in 0..rows {
            row.clear();
            for _ in 0..cols / 2 {
                // Two weights per draw: a rough bell shape from the sum of two uniforms, scaled like real weights.
                let r = rng.next();
                for half in [r as u32, (r >> 32) as u32] {
                    let (a, b) = ((half & 0xffff) as f32, (half >> 16) as f32);
                    let w = (a + b - 65535.0) / 65535.0 * 0.05;
                    if dtype == "F32" {
                        row.extend_from_slice(&w.to_le_bytes());
                    } else {
                        row.extend_from_slice(&half::f16::from_f32(w).to_le_bytes());
                    }
                }
            }
            out.write_all(&row).unwrap();
        }
    }
    out.into_inner().unwrap().sync_all().unwrap();
    8 + h.len() as u64 + at
}

#[test]
fn convert_peak_memory_stays_within_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();

    if let Some(model) = support::require_smollm2("convert_peak_memory_stays_within_bound (SmolLM2 part)") {
        let g = GgufFile::open(&model).unwrap();
        let largest = g.tensors().iter().map(|t| t.elements()).max().unwrap();
        drop(g);
        let out = dir.path().join("smollm2.ecq.safetensors");
        let (rss, secs) = peak_rss(&[&"convert", &model, &out, &"--verify"]);
        report.push(format!(
            "SmolLM2-135M Q4_1 GGUF (--verify): peak RSS {} MiB in {secs:.1} s, largest tensor {largest} weights, bound {} MiB",
            rss >> 20,
            bound(largest) >> 20
        ));
        assert!(rss <= bound(largest), "SmolLM2: peak RSS {rss} bytes exceeds the bound {}", bound(largest));
        std::fs::remove_file(&out).unwrap();
    }

    // Eight 4096 x 14336 f32 matrices and one f16 one, plus one row: about 2.0 GB.
    let (rows, cols) = (4096, 14336);
    let names: Vec<String> = (0..8).map(|i| format!("model.layers.{i}.mlp.up_proj.weight")).collect();
    let mut tensors: Vec<(&str, &str, [usize; 2])> = names.iter().map(|n| (n.as_str(), "F32", [rows, cols])).collect();
    tensors.push(("model.layers.8.mlp.down_proj.weight", "F16", [rows, cols]));
    tensors.push(("model.extra_row.weight", "F32", [1, cols]));
    let input = dir.path().join("synthetic.safetensors");
    let need = 2_100_000_000u64 + 600_000_000; // the input, then the spool and the output
    if let Some(free) = free_bytes(dir.path()) {
        assert!(free > need, "{}: {free} bytes free, the test needs about {need}", dir.path().display());
    }
    let size = write_synthetic(&input, &tensors);
    assert!(size > 1_900_000_000, "synthetic file is only {size} bytes");
    let largest = (rows * cols) as u64;
    let out = dir.path().join("synthetic.ecq.safetensors");
    let (rss, secs) = peak_rss(&[&"convert", &input, &out]);
    report.push(format!(
        "synthetic {:.2} GB f32/f16 safetensors: peak RSS {} MiB in {secs:.1} s, largest tensor {largest} weights ({} MiB as f32), bound {} MiB",
        size as f64 / 1e9,
        rss >> 20,
        (largest * 4) >> 20,
        bound(largest) >> 20
    ));
    for line in &report {
        println!("{line}");
    }
    assert!(rss <= bound(largest), "synthetic: peak RSS {rss} bytes exceeds the bound {}", bound(largest));
    // The conversion really happened: every matrix encoded (the one-row matrix too: 14336 columns is a
    // multiple of 64).
    let f = ecq::format::EcFile::open(&out).unwrap();
    assert_eq!(f.encoded_names().count(), 10);
}
