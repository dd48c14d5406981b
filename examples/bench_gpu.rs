//! GPU benchmark: fused, cached, dense f16 and dense f32 GEMV, the decode-only kernel, and a buffer copy that
//! gives the bandwidth ceiling, all timed with timestamp queries in one run on one device.
//!
//! ```text
//! cargo build --release --example bench_gpu
//! XDG_RUNTIME_DIR=/tmp target/release/examples/bench_gpu [--smol FILE] [--runs N] [--quick]
//! target/release/examples/bench_gpu extract SmolLM2-135M-Instruct.Q4_1.gguf smol_layers.ecq.safetensors
//! ```
//!
//! Method: every case is timed twice. First each timed run is one compute pass that writes timestamps at its
//! start and end (the `us` column: the dispatches, and the barriers between them where a run has several);
//! then each run is recorded in a compute pass of its own between two empty passes that write the timestamps
//! (`own us`: adds what a pass costs the device beyond its dispatches, since wgpu records every pass as command
//! buffers of its own). `--warmup` runs (at least one per copy) are dropped, the median of `--runs` runs is
//! reported. With `--batch N` a timed run is N runs back to back (each on the next weight copy; in one pass, or
//! N passes), and its time over N is what counts. Where `us` comes out over 1.1 times `own us` (a pass adds to
//! its dispatches, so that is a disturbed measurement), `us` is measured again and the second median kept, with a
//! `timed again` line. Every strategy holds at least 4 copies of its weights on the device, more until the
//! copies add up to `--rotate-mib` (default 256 MiB, several times an H100/H200 L2), and run `i` reads copy
//! `i % copies`, so no run finds its weights in the cache. Each timed batch is one submission that follows one
//! of about `--heat-ms` (default 100 ms) of buffer copies, so the clocks are up when the first run starts. The
//! ceiling is the better of a `copy_buffer_to_buffer` and a copy kernel (16-byte loads and stores) over
//! `--copy-mib` (default 1024 MiB), counted as bytes read plus bytes written, measured before and after. Each
//! shape also times a kernel that only reads as many bytes as Cached moves at one vector (`read only`): what
//! reading that much costs in this harness with nothing else to do, timed the same ways.
//!
//! Synthetic weights: Gaussian rows with log-normal row scales (heavy-tailed overall), quantized to 4 bits in
//! groups of 64 (f16 scales) and encoded with `EncodeOptions::default()`. Decode-only on real symbols reads a
//! file made by `extract` from SmolLM2-135M's Q4_1 GGUF (lossless import, groups of 32); `--smol FILE` or
//! `ECQ_SMOL` names it, and the part is skipped with a message when it is absent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ecq::format::{ContainerWriter, EcFile, EcTensor, EncodeOptions, GgufFile, SplitForm};
use ecq::gpu::kernels::{self, GpuPacked, GpuStream};
use ecq::gpu::shaders::Spec;
use ecq::gpu::{time_on_device, time_passes_on_device, DenseDtype, DenseGemv, GpuContext, GpuScales, Kernel};
use ecq::quant::{quantize, QuantConfig, QuantizedMatrix};
use ecq::rans::{entropy_bits, joint_counts, TileLayout};
use ecq::{EcMatmul, Result, Strategy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// The shapes of the issue: Llama-like 4096/14336 and SmolLM2-135M's 576/1536 (rows x cols).
const SHAPES: [(usize, usize); 5] = [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536), (1536, 576)];
/// Layers of SmolLM2-135M that `extract` keeps (the whole model would not travel).
const EXTRACT_LAYERS: usize = 8;
/// The decode-only part also times each extracted stack repeated this many times (8 x 4 = 32 layers' worth of
/// tiles, about SmolLM2-135M's 30), so the GPU sees a whole model's tile count.
const SMOL_REPEAT: usize = 4;

struct Opts {
    runs: usize,
    warmup: usize,
    copy_mib: u64,
    rotate_mib: u64,
    shapes: Vec<(usize, usize)>,
    ms: Vec<usize>,
    smol: Option<PathBuf>,
    heat_ms: u64,
    batch: usize,
    variants: bool,
    experiments: Vec<Experiment>,
    encode: EncodeOptions,
    /// Compute units the products take the device to have (`--compute-units`; 0: none known); None: what the
    /// device reports.
    compute_units: Option<u32>,
    /// Whether the products take the device to run 8-bit dot products as one instruction (`--integer-dot 0|1`);
    /// None: what the device reports.
    integer_dot: Option<bool>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_gpu [--runs N] [--warmup N] [--copy-mib N] [--rotate-mib N] [--shapes 4096x4096,...] \
         [--ms 1,4] [--heat-ms N] [--batch N] [--variants] [--experiments DIR] [--precision P] [--segment S] \
         [--min-tiles N] [--split] [--compute-units N] [--integer-dot 0|1] [--smol FILE] [--quick]\n       \
         bench_gpu extract MODEL.gguf OUT.ecq.safetensors"
    );
    std::process::exit(2)
}

fn parse_opts(args: &[String]) -> Opts {
    let mut o = Opts {
        runs: 30,
        warmup: 5,
        copy_mib: 1024,
        rotate_mib: 256,
        shapes: SHAPES.to_vec(),
        ms: vec![1, 4],
        smol: std::env::var_os("ECQ_SMOL").map(PathBuf::from),
        heat_ms: 100,
        batch: 1,
        variants: false,
        experiments: Vec::new(),
        encode: EncodeOptions::default(),
        compute_units: None,
        integer_dot: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--runs" => o.runs = num(val()) as usize,
            "--warmup" => o.warmup = num(val()) as usize,
            "--copy-mib" => o.copy_mib = num(val()),
            "--rotate-mib" => o.rotate_mib = num(val()),
            "--heat-ms" => o.heat_ms = num(val()),
            "--batch" => o.batch = (num(val()) as usize).max(1),
            // Also time rans_decode with one part of a step left out (see DECODE_VARIANTS).
            "--variants" => o.variants = true,
            "--smol" => o.smol = Some(PathBuf::from(val())),
            // Encoder settings of the synthetic shapes and of the repeated SmolLM2 stacks (default: the crate's).
            "--precision" => o.encode.precision = num(val()) as u32,
            "--segment" => o.encode.segment = num(val()) as usize,
            "--min-tiles" => o.encode.min_tiles = num(val()) as usize,
            // 4-bit streams split: the high 2 bits coded, the low 2 stored (docs/FORMAT.md, section 2.1); or one bit
            // coded, 3 stored (section 2.2).
            "--split" => o.encode.split = Some(SplitForm::Low2),
            "--split3" => o.encode.split = Some(SplitForm::Low3),
            // The compute units the fused products take the device to have (0: none known), whatever it reports
            // (`GpuContext::with_compute_units`; they choose `kernels::vector_groups`, `row_tile_pairs`,
            // `spread_slabs`, `stage_x` and `early_x`).
            "--compute-units" => o.compute_units = Some(num(val()) as u32),
            // Whether the fused products take 8-bit dot products to be one instruction, whatever the device reports
            // (`GpuContext::with_integer_dot`; it chooses `kernels::integer_dot` and `kernels::task_blocks`).
            "--integer-dot" => o.integer_dot = Some(num(val()) != 0),
            // Kernel variants read from DIR/*.wgsl, checked and timed (see `Experiment`).
            "--experiments" => {
                let dir = PathBuf::from(val());
                o.experiments = load_experiments(&dir).unwrap_or_else(|e| {
                    eprintln!("bench_gpu: reading {}: {e}", dir.display());
                    std::process::exit(2)
                })
            }
            "--ms" => o.ms = val().split(',').map(|s| num(s.to_string()) as usize).collect(),
            "--shapes" => {
                o.shapes = val()
                    .split(',')
                    .map(|s| {
                        let (r, c) = s.split_once('x').unwrap_or_else(|| usage());
                        (num(r.to_string()) as usize, num(c.to_string()) as usize)
                    })
                    .collect()
            }
            // Small and fast, for checking the harness on a software device.
            "--quick" => {
                o.runs = 3;
                o.warmup = 1;
                o.copy_mib = 64;
                o.rotate_mib = 8;
                o.shapes = vec![(576, 1536), (1536, 576)];
                o.heat_ms = 1;
            }
            _ => usage(),
        }
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("extract") {
        if args.len() != 3 {
            usage();
        }
        extract(Path::new(&args[1]), Path::new(&args[2]))
    } else {
        run(&parse_opts(&args))
    };
    if let Err(e) = result {
        eprintln!("bench_gpu: {e}");
        std::process::exit(1);
    }
}

