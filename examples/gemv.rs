//! The main job: one realistic layer, quantized, entropy-coded, and multiplied without expanding it.
//!
//! Builds a 4096 x 4096 weight matrix with heavy-tailed values (Student-t with 4 degrees of freedom, rows
//! scaled like real weights around 0.02), quantizes it MLX-style (4 bits, groups of 64, f16 scales), encodes
//! the symbols with the 32-lane rANS tile codec, then runs `y = W x` through [`EcMatmul`] and prints the
//! stored size against the entropy bound, the error against a float64 reference and the time per call. It also
//! runs the CPU product, and on a GPU the fused one, on the same symbols encoded as split streams in both forms (high
//! 2 bits coded and low 2 stored, docs/FORMAT.md section 2.1; one bit coded and 3 stored, section 2.2).
//!
//! ```text
//! cargo run --release --example gemv
//! ```

use std::time::{Duration, Instant};

use ecq::format::{EcTensor, EncodeOptions, SplitForm};
use ecq::quant::{quantize, QuantConfig, QuantizedMatrix};
use ecq::rans::{entropy_bits, joint_counts};
use ecq::EcMatmul;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Output features `N` (rows of W).
const ROWS: usize = 4096;
/// Input features `K` (columns of W).
const COLS: usize = 4096;
/// Degrees of freedom of the Student-t weights: 4 gives the heavy tails of real transformer weights.
const DOF: f64 = 4.0;
/// Typical standard deviation of a weight.
const WEIGHT_STD: f64 = 0.02;
/// Seed of every random number in this example: the output is the same on every run and machine.
const SEED: u64 = 0x0ec9_2026;
/// Timed calls per measurement (after one warm-up call); the median is reported.
const RUNS: usize = 15;
/// Largest accepted error of any output, relative to the largest output of the float64 reference.
const MAX_REL_ERR: f64 = 1e-4;
/// Timed calls per GPU measurement on a software adapter, which runs the kernels on the CPU.
const CPU_ADAPTER_RUNS: usize = 3;
/// Vectors in the batched measurement.
const BATCH: usize = 8;

fn main() -> ecq::Result<()> {
    let config = QuantConfig::default();
    println!("ecq gemv: W is {ROWS} x {COLS}, Student-t({DOF}) weights with std ~{WEIGHT_STD}, seed {SEED:#x}");
    println!(
        "quantizer: {} bits, group {}, {} scales and biases; encoder: {:?}",
        config.bits,
        config.group_size,
        config.scale_dtype.name(),
        EncodeOptions::default()
    );

    let t0 = Instant::now();
    let weights = student_t_weights(ROWS, COLS);
    let t1 = Instant::now();
    let q = quantize(&weights, ROWS, COLS, config)?;
    let t2 = Instant::now();
    let tensor = EcTensor::encode(&q, EncodeOptions::default())?;
    let t3 = Instant::now();
    let rate = |d: Duration| (ROWS * COLS) as f64 / d.as_secs_f64() / 1e6;
    println!(
        "setup: generate {:.2} s, quantize {:.2} s ({:.0} M weights/s), encode {:.2} s ({:.0} M weights/s)",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        rate(t2 - t1),
        (t3 - t2).as_secs_f64(),
        rate(t3 - t2)
    );
    println!();
    report_size(&q, &tensor)?;
    let weights_n = (ROWS * COLS) as f64;
    let mut splits = Vec::new();
    for (form, name) in [(SplitForm::Low2, "split stream  "), (SplitForm::Low3, "split stream 3")] {
        let split = EcTensor::encode(&q, EncodeOptions { split: Some(form), ..EncodeOptions::default() })?;
        println!(
            "{name}        {:.4} bits/weight ({:+.2}% against the stream above), the same symbols",
            split.stream_bits() as f64 / weights_n,
            100.0 * (split.stream_bits() as f64 / tensor.stream_bits() as f64 - 1.0)
        );
        assert_eq!(split.decode_symbols()?, q.symbols, "the split stream decodes to other symbols");
        splits.push(split);
    }
    let [split, split3] = <[EcTensor; 2]>::try_from(splits).expect("two forms");
    println!();

    let x = activations(BATCH * COLS);
    // Float64 reference of what the stored layer means: the dequantized weights times x.
    let dequantized = q.dequantize();
    let reference = reference_matmul(&dequantized, &x, BATCH);
    let exact = reference_matmul(&weights, &x[..COLS], 1);
    let quant_err = max_abs_diff_f64(&reference[..ROWS], &exact);
    println!(
        "quantization itself moves y by up to {quant_err:.3e} (max |y(dequantized W) - y(original W)|, for scale)"
    );
    println!();

    // ---- CPU path ---------------------------------------------------------------------------------------
    let cpu = EcMatmul::cpu(&tensor);
    run_strategy("Cpu (rayon, decode while multiplying)", &cpu, &x, &reference, RUNS)?;
    run_strategy("Cpu on the split stream", &EcMatmul::cpu(&split), &x, &reference, RUNS)?;
    run_strategy("Cpu on the split stream 3", &EcMatmul::cpu(&split3), &x, &reference, RUNS)?;

    // ---- GPU path ---------------------------------------------------------------------------------------
    #[cfg(feature = "gpu")]
    run_gpu(&tensor, [&split, &split3], &x, &reference)?;
    #[cfg(not(feature = "gpu"))]
    println!("GPU path not built (the `gpu` feature is off); only the CPU path ran.");

    Ok(())
}