/// Writes the Q4_1 weights of SmolLM2-135M's first layers, stacked by column count (576 and 1536), as two
/// encoded tensors, plus layer 0's tensors one by one. Every tensor's row count is a multiple of 32, so no
/// tile of a stack spans two tensors; a stack shares one frequency table.
fn extract(gguf: &Path, out: &Path) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let mut writer = ContainerWriter::create(out)?;
    let mut stacks: Vec<(usize, QuantizedMatrix)> = Vec::new();
    for layer in 0..EXTRACT_LAYERS {
        let prefix = format!("blk.{layer}.");
        let names: Vec<String> = file
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with(&prefix) && t.ggml_type.name() == Some("Q4_1"))
            .map(|t| t.name.clone())
            .collect();
        for name in names {
            let q = file.quantized(&name)?;
            if layer == 0 {
                writer.add_encoded(&name, &EcTensor::encode(&q, EncodeOptions::default())?)?;
            }
            match stacks.iter_mut().find(|(c, _)| *c == q.cols) {
                Some((_, s)) => {
                    s.rows += q.rows;
                    s.symbols.extend_from_slice(&q.symbols);
                    s.scales.extend_from_slice(&q.scales);
                    s.biases.extend_from_slice(&q.biases);
                }
                None => stacks.push((q.cols, q)),
            }
        }
    }
    for (cols, q) in &stacks {
        let t = EcTensor::encode(q, EncodeOptions::default())?;
        println!(
            "stack_k{cols}: {} x {cols}, {:.3} bits/weight stream, order-0 entropy {:.3}",
            q.rows,
            t.stream_bits() as f64 / (q.rows * q.cols) as f64,
            symbol_entropy(&q.symbols, q.bits)
        );
        writer.add_encoded(&format!("stack_k{cols}"), &t)?;
    }
    writer.set_metadata("source", &format!("{} layers 0..{EXTRACT_LAYERS}", gguf.display()))?;
    writer.finish()
}

/// Order-0 entropy of the symbols in bits per weight.
fn symbol_entropy(symbols: &[u8], bits: u32) -> f64 {
    let mut counts = vec![0u64; 1 << bits];
    for &s in symbols {
        counts[s as usize] += 1;
    }
    entropy_bits(&counts)
}

/// Heavy-tailed synthetic weights: a scale mixture of Gaussians, each row Gaussian with a log-normal scale
/// (so the matrix as a whole has heavy tails, while min/max groups of 64 see Gaussian values, as real weights do).
fn synthetic_weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut normal = || {
            let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let row_scale = 0.02 * (0.5 * normal()).exp();
        for v in row.iter_mut() {
            *v = (row_scale * normal()) as f32;
        }
    });
    w
}

/// One timed configuration: median device time and the bytes it moves.
struct Row {
    shape: String,
    what: String,
    m: usize,
    time: Timed,
    bytes: u64,
    weights: u64,
    copies: usize,
    cached: Option<Duration>,
}

/// Median device times of one case, measured twice: `pass`, a compute pass per timed run that writes its own
/// timestamps (the dispatches and the barriers between them); `own`, every run in a compute pass of its own
/// between two empty timestamp passes (adds what wgpu's command buffers per pass cost on the device).
#[derive(Clone, Copy)]
struct Timed {
    pass: Duration,
    own: Duration,
}

/// A load submitted just before every timed batch (nothing waits between the two submissions), so the clocks
/// are up before the first timed run (a GPU left idle while the host prepares the next case drops its clocks).
struct Heater {
    src: wgpu::Buffer,
    dst: wgpu::Buffer,
    copies: usize,
}

impl Heater {
    fn new(ctx: &GpuContext, heat_ms: u64) -> Result<Self> {
        let bytes = 256u64 << 20;
        let src = copy_buffer(ctx, "heater src", bytes.min(ctx.limits().max_buffer_size));
        let dst = copy_buffer(ctx, "heater dst", bytes.min(ctx.limits().max_buffer_size));
        let mut h = Self { src, dst, copies: 4 };
        // Size it from a measured copy: enough copies for `heat_ms` at the measured speed.
        let t = time_on_device(ctx, 8, |enc| {
            h.record(enc, 1);
            Ok(())
        })?;
        let one = t.iter().min().copied().unwrap_or_default().as_secs_f64().max(1e-6);
        h.copies = ((heat_ms as f64 * 1e-3 / one).ceil() as usize).clamp(1, 2000);
        Ok(h)
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder, copies: usize) {
        for _ in 0..copies {
            enc.copy_buffer_to_buffer(&self.src, 0, &self.dst, 0, self.src.size());
        }
    }

    fn submit(&self, ctx: &GpuContext) {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        self.record(&mut enc, self.copies);
        ctx.queue().submit([enc.finish()]);
    }
}

/// The median over the timed runs of `time(runs)`, which records that many runs (the warm-up ones first: at least
/// one per copy, so no timed run is the first to touch its buffers) in one submission behind the heater and
/// returns each run's time; per run of a batch.
fn median_of(
    ctx: &GpuContext,
    o: &Opts,
    heater: &Heater,
    copies: usize,
    time: impl FnOnce(usize) -> Result<Vec<Duration>>,
) -> Result<Duration> {
    let warmup = o.warmup.max(copies);
    heater.submit(ctx);
    let mut t: Vec<Duration> = time(warmup + o.runs)?[warmup..].to_vec();
    t.sort();
    Ok(t[t.len() / 2] / o.batch as u32)
}

/// Times `record(pass, run)` both ways of [`Timed`]: a timed run is `--batch` runs, in one timed pass or each
/// in a pass of its own. A pass can only add to what its dispatches cost, so where the timed pass comes out more
/// than 10% slower than the pass of its own, the timed pass is measured again and that second median kept (with a
/// line saying so): on freshly started H100 and H200 machines the first timed batch of a process has come out 2.7
/// to 3.8 times too slow while the same case in a pass of its own, timed right after, did not.
fn median_time(
    ctx: &GpuContext,
    o: &Opts,
    heater: &Heater,
    copies: usize,
    mut record: impl FnMut(&mut wgpu::ComputePass<'_>, usize) -> Result<()>,
) -> Result<Timed> {
    let in_one_pass = |record: &mut dyn FnMut(&mut wgpu::ComputePass<'_>, usize) -> Result<()>| {
        let mut run = 0;
        median_of(ctx, o, heater, copies, |runs| {
            time_passes_on_device(ctx, runs, |pass| {
                for _ in 0..o.batch {
                    record(pass, run)?;
                    run += 1;
                }
                Ok(())
            })
        })
    };
    let mut pass = in_one_pass(&mut record)?;
    let mut run = 0;
    let own = median_of(ctx, o, heater, copies, |runs| {
        time_on_device(ctx, runs, |enc| {
            for _ in 0..o.batch {
                record(&mut enc.begin_compute_pass(&Default::default()), run)?;
                run += 1;
            }
            Ok(())
        })
    })?;
    if pass.as_secs_f64() > 1.1 * own.as_secs_f64() {
        let again = in_one_pass(&mut record)?;
        println!(
            "timed again: {:.1} us in one pass, over 1.1 times the {:.1} us in a pass of its own; now {:.1} us",
            us(pass),
            us(own),
            us(again)
        );
        pass = again;
    }
    Ok(Timed { pass, own })
}

/// Copies needed so the rotation reads at least `rotate_mib` (and never fewer than 4).
fn copies_for(o: &Opts, bytes: u64) -> usize {
    ((o.rotate_mib << 20).div_ceil(bytes.max(1)) as usize).clamp(4, 512)
}

fn storage(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(16).next_multiple_of(16),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

fn copy_buffer(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

/// A pipeline of the harness's own WGSL `source` (entry point `main`, layout from the shader).
fn plain_pipeline(ctx: &GpuContext, label: &str, source: &str) -> wgpu::ComputePipeline {
    let device = ctx.device();
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    })
}

/// Group 0 of a `plain_pipeline` whose bindings 0 and 1 are `a` and `b`.
fn two_buffer_group(
    ctx: &GpuContext,
    pipeline: &wgpu::ComputePipeline,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
) -> wgpu::BindGroup {
    ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: a.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: b.as_entire_binding() },
        ],
    })
}

/// Fills `buffer` with nonzero words (a multiplicative hash of their index), so a compressing memory system cannot
/// shortcut reading it.
fn fill_nonzero(ctx: &GpuContext, buffer: &wgpu::Buffer) {
    let chunk: Vec<u32> = (0..(1u32 << 20)).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let bytes = buffer.size();
    for off in (0..bytes).step_by(4 << 20) {
        let n = ((bytes - off) as usize).min(4 << 20);
        ctx.queue().write_buffer(buffer, off, &bytemuck::cast_slice(&chunk)[..n]);
    }
}

/// A plain copy kernel: 16 bytes per invocation per step, grid-stride.
const COPY_WGSL: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let len = arrayLength(&dst);
    for (var i = g.x; i < len; i += n.x * 256u) {
        dst[i] = src[i];
    }
}
";

/// Bandwidth of a device-to-device copy, bytes read plus bytes written per second: `copy_buffer_to_buffer`
/// and a copy kernel (16-byte loads and stores); the better of the two is the ceiling.
fn copy_bandwidth(ctx: &GpuContext, o: &Opts, heater: &Heater) -> Result<f64> {
    let limit = ctx.limits().max_buffer_size.min(ctx.limits().max_storage_buffer_binding_size);
    let bytes = (o.copy_mib << 20).min(limit / 16 * 16);
    let src = copy_buffer(ctx, "copy src", bytes);
    let dst = copy_buffer(ctx, "copy dst", bytes);
    fill_nonzero(ctx, &src);
    let t_copy = median_of(ctx, o, heater, 1, |runs| {
        time_on_device(ctx, runs, |enc| {
            for _ in 0..o.batch {
                enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
            }
            Ok(())
        })
    })?;
    let pipeline = plain_pipeline(ctx, "copy kernel", COPY_WGSL);
    let group = two_buffer_group(ctx, &pipeline, &src, &dst);
    let groups = ((bytes / 16).div_ceil(256) as u32).min(ctx.limits().max_compute_workgroups_per_dimension).min(8192);
    let t_kernel = median_time(ctx, o, heater, 1, |pass, _| {
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(groups, 1, 1);
        Ok(())
    })?;
    let bw = |t: Duration| 2.0 * bytes as f64 / t.as_secs_f64();
    println!(
        "copy {} MiB: copy_buffer_to_buffer {:.1} us = {:.0} GB/s; copy kernel {:.1} us = {:.0} GB/s (read + write; \
         own pass {:.1} us = {:.0} GB/s)",
        bytes >> 20,
        us(t_copy),
        bw(t_copy) / 1e9,
        us(t_kernel.pass),
        bw(t_kernel.pass) / 1e9,
        us(t_kernel.own),
        bw(t_kernel.own) / 1e9
    );
    Ok(bw(t_copy).max(bw(t_kernel.pass)).max(bw(t_kernel.own)))
}