/// Heavy-tailed weights: `t = z / sqrt(chi2_4 / 4)` with `z` standard normal (Box-Muller) and
/// `chi2_4 = -2 ln(u1 u2)`, times a per-row scale around [`WEIGHT_STD`] (rows of real layers differ in norm).
/// Each row has its own seeded generator, so the result does not depend on the thread count.
fn student_t_weights(rows: usize, cols: usize) -> Vec<f32> {
    // Var(t_4) = 4 / (4 - 2) = 2.
    let unit = WEIGHT_STD / (DOF / (DOF - 2.0)).sqrt();
    let mut w = vec![0f32; rows * cols];
    w.par_chunks_mut(cols).enumerate().for_each(|(row, out)| {
        let mut rng = StdRng::seed_from_u64(SEED ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let row_scale = unit * (0.25 * normal(&mut rng)).exp();
        for w in out {
            let chi2 = -2.0 * (open01(&mut rng) * open01(&mut rng)).ln();
            *w = (row_scale * normal(&mut rng) / (chi2 / DOF).sqrt()) as f32;
        }
    });
    w
}

/// Activations: standard normal, seeded.
fn activations(len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(SEED.wrapping_add(1));
    (0..len).map(|_| normal(&mut rng) as f32).collect()
}

/// A uniform sample in (0, 1].
fn open01(rng: &mut StdRng) -> f64 {
    1.0 - rng.gen::<f64>()
}

/// A standard normal sample (Box-Muller, one of the pair).
fn normal(rng: &mut StdRng) -> f64 {
    (-2.0 * open01(rng).ln()).sqrt() * (std::f64::consts::TAU * rng.gen::<f64>()).cos()
}

/// Prints stored size, bits per weight and the order-0 entropy bounds.
fn report_size(q: &QuantizedMatrix, tensor: &EcTensor) -> ecq::Result<()> {
    let weights = (q.rows * q.cols) as f64;
    let stream_bpw = tensor.stream_bits() as f64 / weights;
    let scale_bpw = tensor.scale_bits() as f64 / weights;
    let stored_mb = (tensor.stream_bits() + tensor.scale_bits()) as f64 / 8.0 / 1e6;
    let raw_mb = (4.0 + scale_bpw) * weights / 8.0 / 1e6;

    // The coder codes joint symbols (k = 8 / bits adjacent weights of a row: pairs at 4 bits), so the order-0
    // entropy of the joint symbols, divided by k, is the bound it is measured against.
    let layout = tensor.layout();
    let k = layout.weights_per_symbol() as f64;
    let joint_bound = entropy_bits(&joint_counts(&q.symbols, layout)?) / k;
    let mut per_weight = vec![0u64; 1 << q.bits];
    for &s in &q.symbols {
        per_weight[s as usize] += 1;
    }
    let single_bound = entropy_bits(&per_weight);

    let s = tensor.stream();
    println!("shape                 {} x {} ({} M weights)", q.rows, q.cols, weights / 1e6);
    println!(
        "stored size           {stored_mb:.3} MB (symbol stream {:.3} MB + scales/biases {:.3} MB); raw 4-bit {raw_mb:.3} MB",
        tensor.stream_bits() as f64 / 8e6,
        tensor.scale_bits() as f64 / 8e6
    );
    println!(
        "symbol stream         {stream_bpw:.4} bits/weight ({} tiles of 32 rows x {} columns; words {:.4}, states + offsets + table {:.4})",
        layout.tiles(),
        layout.segment(),
        16.0 * s.words.len() as f64 / weights,
        stream_bpw - 16.0 * s.words.len() as f64 / weights
    );
    println!("scales + biases       {scale_bpw:.4} bits/weight ({})", tensor.scale_dtype().name());
    println!(
        "entropy bound         {joint_bound:.4} bits/weight: order-0 entropy of the joint symbols ({k} weights each) / {k}"
    );
    println!(
        "                      ({single_bound:.4} bits/weight: order-0 entropy of single symbols, per-weight counts)"
    );
    println!("stream vs bound       {:+.2}% over the joint-symbol entropy", 100.0 * (stream_bpw / joint_bound - 1.0));
    println!(
        "ratio to raw 4-bit    {:.3}x on the symbols (4 / {stream_bpw:.4}), {:.3}x on the whole layer with scales",
        4.0 / stream_bpw,
        (4.0 + scale_bpw) / (stream_bpw + scale_bpw)
    );
    println!();
    Ok(())
}

/// `Y = X W^T` in float64 (row-major `m x cols` in, `m x rows` out).
fn reference_matmul(w: &[f32], x: &[f32], m: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * ROWS];
    y.par_chunks_mut(ROWS).enumerate().for_each(|(v, yv)| {
        let xv = &x[v * COLS..(v + 1) * COLS];
        for (y, row) in yv.iter_mut().zip(w.chunks_exact(COLS)) {
            *y = row.iter().zip(xv).map(|(&w, &x)| w as f64 * x as f64).sum();
        }
    });
    y
}

fn max_abs_diff_f64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

fn max_abs_err(y: &[f32], reference: &[f64]) -> f64 {
    y.iter()
        .zip(reference)
        .map(|(&y, &r)| if y.is_nan() { f64::INFINITY } else { (y as f64 - r).abs() })
        .fold(0.0, f64::max)
}

/// The GPU strategies on the default adapter, checked against the same float64 reference as the CPU path.
/// Without an adapter this says so and how to get one; the CPU path above has already run.
#[cfg(feature = "gpu")]
fn run_gpu(tensor: &EcTensor, splits: [&EcTensor; 2], x: &[f32], reference: &[f64]) -> ecq::Result<()> {
    use ecq::gpu::GpuContext;
    use ecq::Strategy;

    let ctx = match GpuContext::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("No GPU adapter, so only the CPU path ran: {e}");
            println!(
                "To run the GPU strategies, install a Vulkan, Metal or DX12 driver; on Linux without a GPU a \
                 software Vulkan works: `sudo apt-get install mesa-vulkan-drivers`."
            );
            return Ok(());
        }
    };
    println!();
    println!("GPU adapter: {}", ctx.describe());
    // A software adapter (such as lavapipe) runs the kernels on the CPU: a few runs show that they work.
    let runs = if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu { CPU_ADAPTER_RUNS } else { RUNS };
    for (name, tensor, strategy) in [
        ("Fused (decode + dequantize + GEMV in one kernel, compressed weights only)", tensor, Strategy::Fused),
        ("Cached (decoded once at load to packed 4-bit, quantized GEMV)", tensor, Strategy::Cached),
        ("Fused on the split stream", splits[0], Strategy::Fused),
        ("Fused on the split stream 3 (one bit coded)", splits[1], Strategy::Fused),
    ] {
        let matmul = EcMatmul::new(&ctx, tensor, strategy)?;
        run_strategy(name, &matmul, x, reference, runs)?;
        println!("  holds {:.3} MB on the device", matmul.device_bytes() as f64 / 1e6);
        for m in [1, BATCH] {
            match matmul.device_times(m, runs) {
                Ok(mut times) => {
                    times.sort();
                    let t = times[times.len() / 2].as_secs_f64();
                    println!(
                        "  M = {m}: device time (the pass's timestamps) median {:8.1} us over {runs} runs",
                        t * 1e6
                    );
                }
                Err(e) => println!("  M = {m}: no device timing ({e})"),
            }
        }
    }
    Ok(())
}

/// Runs one strategy for one vector and for [`BATCH`] vectors, checks both against the float64 reference and
/// prints the error and the median time.
fn run_strategy(name: &str, matmul: &EcMatmul, x: &[f32], reference: &[f64], runs: usize) -> ecq::Result<()> {
    let (n, k) = (matmul.rows(), matmul.cols());
    let ref_scale = reference.iter().fold(0f64, |m, r| m.max(r.abs()));
    println!("{name}");
    for m in [1, BATCH] {
        let mut y = vec![f32::NAN; m * n];
        let xs = &x[..m * k];
        let median = median_time(runs, || matmul.matmul(xs, m, &mut y))?;
        let err = max_abs_err(&y, &reference[..m * n]);
        // f32 accumulation over K = 4096 products: a few ulps of the largest output at most.
        if err.is_nan() || err > MAX_REL_ERR * ref_scale {
            return Err(ecq::Error::Gpu(format!(
                "{name}, M = {m}: max |y - y_ref| = {err:.3e} exceeds {:.3e}",
                MAX_REL_ERR * ref_scale
            )));
        }
        let secs = median.as_secs_f64();
        println!(
            "  M = {m}: median {:8.2} ms over {runs} runs, {:6.0} M weights/s, max |y - y_ref| = {err:.3e} (|y_ref| up to {ref_scale:.2})",
            secs * 1e3,
            (n * k) as f64 / secs / 1e6,
        );
    }
    Ok(())
}

/// Median wall time of `runs` calls after one warm-up call.
fn median_time(runs: usize, mut f: impl FnMut() -> ecq::Result<()>) -> ecq::Result<Duration> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[runs / 2])
}