/// A read-only kernel: each invocation reads `READ_UNROLL` 16-byte values a loop trip (consecutive invocations,
/// consecutive values; the trip's loads in flight together), grid-stride, and folds them into one word that it
/// writes only if it equals a constant, which no compiler can know it never does.
const READ_WGSL: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
const UNROLL: u32 = READ_UNROLLu;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let len = arrayLength(&src);
    let stride = n.x * 256u;
    var acc = vec4<u32>(0u);
    for (var i = g.x; i < len; i += UNROLL * stride) {
        for (var u = 0u; u < UNROLL; u++) {
            acc ^= src[min(i + u * stride, len - 1u)];
        }
    }
    let r = acc.x ^ acc.y ^ acc.z ^ acc.w;
    if (r == 0x9e3779b9u) {
        dst[0] = r;
    }
}
";

/// The read-only kernel (`READ_WGSL`) over `bytes` of memory, rotated over copies like the products' weights:
/// how fast a kernel that does nothing else reads that many bytes in this harness (the timed pass and its
/// dispatch included), the reference for a product that moves as many bytes. The better of one 16-byte value an
/// invocation (a workgroup per 4 KiB, up to the grid's limit) and four, with a quarter of the workgroups.
fn read_row(ctx: &GpuContext, o: &Opts, heater: &Heater, shape: &str, bytes: u64) -> Result<Row> {
    let bytes = bytes.next_multiple_of(16);
    let copies = copies_for(o, bytes);
    let srcs: Vec<wgpu::Buffer> = (0..copies)
        .map(|i| {
            let b = storage(ctx, &format!("read src {i}"), bytes);
            fill_nonzero(ctx, &b);
            b
        })
        .collect();
    let dst = storage(ctx, "read dst", 16);
    let max_groups = ctx.limits().max_compute_workgroups_per_dimension;
    let mut best: Option<Timed> = None;
    for unroll in [1u64, 4] {
        let pipeline = plain_pipeline(ctx, "read kernel", &READ_WGSL.replace("READ_UNROLL", &unroll.to_string()));
        let groups: Vec<wgpu::BindGroup> = srcs.iter().map(|src| two_buffer_group(ctx, &pipeline, src, &dst)).collect();
        let grid = ((bytes / 16).div_ceil(256 * unroll) as u32).clamp(1, max_groups);
        let t = median_time(ctx, o, heater, copies, |pass, run| {
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &groups[run % groups.len()], &[]);
            pass.dispatch_workgroups(grid, 1, 1);
            Ok(())
        })?;
        if best.is_none_or(|b| t.pass < b.pass) {
            best = Some(t);
        }
    }
    Ok(Row {
        shape: shape.to_string(),
        what: "read only".into(),
        m: 0,
        time: best.expect("two kernels timed"),
        bytes,
        weights: 0,
        copies,
        cached: None,
    })
}

fn us(t: Duration) -> f64 {
    t.as_secs_f64() * 1e6
}

fn random_x(ctx: &GpuContext, len: usize, seed: u64) -> wgpu::Buffer {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let buf = storage(ctx, "x", len as u64 * 4);
    ctx.queue().write_buffer(&buf, 0, bytemuck::cast_slice(&x));
    buf
}

/// Largest |a - b| over the largest |b|: a cross-check that two strategies compute the same product. NaN where
/// any pair differs by NaN (an output left unwritten keeps the NaN it was poisoned with), since `f64::max` would
/// drop it.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-30);
    let diffs = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs());
    diffs.fold(0f64, |m, d| if d.is_nan() || m.is_nan() { f64::NAN } else { m.max(d) }) / scale
}

fn bench_shape(
    ctx: &GpuContext,
    o: &Opts,
    heater: &Heater,
    rows: usize,
    cols: usize,
    out: &mut Vec<Row>,
) -> Result<()> {
    let shape = format!("{rows}x{cols}");
    let started = std::time::Instant::now();
    let w = synthetic_weights(rows, cols, 0x5eed ^ (rows * 31 + cols) as u64);
    let q = quantize(&w, rows, cols, QuantConfig::default())?;
    let tensor = EcTensor::encode(&q, o.encode)?;
    let n = (rows * cols) as u64;
    let pairs = joint_counts(&q.symbols, &TileLayout::new(rows, cols, q.bits, tensor.layout().segment())?)?;
    println!(
        "\n{shape}: order-0 entropy {:.3} bits/weight, pair entropy {:.3}, stream {:.3} bits/weight, \
         segment {}, {} tiles (prepared in {:.1} s)",
        symbol_entropy(&q.symbols, q.bits),
        entropy_bits(&pairs) / 2.0,
        tensor.stream_bits() as f64 / n as f64,
        tensor.layout().segment(),
        tensor.layout().tiles(),
        started.elapsed().as_secs_f64()
    );
    let max_m = o.ms.iter().copied().max().unwrap_or(1);
    let x = random_x(ctx, max_m * cols, 7);
    let y = storage(ctx, "y", (max_m * rows * 4) as u64);
    let io_bytes = |m: usize| (m * (cols + rows) * 4) as u64;

    // Cross-check once: fused and cached agree, and both are close to the dense f32 product.
    {
        let mut rng = StdRng::seed_from_u64(3);
        let xh: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut yf = vec![0f32; rows];
        let mut yc = vec![0f32; rows];
        let mut yd = vec![0f32; rows];
        EcMatmul::new(ctx, &tensor, Strategy::Fused)?.matvec(&xh, &mut yf)?;
        EcMatmul::new(ctx, &tensor, Strategy::Cached)?.matvec(&xh, &mut yc)?;
        DenseGemv::new(ctx, &q.dequantize(), rows, cols, DenseDtype::F32)?.matmul(&xh, 1, &mut yd)?;
        let (fc, fd) = (rel_diff(&yf, &yc), rel_diff(&yf, &yd));
        println!("check: fused vs cached {fc:.1e}, fused vs dense f32 of the dequantized weights {fd:.1e}");
        if !(fc < 1e-4 && fd < 1e-4) {
            return Err(ecq::Error::Gpu(format!("{shape}: products disagree ({fc:e}, {fd:e})")));
        }
    }

    let mut cached_time = std::collections::HashMap::new();
    for strategy in ["cached", "fused", "dense f16", "dense f32"] {
        let (copies, held): (usize, u64);
        enum Held {
            Ec(Vec<EcMatmul>),
            Dense(Vec<DenseGemv>),
        }
        let built = match strategy {
            "cached" | "fused" => {
                let s = if strategy == "cached" { Strategy::Cached } else { Strategy::Fused };
                let first = EcMatmul::new(ctx, &tensor, s)?;
                held = first.device_bytes();
                copies = copies_for(o, held);
                let mut v = vec![first];
                for _ in 1..copies {
                    v.push(EcMatmul::new(ctx, &tensor, s)?);
                }
                Held::Ec(v)
            }
            _ => {
                let dtype = if strategy == "dense f16" { DenseDtype::F16 } else { DenseDtype::F32 };
                let first = DenseGemv::new(ctx, &w, rows, cols, dtype)?;
                held = first.device_bytes();
                copies = copies_for(o, held);
                let mut v = vec![first];
                for _ in 1..copies {
                    v.push(DenseGemv::new(ctx, &w, rows, cols, dtype)?);
                }
                Held::Dense(v)
            }
        };
        for &m in &o.ms {
            let time = median_time(ctx, o, heater, copies, |pass, run| match &built {
                Held::Ec(v) => v[run % v.len()].encode_pass(pass, &x, &y, m),
                Held::Dense(v) => v[run % v.len()].encode_pass(pass, &x, &y, m),
            })?;
            if strategy == "cached" {
                cached_time.insert(m, time.pass);
            }
            out.push(Row {
                shape: shape.clone(),
                what: strategy.to_string(),
                m,
                time,
                bytes: held + io_bytes(m),
                weights: n,
                copies,
                cached: cached_time.get(&m).copied(),
            });
        }
    }

    // A kernel that only reads as many bytes as Cached moves at one vector.
    let cached_bytes = out.iter().find(|r| r.shape == shape && r.what == "cached" && r.m == 1).map(|r| r.bytes);
    if let Some(bytes) = cached_bytes {
        out.push(read_row(ctx, o, heater, &shape, bytes)?);
    }

    // Decode-only: the stream to packed 4-bit symbols.
    let streams: Vec<GpuStream> = {
        let first = GpuStream::upload(ctx, &tensor)?;
        let copies = copies_for(o, first.device_bytes() + first.packed_bytes());
        let mut v = vec![first];
        for _ in 1..copies {
            v.push(GpuStream::upload(ctx, &tensor)?);
        }
        v
    };
    out.push(decode_row(ctx, o, heater, &shape, &streams)?);
    if o.variants {
        decode_experiments(ctx, o, heater, &decode_variants(), &shape, &streams, out)?;
    }
    decode_experiments(ctx, o, heater, &o.experiments, &shape, &streams, out)?;
    fused_experiments(ctx, o, heater, &o.experiments, &shape, &tensor, &x, &y, out)?;
    let big = rows * cols >= 1 << 24;
    if (o.variants && big) || !o.experiments.is_empty() {
        let rw = RowWeights::new(ctx, o, heater, &tensor, &w, &x, &y)?;
        if o.variants && big {
            row_variants(ctx, &rw, &shape, out)?;
        }
        row_experiments(ctx, &rw, &o.experiments, &shape, out)?;
    }
    Ok(())
}

/// q_gemv and gemv_f16 at M = 1 with other workgroup sizes, and with their x loads (or q_gemv's scale loads)
/// left out (outputs wrong by design; only the times mean anything): (kernel, name, workgroup, the line of the
/// kernel replaced, its replacement, workgroups or 0 for one per row block).
const ROW_VARIANTS: [(Kernel, &str, u32, &str, &str, u32); 15] = [
    (Kernel::QGemv, "q_gemv wg32", 32, "", "", 0),
    (Kernel::QGemv, "q_gemv wg128", 128, "", "", 0),
    (Kernel::QGemv, "q_gemv wg256", 256, "", "", 0),
    (Kernel::QGemv, "q_gemv -x", 64, "let xv = x4[xb[v] + c4];", "let xv = vec4<f32>(f32(c4));", 0),
    (
        Kernel::QGemv,
        "q_gemv -scales",
        64,
        "return vec4<f32>(scales[gr.x + g], scales[gr.y + g], scales[gr.z + g], scales[gr.w + g]);",
        "return vec4<f32>(f32(g & 1u));",
        0,
    ),
    (
        Kernel::QGemv,
        "q_gemv -dequant",
        64,
        "return bitcast<vec4<f32>>((placed & vec4<u32>(k_mask)) | vec4<u32>(0x3f800000u));",
        "return bitcast<vec4<f32>>(vec4<u32>(word) + pos);",
        0,
    ),
    (Kernel::GemvF16, "f16 wg64", 64, "", "", 0),
    (Kernel::GemvF16, "f16 wg128", 128, "", "", 0),
    (Kernel::GemvF16, "f16 wg512", 512, "", "", 0),
    (Kernel::GemvF16, "f16 -half x", 256, "let p = x4[xb[v] + 2u * c];", "let p = vec4<f32>(f32(c));", 0),
    (
        Kernel::GemvF16,
        "f16 -x -unpack",
        256,
        "return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));",
        "return bitcast<vec4<f32>>(w);",
        0,
    ),
    // Fewer workgroups than rows: each loops over rows (grid-stride), no workgroup per row to start.
    (Kernel::GemvF16, "f16 grid 1056", 256, "", "", 1056),
    (Kernel::GemvF16, "f16 grid 4224", 256, "", "", 4224),
    (Kernel::QGemv, "q_gemv grid 1056", 64, "", "", 1056),
    (Kernel::QGemv, "q_gemv grid 4224", 64, "", "", 4224),
];

/// What the `-unpack` row variant replaces besides its own line: the x loads and the other conversions, so what
/// is left is the weight loads and FMAs.
const UNPACK_ALSO: [(&str, &str); 2] = [
    ("let p = x4[xb[v] + 2u * c];", "let p = vec4<f32>(f32(c));"),
    ("return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));", "return bitcast<vec4<f32>>(w).wzyx;"),
];

/// Times [`ROW_VARIANTS`] on one shape.
fn row_variants(ctx: &GpuContext, rw: &RowWeights, shape: &str, out: &mut Vec<Row>) -> Result<()> {
    let lanes = ctx.lane_mode();
    for (kernel, name, wg, from, to, grid) in ROW_VARIANTS {
        let bits = if kernel == Kernel::QGemv { rw.bits } else { 0 };
        let spec = Spec::new(lanes, bits, 0, 1, wg);
        let pipeline = kernels::edited_pipeline(ctx, kernel, spec, |src| {
            if from.is_empty() {
                return src;
            }
            let mut src = src;
            assert!(src.contains(from), "{} no longer contains {from:?}", kernel.file());
            src = src.replace(from, to);
            if name.ends_with("-unpack") {
                return UNPACK_ALSO.iter().fold(src, |src, (from, to)| src.replace(from, to));
            }
            src
        })?;
        let blocks = kernels::row_blocks(kernel, &spec, rw.rows) as u32;
        let grid = if grid == 0 { blocks } else { grid }.min(ctx.limits().max_compute_workgroups_per_dimension);
        out.push(rw.time(ctx, shape, kernel, name, &pipeline, grid, 1)?);
    }
    Ok(())
}

/// What the row-kernel variants and experiments bind: the quantized (packed symbols and scales) and the dense
/// f16 weights of one shape, rotated over copies, and one x and y (sized for the most vectors of `--ms`).
struct RowWeights<'a> {
    o: &'a Opts,
    heater: &'a Heater,
    rows: usize,
    cols: usize,
    bits: u32,
    q_groups: Vec<wgpu::BindGroup>,
    q_bytes: u64,
    f16_groups: Vec<wgpu::BindGroup>,
    f16_bytes: u64,
    /// Per vector count (1 and every `--ms` up to [`kernels::MAX_VECTORS_PER_PASS`]), q_gemv's and gemv_f16's
    /// group 1.
    io: Vec<(usize, [wgpu::BindGroup; 2])>,
    y: &'a wgpu::Buffer,
}

impl<'a> RowWeights<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &GpuContext,
        o: &'a Opts,
        heater: &'a Heater,
        tensor: &EcTensor,
        w: &[f32],
        x: &wgpu::Buffer,
        y: &'a wgpu::Buffer,
    ) -> Result<Self> {
        let (rows, cols) = (tensor.rows(), tensor.cols());
        let first = GpuStream::upload(ctx, tensor)?;
        let q_bytes = first.packed_bytes() + (tensor.scales().len() * 8) as u64;
        let mut q_groups = Vec::new();
        for _ in 0..copies_for(o, q_bytes) {
            let packed = kernels::decode_to_packed(ctx, &first)?;
            let scales = GpuScales::upload(ctx, tensor)?;
            q_groups.push(kernels::q_gemv_weights(ctx, &packed, &scales)?);
        }
        // Dense f16 copies; their bind groups keep the buffers alive.
        let f16: Vec<DenseGemv> = (0..copies_for(o, (rows * cols * 2) as u64))
            .map(|_| DenseGemv::new(ctx, w, rows, cols, DenseDtype::F16))
            .collect::<Result<_>>()?;
        let f16_bytes = f16[0].device_bytes();
        let f16_groups = f16.iter().map(|d| d.weights_bind_group().clone()).collect();
        let bits = tensor.bits();
        let mut io = Vec::new();
        for m in experiment_ms(o) {
            let call = kernels::call_params(ctx, m)?;
            let xl =
                if kernels::lane_x(bits, rows, cols, m) { Some(kernels::lane_x_room(ctx, m, cols)?) } else { None };
            io.push((
                m,
                [Kernel::QGemv, Kernel::GemvF16]
                    .map(|k| kernels::io_bind_group(ctx, k, x, y, Some(&call), xl.as_ref())),
            ));
        }
        Ok(Self { o, heater, rows, cols, bits, q_groups, q_bytes, f16_groups, f16_bytes, io, y })
    }

    /// The vector counts the experiments run at: 1 and every `--ms` up to one workgroup's most.
    fn ms(&self) -> impl Iterator<Item = usize> + '_ {
        self.io.iter().map(|(m, _)| *m)
    }

    /// The workgroup the crate picks for `kernel` at `m` vectors on these weights.
    fn workgroup(&self, kernel: Kernel, m: usize) -> u32 {
        let row_bytes = if kernel == Kernel::QGemv { self.cols * self.bits as usize / 8 } else { self.cols * 2 };
        kernels::row_workgroup(kernel, m as u32, row_bytes)
    }

    fn groups(&self, kernel: Kernel, m: usize) -> (&[wgpu::BindGroup], &wgpu::BindGroup, u64) {
        let io = &self.io.iter().find(|(n, _)| *n == m).expect("a vector count the weights were set up for").1;
        if kernel == Kernel::QGemv {
            (&self.q_groups, &io[0], self.q_bytes)
        } else {
            (&self.f16_groups, &io[1], self.f16_bytes)
        }
    }

    /// Records x_lanes.wgsl before a q_gemv pipeline of `m` vectors that reads x in lane order (the crate's
    /// workgroup; an experiment with another one reads the wrong order and is reported wrong).
    fn lanes_first(&self, ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, kernel: Kernel, m: usize) -> Result<()> {
        if kernel == Kernel::QGemv && kernels::lane_x(self.bits, self.rows, self.cols, m) {
            let (groups, io, _) = self.groups(kernel, m);
            let wg = self.workgroup(kernel, kernels::vectors_per_pass(kernel, m) as usize);
            kernels::x_lanes(ctx, pass, (self.bits, self.cols, wg), &groups[0], io, m)?;
        }
        Ok(())
    }

    /// y (`m` vectors) after one run of `pipeline` on the first weight copy (y poisoned with NaN first).
    fn product(
        &self,
        ctx: &GpuContext,
        kernel: Kernel,
        pipeline: &wgpu::ComputePipeline,
        grid: u32,
        m: usize,
    ) -> Result<Vec<f32>> {
        let (groups, io, _) = self.groups(kernel, m);
        ctx.queue().write_buffer(self.y, 0, bytemuck::cast_slice(&vec![f32::NAN; m * self.rows]));
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.lanes_first(ctx, &mut pass, kernel, m)?;
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &groups[0], &[]);
            pass.set_bind_group(1, io, &[]);
            pass.dispatch_workgroups(grid, 1, 1);
        }
        ctx.queue().submit([enc.finish()]);
        Ok(bytemuck::pod_collect_to_vec(&ctx.read_back(self.y, (m * self.rows * 4) as u64)?))
    }

    #[allow(clippy::too_many_arguments)]
    fn time(
        &self,
        ctx: &GpuContext,
        shape: &str,
        kernel: Kernel,
        name: &str,
        pipeline: &wgpu::ComputePipeline,
        grid: u32,
        m: usize,
    ) -> Result<Row> {
        let (groups, io, bytes) = self.groups(kernel, m);
        let time = median_time(ctx, self.o, self.heater, groups.len(), |pass, run| {
            self.lanes_first(ctx, pass, kernel, m)?;
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &groups[run % groups.len()], &[]);
            pass.set_bind_group(1, io, &[]);
            pass.dispatch_workgroups(grid, 1, 1);
            Ok(())
        })?;
        Ok(Row {
            shape: shape.to_string(),
            what: name.to_string(),
            m,
            time,
            bytes: bytes + (m * (self.rows + self.cols) * 4) as u64,
            weights: (self.rows * self.cols) as u64,
            copies: groups.len(),
            cached: None,
        })
    }
}

/// A kernel variant read at run time (`--experiments DIR`): file `KERNEL.LABEL.wgsl` (KERNEL one of
/// rans_decode, ec_gemv, q_gemv, gemv_f16) replaces the kernel's WGSL file (after its usual preamble, or on its own
/// with a `//@ whole` line). Optional `//@` lines set `wg=N` (invocations per workgroup, default the kernel's
/// own), `per=N` (tiles per workgroup for rans_decode, row tiles per workgroup for ec_gemv, rows per workgroup
/// for the row kernels, default the kernel's own) and `grid=N` (workgroups, each looping over its share;
/// default one per `per` units);
/// `//@ unchecked` times a variant whose output is wrong by design (a part left out); `//@ nobounds` builds it
/// without naga's bounds checks; `//@ accsat` compiles it to SPIR-V with naga here (bounds checks as the crate's),
/// rewrites every integer add of a packed 8-bit dot product into the accumulating form (`OpSDotAccSat`, which
/// equals the add wherever the sum does not overflow, as in ec_gemv's digits), and builds that through the driver's
/// passthrough path (the device is then opened with `PASSTHROUGH_SHADERS`); `//@ spirv` the same without the
/// rewriting (the control for `accsat`). Each is checked against the kernel it replaces on the first weight copy (decoded
/// symbols equal, or products within 1e-5 of max |y|) and timed like it; a variant that fails the check is
/// reported and not timed. Row-kernel and ec_gemv variants run at M = 1 and at each `--ms` the crate takes in one
/// pass (`kernels::vectors_per_pass`), checked at each.
struct Experiment {
    kernel: Kernel,
    label: String,
    body: String,
    whole: bool,
    wg: Option<u32>,
    per: Option<u32>,
    grid: Option<u32>,
    /// Timed even when its output differs (a variant with a part left out on purpose).
    unchecked: bool,
    /// Built without naga's bounds checks.
    no_bounds: bool,
    /// Compiled to SPIR-V here (`accsat_spirv`): `Some(true)` with each add of a dot product folded into it
    /// (`//@ accsat`), `Some(false)` as naga writes it (`//@ spirv`).
    spirv: Option<bool>,
}

fn load_experiments(dir: &Path) -> std::io::Result<Vec<Experiment>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let (kernel, label) = stem.split_once('.').unwrap_or((&stem, ""));
        let kernel = match kernel {
            "rans_decode" => Kernel::RansDecode,
            "q_gemv" => Kernel::QGemv,
            "gemv_f16" => Kernel::GemvF16,
            "ec_gemv" => Kernel::EcGemv,
            _ => {
                println!("experiments: skipping {} (not rans_decode, ec_gemv, q_gemv or gemv_f16)", path.display());
                continue;
            }
        };
        let body = std::fs::read_to_string(&path)?;
        let mut e = Experiment {
            kernel,
            label: label.to_string(),
            body,
            whole: false,
            wg: None,
            per: None,
            grid: None,
            unchecked: false,
            no_bounds: false,
            spirv: None,
        };
        for line in e.body.lines().filter_map(|l| l.trim().strip_prefix("//@")) {
            for word in line.split_whitespace() {
                match word.split_once('=') {
                    Some(("wg", v)) => e.wg = v.parse().ok(),
                    Some(("per", v)) => e.per = v.parse().ok(),
                    Some(("grid", v)) => e.grid = v.parse().ok(),
                    None if word == "whole" => e.whole = true,
                    None if word == "unchecked" => e.unchecked = true,
                    None if word == "nobounds" => e.no_bounds = true,
                    None if word == "accsat" => e.spirv = Some(true),
                    None if word == "spirv" => e.spirv = Some(false),
                    _ => println!("experiments: {}: unknown directive {word}", path.display()),
                }
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// SPIR-V of a kernel source, compiled by naga (bounds checks clamp, as the crate's pipelines), in which, where
/// `fold`, every `OpIAdd` of an `OpSDot` result is rewritten as `OpSDotAccSat` of the dot's operands and the add's
/// other operand.
fn accsat_spirv(src: &str, spec: Spec, fold: bool) -> ecq::Result<Vec<u32>> {
    use naga::back::spv;
    let fail = |what: &str, e: String| ecq::Error::Gpu(format!("spirv: {what}: {e}"));
    let module = naga::front::wgsl::parse_str(src).map_err(|e| fail("parse", e.emit_to_string(src)))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| fail("validate", e.emit_to_string(src)))?;
    let clamp = naga::proc::BoundsCheckPolicy::Restrict;
    let options = spv::Options {
        lang_version: (1, 6),
        flags: spv::WriterFlags::empty(),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: clamp,
            buffer: clamp,
            image_load: clamp,
            binding_array: clamp,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: false,
        ..Default::default()
    };
    let pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    let words =
        spv::write_vec(&module, &info, &options, Some(&pipeline)).map_err(|e| fail("spv-out", e.to_string()))?;
    const OP_IADD: u32 = 128;
    const OP_SDOT: u32 = 4450;
    const OP_SDOT_ACC_SAT: u32 = 4453;
    // The operands (a, b, packed format) of every OpSDot, by result id.
    let mut dots = std::collections::HashMap::new();
    let mut i = 5;
    while i < words.len() {
        let (count, op) = ((words[i] >> 16) as usize, words[i] & 0xffff);
        if op == OP_SDOT && count == 6 {
            dots.insert(words[i + 2], (words[i + 3], words[i + 4], words[i + 5]));
        }
        i += count.max(1);
    }
    let mut out = words[..5].to_vec();
    let mut folded = 0;
    let mut i = 5;
    while i < words.len() {
        let (count, op) = ((words[i] >> 16) as usize, words[i] & 0xffff);
        let inst = &words[i..i + count.max(1)];
        let dot = (fold && op == OP_IADD && count == 5)
            .then(|| dots.get(&inst[3]).map(|d| (d, inst[4])).or_else(|| dots.get(&inst[4]).map(|d| (d, inst[3]))))
            .flatten();
        match dot {
            Some(((a, b, format), acc)) => {
                out.extend([(7 << 16) | OP_SDOT_ACC_SAT, inst[1], inst[2], *a, *b, acc, *format]);
                folded += 1;
            }
            None => out.extend_from_slice(inst),
        }
        i += count.max(1);
    }
    println!("spirv: {} dot products, {folded} adds folded (M = {})", dots.len(), spec.m);
    Ok(out)
}

impl Experiment {
    fn name(&self) -> String {
        format!("x {}", self.label)
    }

    /// Workgroups for `units` units of work (tiles or rows), `per` to a workgroup unless the file says otherwise.
    fn grid(&self, ctx: &GpuContext, units: usize, per: u32) -> u32 {
        let per = self.per.unwrap_or(per).max(1) as usize;
        self.grid.unwrap_or(units.div_ceil(per) as u32).min(ctx.limits().max_compute_workgroups_per_dimension)
    }

    /// The variant built under `spec` (its workgroup size replaced by the file's) and checked by `check`, which
    /// runs it once and returns whether its output matches the kernel it replaces and a line saying by how much.
    /// None, with the reason printed, where it does not build or is wrong (unless marked `unchecked`).
    fn checked_pipeline(
        &self,
        ctx: &GpuContext,
        spec: Spec,
        shape: &str,
        check: impl FnOnce(&wgpu::ComputePipeline) -> Result<(bool, String)>,
    ) -> Result<Option<wgpu::ComputePipeline>> {
        let spec = Spec { workgroup: self.wg.unwrap_or(spec.workgroup), ..spec };
        let src = ecq::gpu::shaders::source_with_body(self.kernel, &spec, &self.body, !self.whole);
        let built = if let Some(fold) = self.spirv {
            accsat_spirv(&src, spec, fold).and_then(|words| {
                // SAFETY: naga's SPIR-V of the variant, with bounds checks, and its dot products' adds folded
                // into them (no sum of the digits' products overflows: ec_gemv.wgsl, `DIGITS`); its product is
                // checked below before it is timed.
                unsafe { kernels::spirv_pipeline(ctx, self.kernel, spec, &src, &words) }
            })
        } else if self.no_bounds {
            // SAFETY: a benchmark of a variant whose author asked for it (`//@ nobounds`) on the bench's own
            // well-formed weights; the product is checked below before it is timed.
            unsafe { kernels::edited_pipeline_without_bounds_checks(ctx, self.kernel, spec, |_| src.clone()) }
        } else {
            kernels::edited_pipeline(ctx, self.kernel, spec, |_| src.clone())
        };
        let pipeline = match built {
            Ok(p) => p,
            Err(err) => {
                println!("{shape} {}: {err}", self.name());
                return Ok(None);
            }
        };
        let (good, line) = check(&pipeline)?;
        println!("{shape} {}: {line}", self.name());
        if !good && !self.unchecked {
            println!("{shape} {}: WRONG, not timed", self.name());
            return Ok(None);
        }
        Ok(Some(pipeline))
    }
}

/// Products within this of max |y| count as the same (false for NaN).
fn same_product(diff: f64) -> bool {
    diff <= 1e-5
}

/// Times the row-kernel experiments on one shape at M = 1 and at every `--ms` up to one workgroup's most
/// vectors, each checked first against the kernel it replaces at the same M.
fn row_experiments(
    ctx: &GpuContext,
    rw: &RowWeights,
    exps: &[Experiment],
    shape: &str,
    out: &mut Vec<Row>,
) -> Result<()> {
    let lanes = ctx.lane_mode();
    for m in rw.ms() {
        // Each kernel's own product at this vector count, computed once for all its experiments.
        let mut references: Vec<(Kernel, Vec<f32>)> = Vec::new();
        // An experiment is one workgroup's worth of vectors; where the crate takes `m` vectors in smaller
        // blocks (q_gemv above 3), there is no kernel at that M to compare with.
        let one_block = |k: Kernel| kernels::vectors_per_pass(k, m) as usize == m;
        for e in exps.iter().filter(|e| matches!(e.kernel, Kernel::QGemv | Kernel::GemvF16) && one_block(e.kernel)) {
            let bits = if e.kernel == Kernel::QGemv { rw.bits } else { 0 };
            let lane_x = e.kernel == Kernel::QGemv && kernels::lane_x(bits, rw.rows, rw.cols, m);
            let own = Spec { lane_x, ..Spec::new(lanes, bits, 0, m as u32, rw.workgroup(e.kernel, m)) };
            if !references.iter().any(|(k, _)| *k == e.kernel) {
                let own_grid = kernels::row_blocks(e.kernel, &own, rw.rows) as u32;
                let pipeline = kernels::edited_pipeline(ctx, e.kernel, own, |s| s)?;
                references.push((e.kernel, rw.product(ctx, e.kernel, &pipeline, own_grid, m)?));
            }
            let reference = &references.iter().find(|(k, _)| *k == e.kernel).expect("computed above").1;
            // The rows per workgroup of the spec it is built under (its own workgroup, if it sets one).
            let built = Spec { workgroup: e.wg.unwrap_or(own.workgroup), ..own };
            let grid = e.grid(ctx, rw.rows, kernels::rows_per_group(e.kernel, &built));
            let shape_m = format!("{shape} m={m}");
            let Some(pipeline) = e.checked_pipeline(ctx, own, &shape_m, |p| {
                let diff = rel_diff(&rw.product(ctx, e.kernel, p, grid, m)?, reference);
                Ok((same_product(diff), format!("vs {} {diff:.1e}", e.kernel.file())))
            })?
            else {
                continue;
            };
            let name = e.name();
            out.push(rw.time(ctx, shape, e.kernel, &name, &pipeline, grid, m)?);
        }
    }
    Ok(())
}

/// The vector counts experiments run at: 1 and each `--ms` one pass of a kernel takes (at most
/// [`kernels::MAX_VECTORS_PER_PASS`]), ascending.
fn experiment_ms(o: &Opts) -> Vec<usize> {
    let mut ms: Vec<usize> =
        std::iter::once(1).chain(o.ms.iter().copied()).filter(|&m| m <= kernels::MAX_VECTORS_PER_PASS).collect();
    ms.sort_unstable();
    ms.dedup();
    ms
}

/// Times the ec_gemv experiments at M = 1 and at every `--ms` up to one pass's most vectors, each checked first
/// against ec_gemv's product at the same M. Each takes the crate's specialization and grid for no known compute
/// units, or for `--compute-units N` where N > 0 (`per` = the crate's workgroups per experiment workgroup, default
/// 1).
#[allow(clippy::too_many_arguments)]
fn fused_experiments(
    ctx: &GpuContext,
    o: &Opts,
    heater: &Heater,
    exps: &[Experiment],
    shape: &str,
    tensor: &EcTensor,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    out: &mut Vec<Row>,
) -> Result<()> {
    if !exps.iter().any(|e| e.kernel == Kernel::EcGemv) {
        return Ok(());
    }
    let first = GpuStream::upload(ctx, tensor)?;
    let bytes = first.device_bytes() + (tensor.scales().len() * 8) as u64;
    let mut held = Vec::new();
    for _ in 0..copies_for(o, bytes) {
        let stream = GpuStream::upload(ctx, tensor)?;
        let scales = GpuScales::upload_tiles(ctx, tensor)?;
        held.push(kernels::ec_gemv_weights(ctx, &stream, &scales)?);
    }
    let io = kernels::io_bind_group(ctx, Kernel::EcGemv, x, y, None, None);
    let l = *first.layout();
    let rows = l.rows();
    let product = |pipeline: &wgpu::ComputePipeline, grid: u32, groups: u32, m: usize| -> Result<Vec<f32>> {
        ctx.queue().write_buffer(y, 0, bytemuck::cast_slice(&vec![f32::NAN; m * rows]));
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &held[0], &[]);
            pass.set_bind_group(1, &io, &[]);
            pass.dispatch_workgroups(grid, groups, 1);
        }
        ctx.queue().submit([enc.finish()]);
        Ok(bytemuck::pod_collect_to_vec(&ctx.read_back(y, (m * rows * 4) as u64)?))
    };
    // The crate's own specialization and grid: with no compute-unit count (one row of workgroups, x read as without
    // one), or, where `--compute-units N` names N > 0, for that many.
    let spec_ctx = match o.compute_units {
        Some(n) if n > 0 => ctx.clone(),
        _ => ctx.with_compute_units(None),
    };
    for m in experiment_ms(o) {
        let (own, groups) = kernels::ec_gemv_spec(&spec_ctx, &first, m);
        let groups = groups as u32;
        let own_grid = kernels::ec_gemv_workgroups(&own, &l);
        let reference =
            product(&kernels::edited_pipeline(ctx, Kernel::EcGemv, own, |s| s)?, own_grid as u32, groups, m)?;
        for e in exps.iter().filter(|e| e.kernel == Kernel::EcGemv) {
            let grid = e.grid(ctx, own_grid, 1);
            let Some(pipeline) = e.checked_pipeline(ctx, own, &format!("{shape} m={m}"), |p| {
                let diff = rel_diff(&product(p, grid, groups, m)?, &reference);
                Ok((same_product(diff), format!("vs ec_gemv.wgsl {diff:.1e}")))
            })?
            else {
                continue;
            };
            let name = e.name();
            let time = median_time(ctx, o, heater, held.len(), |pass, run| {
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &held[run % held.len()], &[]);
                pass.set_bind_group(1, &io, &[]);
                pass.dispatch_workgroups(grid, groups, 1);
                Ok(())
            })?;
            out.push(Row {
                shape: shape.to_string(),
                what: name,
                m,
                time,
                bytes: bytes + (m * (rows + l.cols()) * 4) as u64,
                weights: (rows * l.cols()) as u64,
                copies: held.len(),
                cached: None,
            });
        }
    }
    Ok(())
}

/// Times the rans_decode experiments on `streams`, each checked first: its symbols must equal the kernel's.
fn decode_experiments(
    ctx: &GpuContext,
    o: &Opts,
    heater: &Heater,
    exps: &[Experiment],
    shape: &str,
    streams: &[GpuStream],
    out: &mut Vec<Row>,
) -> Result<()> {
    let outs: Vec<GpuPacked> = streams.iter().map(|s| GpuPacked::for_stream(ctx, s)).collect::<Result<_>>()?;
    let status = storage(ctx, "status", 8);
    let reference = kernels::decode_to_packed(ctx, &streams[0])?.read(ctx)?;
    for e in exps.iter().filter(|e| e.kernel == Kernel::RansDecode) {
        let own = kernels::rans_decode_spec(ctx, &streams[0]);
        // Tiles per workgroup that give the experiment's grid (the kernel loops over the rest).
        let tiles = streams[0].layout().tiles();
        let per = tiles.div_ceil(e.grid(ctx, tiles, own.workgroup / 32).max(1) as usize);
        let Some(pipeline) = e.checked_pipeline(ctx, own, shape, |p| {
            let check = &outs[0];
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            enc.clear_buffer(check.buffer(), 0, None);
            kernels::rans_decode_with(
                ctx,
                &mut enc.begin_compute_pass(&Default::default()),
                &streams[0],
                check,
                &status,
                p,
                per,
            )?;
            ctx.queue().submit([enc.finish()]);
            let got = check.read(ctx)?;
            let wrong = got.iter().zip(&reference).filter(|(a, b)| a != b).count();
            Ok((wrong == 0, format!("{wrong} of {} packed words differ from rans_decode", reference.len())))
        })?
        else {
            continue;
        };
        let name = e.name();
        let time = median_time(ctx, o, heater, streams.len(), |pass, run| {
            let i = run % streams.len();
            kernels::rans_decode_with(ctx, pass, &streams[i], &outs[i], &status, &pipeline, per)
        })?;
        let l = streams[0].layout();
        out.push(Row {
            shape: shape.to_string(),
            what: name,
            m: 0,
            time,
            bytes: streams[0].device_bytes() + streams[0].packed_bytes(),
            weights: (l.rows() * l.cols()) as u64,
            copies: streams.len(),
            cached: None,
        });
    }
    Ok(())
}

/// Edits of rans_decode.wgsl that each leave one part of a step out, to see which part the time goes to
/// (their outputs are wrong by design; only their times mean anything).
const DECODE_VARIANTS: [(&str, &str, &str); 4] = [
    ("-table", "let e = table[x & (TABLE - 1u)];", "let e = (x & 0xffu) | 0x7ff00u;"),
    ("-store", "packed[out_at >> 2u] = out_q;", "if (out_q.x == 0x9e3779b9u) { packed[out_at >> 2u] = out_q; }"),
    (
        "-word read",
        "let word = next_word(dec_pos + rank.x, need, max(dec_end, 1u) - 1u);",
        "let word = (dec_pos + rank.x) & 0xffffu;",
    ),
    ("-ballot", "let rank = word_rank(need);", "let rank = vec2<u32>(select(0u, lane_row, need), 16u);"),
];

/// The decode variants as experiments: timed whatever they write.
fn decode_variants() -> Vec<Experiment> {
    DECODE_VARIANTS
        .iter()
        .map(|&(name, from, to)| {
            let kernel = ecq::gpu::shaders::RANS_DECODE;
            assert!(kernel.contains(from), "rans_decode.wgsl no longer contains {from:?}");
            Experiment {
                kernel: Kernel::RansDecode,
                label: format!("decode {name}"),
                body: kernel.replace(from, to),
                whole: false,
                wg: None,
                per: None,
                grid: None,
                unchecked: true,
                no_bounds: false,
                spirv: None,
            }
        })
        .collect()
}

/// Times the decode-only kernel over rotating copies of one stream (every copy checked once first).
fn decode_row(ctx: &GpuContext, o: &Opts, heater: &Heater, shape: &str, streams: &[GpuStream]) -> Result<Row> {
    let outs: Vec<GpuPacked> = streams.iter().map(|s| GpuPacked::for_stream(ctx, s)).collect::<Result<_>>()?;
    for (s, p) in streams.iter().zip(&outs) {
        kernels::decode_into(ctx, s, p)?;
    }
    let status = storage(ctx, "status", 8);
    let time = median_time(ctx, o, heater, streams.len(), |pass, run| {
        let i = run % streams.len();
        kernels::rans_decode(ctx, pass, &streams[i], &outs[i], &status)
    })?;
    let l = streams[0].layout();
    Ok(Row {
        shape: shape.to_string(),
        what: "decode only".into(),
        m: 0,
        time,
        bytes: streams[0].device_bytes() + streams[0].packed_bytes(),
        weights: (l.rows() * l.cols()) as u64,
        copies: streams.len(),
        cached: None,
    })
}

fn bench_smol(ctx: &GpuContext, o: &Opts, heater: &Heater, path: &Path, out: &mut Vec<Row>) -> Result<()> {
    let file = EcFile::open(path)?;
    let names: Vec<String> = file.encoded_names().map(str::to_string).collect();
    println!("\nreal SmolLM2-135M Q4_1 symbols from {} ({} tensors)", path.display(), names.len());
    for name in names.iter().filter(|n| n.starts_with("stack_")) {
        let t = file.tensor(name)?;
        // The stack as extracted (layers 0..8), and the same symbols repeated to about the whole model's 30
        // layers in one tensor (REPEAT times the rows, REPEAT times the tiles; same frequency table).
        let repeated = {
            let q = t.to_quantized()?;
            let mut r = q.clone();
            for _ in 1..SMOL_REPEAT {
                r.rows += q.rows;
                r.symbols.extend_from_slice(&q.symbols);
                r.scales.extend_from_slice(&q.scales);
                r.biases.extend_from_slice(&q.biases);
            }
            EcTensor::encode(&r, o.encode)?
        };
        for (t, label) in [(&t, String::new()), (&repeated, format!(" x{SMOL_REPEAT}"))] {
            let first = GpuStream::upload(ctx, t)?;
            let copies = copies_for(o, first.device_bytes() + first.packed_bytes());
            let mut streams = vec![first];
            for _ in 1..copies {
                streams.push(GpuStream::upload(ctx, t)?);
            }
            let shape = format!("smol {name}{label} {}x{}", t.rows(), t.cols());
            out.push(decode_row(ctx, o, heater, &shape, &streams)?);
            decode_experiments(ctx, o, heater, &o.experiments, &shape, &streams, out)?;
        }
    }
    Ok(())
}

/// The table: `us`, `GB/s`, `% copy`, `x cached` and `G wt/s` from the timed-pass median; `own us` and
/// `own %` the same case with every run in a pass of its own.
fn print_table(rows: &[Row], copy_bw: f64) {
    println!(
        "\n{:<30} {:<16} {:>2} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8} {:>9} {:>6}",
        "shape", "kernel", "M", "us", "own us", "MB moved", "GB/s", "% copy", "own %", "x cached", "G wt/s", "copies"
    );
    for r in rows {
        let (t, own) = (r.time.pass.as_secs_f64(), r.time.own.as_secs_f64());
        let bw = r.bytes as f64 / t;
        let ratio = r.cached.map_or("".to_string(), |c| format!("{:.2}", t / c.as_secs_f64()));
        let m = if r.m == 0 { "-".to_string() } else { r.m.to_string() };
        let rate = if r.weights == 0 { String::new() } else { format!("{:.1}", r.weights as f64 / t / 1e9) };
        println!(
            "{:<30} {:<16} {:>2} {:>9.1} {:>9.1} {:>9.2} {:>8.0} {:>6.1}% {:>6.1}% {:>8} {:>9} {:>6}",
            r.shape,
            r.what,
            m,
            t * 1e6,
            own * 1e6,
            r.bytes as f64 / 1e6,
            bw / 1e9,
            100.0 * bw / copy_bw,
            100.0 * r.bytes as f64 / own / copy_bw,
            ratio,
            rate,
            r.copies
        );
    }
}

/// Prints what a timed run costs (both ways of [`Timed`]) with nothing in it, with one dispatch of an empty
/// kernel (one workgroup, no memory access) and with 16 of them, and with the smallest dense f16 GEMV (one row
/// block of 4 x 64, one workgroup) reading one copy every time or 64 copies in turn: the fixed cost every row of
/// the table includes, how much of it is the pass and how much the dispatch, and whether the first touch of a
/// buffer adds to it.
fn timing_floor(ctx: &GpuContext, o: &Opts, heater: &Heater) -> Result<()> {
    let empty = median_time(ctx, o, heater, 1, |_, _| Ok(()))?;
    let nothing = plain_pipeline(ctx, "empty kernel", "@compute @workgroup_size(32) fn main() {}");
    let dispatch = median_time(ctx, o, heater, 1, |pass, _| {
        pass.set_pipeline(&nothing);
        pass.dispatch_workgroups(1, 1, 1);
        Ok(())
    })?;
    // The same dispatch 16 times in one pass: what a dispatch costs without a pass of its own.
    let in_one_pass = median_time(ctx, o, heater, 1, |pass, _| {
        pass.set_pipeline(&nothing);
        for _ in 0..16 {
            pass.dispatch_workgroups(1, 1, 1);
        }
        Ok(())
    })?;
    let (rows, cols) = (4, 64);
    let w: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 - 3.0).collect();
    let gemvs: Vec<DenseGemv> =
        (0..64).map(|_| DenseGemv::new(ctx, &w, rows, cols, DenseDtype::F16)).collect::<Result<_>>()?;
    let x = random_x(ctx, cols, 5);
    let y = storage(ctx, "y floor", (rows * 4) as u64);
    let same = median_time(ctx, o, heater, 1, |pass, _| gemvs[0].encode_pass(pass, &x, &y, 1))?;
    let rotated =
        median_time(ctx, o, heater, gemvs.len(), |pass, run| gemvs[run % gemvs.len()].encode_pass(pass, &x, &y, 1))?;
    let both = |t: Timed| format!("{:.1} / {:.1} us", us(t.pass), us(t.own));
    println!(
        "timing floor (timed pass / own pass): nothing {}; one empty kernel {}; 16 empty kernels in one pass {}; \
         dense f16 {rows}x{cols} (one workgroup) {} on one copy, {} on 64 copies in turn",
        both(empty),
        both(dispatch),
        both(in_one_pass),
        both(same),
        both(rotated)
    );
    Ok(())
}

fn run(o: &Opts) -> Result<()> {
    if o.runs == 0 {
        usage();
    }
    // `//@ spirv` and `//@ accsat` experiments build through the driver's passthrough path.
    let ctx = if o.experiments.iter().any(|e| e.spirv.is_some()) {
        GpuContext::with_features(wgpu::Features::PASSTHROUGH_SHADERS)?
    } else {
        GpuContext::new()?
    };
    let ctx = match o.compute_units {
        Some(n) => ctx.with_compute_units((n > 0).then_some(n)),
        None => ctx,
    };
    let ctx = match o.integer_dot {
        Some(fast) => ctx.with_integer_dot(fast),
        None => ctx,
    };
    println!("device: {}", ctx.describe());
    println!(
        "method: max({}, copies) warm-up + {} timed runs (median), timestamp queries; weights rotated over >= 4 copies and >= {} MiB",
        o.warmup, o.runs, o.rotate_mib
    );
    let heater = Heater::new(&ctx, o.heat_ms)?;
    println!("heater: {} copies of 256 MiB (about {} ms) before every timed batch", heater.copies, o.heat_ms);
    if o.batch > 1 {
        println!("batch: {} runs back to back per timed run (in one pass, or a pass each); times are per run", o.batch);
    }
    let copy_bw = copy_bandwidth(&ctx, o, &heater)?;
    timing_floor(&ctx, o, &heater)?;
    let mut rows = Vec::new();
    for &(r, c) in &o.shapes {
        bench_shape(&ctx, o, &heater, r, c, &mut rows)?;
    }
    match &o.smol {
        Some(p) if p.exists() => bench_smol(&ctx, o, &heater, p, &mut rows)?,
        Some(p) => println!("\nSKIPPED decode-only on real SmolLM2 symbols: {} does not exist", p.display()),
        None => println!("\nSKIPPED decode-only on real SmolLM2 symbols: no --smol FILE or ECQ_SMOL given"),
    }
    let copy_after = copy_bandwidth(&ctx, o, &heater)?;
    println!(
        "copy bandwidth used for '% copy': {:.0} GB/s (the better of before and after)",
        copy_bw.max(copy_after) / 1e9
    );
    print_table(&rows, copy_bw.max(copy_after));
    let targets = target_lines(&rows, copy_bw.max(copy_after));
    if !targets.is_empty() {
        println!("\ntargets, from the cases of this run as timed by the pass:");
        for line in targets {
            println!("{line}");
        }
    }
    Ok(())
}

/// Smallest product, in weights, for which fused must be no slower than dense f16 (4096x4096).
const TARGET_MIN_WEIGHTS: u64 = 4096 * 4096;

/// The speed targets read off `rows` (ratios of cases timed in the same run, by the pass), one line each with the
/// value, the bound and whether it is met, for those whose cases the run has: fused over dense f16 at one vector on
/// products of at least [`TARGET_MIN_WEIGHTS`] weights (at most 1), dense f16 and cached at one vector on 14336x4096
/// as a share of the copy bandwidth `copy_bw` (at least 80% and 75%), fused at 4 vectors over 1 (at most 1.5), and
/// decode-only on the real symbols repeated to a whole model's tiles (`smol stack_k576 x4`, at least 1 T weights/s).
fn target_lines(rows: &[Row], copy_bw: f64) -> Vec<String> {
    let find = |shape: &str, what: &str, m: usize| rows.iter().find(|r| r.shape == shape && r.what == what && r.m == m);
    let secs = |r: &Row| r.time.pass.as_secs_f64();
    let mut shapes: Vec<&str> = Vec::new();
    for r in rows {
        if !shapes.contains(&r.shape.as_str()) {
            shapes.push(&r.shape);
        }
    }
    let mut lines = Vec::new();
    let mut line = |what: String, value: f64, bound: &str, met: bool, unit: &str| {
        let verdict = if met { "met" } else { "missed" };
        let (value, bound) = (format!("{value:.2}{unit}"), format!("{bound}{unit}"));
        lines.push(format!("{what:<46} {value:>9} {bound:>10}  {verdict}"));
    };
    for &shape in &shapes {
        if let (Some(f), Some(d)) = (find(shape, "fused", 1), find(shape, "dense f16", 1)) {
            if f.weights >= TARGET_MIN_WEIGHTS {
                let ratio = secs(f) / secs(d);
                line(format!("fused / dense f16, M = 1, {shape}"), ratio, "<= 1.00", ratio <= 1.0, "");
            }
        }
    }
    for (what, bound) in [("dense f16", 80.0), ("cached", 75.0)] {
        if let Some(r) = find("14336x4096", what, 1) {
            let share = 100.0 * r.bytes as f64 / secs(r) / copy_bw;
            line(format!("{what} % copy, M = 1, 14336x4096"), share, &format!(">= {bound:.2}"), share >= bound, "%");
        }
    }
    for &shape in &shapes {
        if let (Some(one), Some(four)) = (find(shape, "fused", 1), find(shape, "fused", 4)) {
            let ratio = secs(four) / secs(one);
            line(format!("fused M = 4 / M = 1, {shape}"), ratio, "<= 1.50", ratio <= 1.5, "");
        }
    }
    if let Some(r) = rows.iter().find(|r| r.shape.starts_with("smol stack_k576 x4 ") && r.what == "decode only") {
        let rate = r.weights as f64 / secs(r) / 1e12;
        line("decode only, T weights/s, smol stack_k576 x4".to_string(), rate, ">= 1.00", rate >= 1.0, "");
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecq::gpu::LaneMode;

    fn row(shape: &str, what: &str, m: usize, us: f64, bytes: u64, weights: u64) -> Row {
        let t = Duration::from_secs_f64(us * 1e-6);
        Row {
            shape: shape.into(),
            what: what.into(),
            m,
            time: Timed { pass: t, own: t },
            bytes,
            weights,
            copies: 4,
            cached: None,
        }
    }

    /// The target lines take their ratios from the rows of one run: fused over dense f16 only on products of at
    /// least 4096x4096, the shares of the copy bandwidth only on 14336x4096, M = 4 over M = 1 on every shape that
    /// has both, decode-only on the repeated real stack; each line says met or missed against its bound.
    #[test]
    fn target_lines_read_the_run() {
        let big = 14336 * 4096;
        let rows = [
            row("14336x4096", "cached", 1, 20.0, 40_000_000, big),
            row("14336x4096", "fused", 1, 60.0, 36_000_000, big),
            row("14336x4096", "fused", 4, 84.0, 36_000_000, big),
            row("14336x4096", "dense f16", 1, 30.0, 120_000_000, big),
            row("576x1536", "fused", 1, 35.0, 550_000, 576 * 1536),
            row("576x1536", "fused", 4, 36.0, 580_000, 576 * 1536),
            row("576x1536", "dense f16", 1, 7.0, 1_780_000, 576 * 1536),
            row("smol stack_k576 x4 147456x576", "decode only", 0, 77.0, 84_000_000, 147_456 * 576),
            row("smol stack_k576 36864x576", "decode only", 0, 55.0, 21_000_000, 36_864 * 576),
        ];
        // Copy bandwidth 4 TB/s: dense f16 moves 120 MB in 30 us (100%), cached 40 MB in 20 us (50%).
        let lines = target_lines(&rows, 4e12);
        let find = |start: &str| lines.iter().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{start}"));
        // What follows the 46-column label: value, bound, verdict.
        let fields = |l: &str| l[46..].split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert_eq!(fields(find("fused / dense f16, M = 1, 14336x4096")), "2.00 <= 1.00 missed");
        assert!(!lines.iter().any(|l| l.starts_with("fused / dense f16, M = 1, 576x1536")), "{lines:#?}");
        assert_eq!(fields(find("dense f16 % copy, M = 1, 14336x4096")), "100.00% >= 80.00% met");
        assert_eq!(fields(find("cached % copy, M = 1, 14336x4096")), "50.00% >= 75.00% missed");
        assert_eq!(fields(find("fused M = 4 / M = 1, 14336x4096")), "1.40 <= 1.50 met");
        assert_eq!(fields(find("fused M = 4 / M = 1, 576x1536")), "1.03 <= 1.50 met");
        // 147456 x 576 weights in 77 us: 1.10 T weights/s; the stack not repeated is not the target's.
        assert_eq!(fields(find("decode only, T weights/s, smol stack_k576 x4")), "1.10 >= 1.00 met");
        assert!(target_lines(&rows[4..7], 4e12).iter().all(|l| !l.contains("copy")));
    }

    /// Every line `--variants` replaces is still in the kernel it edits (a stale one stopped the run part way).
    #[test]
    fn variant_edits_name_current_kernel_lines() {
        for (kernel, name, workgroup, from, _, _) in ROW_VARIANTS {
            let bits = if kernel == Kernel::QGemv { 4 } else { 0 };
            let spec = Spec::new(LaneMode::SubgroupWide, bits, 0, 1, workgroup);
            let src = ecq::gpu::shaders::source(kernel, &spec);
            assert!(src.contains(from), "{name}: {} no longer contains {from:?}", kernel.file());
            if name.ends_with("-unpack") {
                for (also, _) in UNPACK_ALSO {
                    assert!(src.contains(also), "{name}: {} no longer contains {also:?}", kernel.file());
                }
            }
        }
        for (name, from, _) in DECODE_VARIANTS {
            assert!(ecq::gpu::shaders::RANS_DECODE.contains(from), "decode {name}: rans_decode.wgsl lost {from:?}");
        }
    }
}
