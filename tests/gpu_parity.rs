//! GPU parity: every kernel against the CPU reference, written once and run per kernel path.
//!
//! Each check is a function of a [`GpuContext`]; `per_path!` instantiates it once on the portable kernels
//! (workgroup memory only) and once on the subgroup kernels of the device (32-wide ballots on NVIDIA, 8-wide
//! ballots plus a workgroup exchange on lavapipe), and where fused products run the MSL kernel (Metal) once
//! more with the WGSL fused kernel forced. Decoded symbols are compared exactly; products against a
//! float64 reference computed from `QuantizedMatrix::dequantize`, within named tolerances. Outputs are poisoned
//! (NaN, or two different word patterns for packed symbols) before every run, so an element a kernel fails to
//! write fails the test.
//!
//! With no adapter the tests print a loud skip message and pass, unless `ECQ_REQUIRE_GPU=1`, which makes
//! them fail. Run: `XDG_RUNTIME_DIR=/tmp ECQ_REQUIRE_GPU=1 cargo test --release --test gpu_parity`.
#![cfg(feature = "gpu")]

use std::sync::OnceLock;

use ecq::format::{EcTensor, EncodeOptions, SplitForm};
use ecq::gpu::kernels::{self, GpuPacked, GpuStream};
use ecq::gpu::shaders::{Kernel, LaneMode, Spec};
use ecq::gpu::{DenseDtype, DenseGemv, GpuContext, KernelPath};
use ecq::quant::{pack_mlx, unpack_mlx, QuantizedMatrix, ScaleDtype};
use ecq::{EcMatmul, Error, Strategy};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Relative tolerance of a GPU product element against the float64 reference, as a fraction of
/// `sum_k (|s q_k x_k| + |b x_k|)` (the magnitude the f32 sums of the kernels work at).
const GEMV_REL_TOL: f64 = 1e-5;
/// Absolute floor of the product tolerance, for rows whose terms are all tiny.
const GEMV_ABS_TOL: f64 = 1e-6;
/// Relative tolerance of the f16 dense baseline (weights rounded to f16 against the f32 reference).
const DENSE_F16_REL_TOL: f64 = 2e-3;

static CONTEXT: OnceLock<Option<GpuContext>> = OnceLock::new();

/// The shared device, or `None` (after a loud message) where there is none and none is required.
fn device() -> Option<GpuContext> {
    CONTEXT
        .get_or_init(|| match GpuContext::new() {
            Ok(ctx) => {
                let sub = ctx.with_path(KernelPath::Subgroup).map(|c| c.lane_mode());
                eprintln!("gpu_parity: adapter {}; subgroup kernels: {sub:?}", ctx.describe());
                Some(ctx)
            }
            Err(e) => {
                if std::env::var("ECQ_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("ECQ_REQUIRE_GPU=1 but no GPU adapter: {e}");
                }
                eprintln!(
                    "\n\n!!!!!!!! SKIPPING GPU TESTS: no GPU adapter ({e}).\n!!!!!!!! Install a Vulkan driver \
                     (a software one: apt-get install mesa-vulkan-drivers) or set ECQ_REQUIRE_GPU=1 to fail.\n"
                );
                None
            }
        })
        .clone()
}

/// The context of `path`, or `None` (after a loud message) where the device lacks it.
fn context(path: KernelPath) -> Option<GpuContext> {
    let ctx = device()?;
    match ctx.with_path(path) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPING {path:?} kernels: {e}\n");
            None
        }
    }
}

/// Instantiates a check `fn(&GpuContext)` once per kernel path.
macro_rules! per_path {
    ($($check:ident),* $(,)?) => {
        $(
            mod $check {
                #[test]
                fn portable() {
                    if let Some(ctx) = super::context(ecq::gpu::KernelPath::Portable) {
                        assert_eq!(ctx.lane_mode(), ecq::gpu::LaneMode::Portable);
                        super::$check(&ctx);
                    }
                }
                #[test]
                fn subgroup() {
                    if let Some(ctx) = super::context(ecq::gpu::KernelPath::Subgroup) {
                        assert_ne!(ctx.lane_mode(), ecq::gpu::LaneMode::Portable);
                        super::$check(&ctx);
                    }
                }
                /// Where fused products run the MSL kernel (Metal), once more with the WGSL one forced.
                #[test]
                fn wgsl_fused() {
                    let Some(ctx) = super::device() else { return };
                    if !ctx.fused_uses_msl() {
                        eprintln!("wgsl_fused: not run, fused products already use WGSL on this device");
                        return;
                    }
                    let ctx = ctx.with_fused_source(ecq::gpu::FusedSource::Wgsl).unwrap();
                    assert!(!ctx.fused_uses_msl());
                    super::$check(&ctx);
                }
            }
        )*
    };
}

per_path!(
    decode_equals_cpu_every_bit_width,
    decode_single_tile,
    decode_one_symbol_tables,
    decode_and_gemv_thousands_of_tiles,
    fused_and_cached_every_bit_width,
    fused_and_cached_wide_rows,
    cached_reads_x_in_lane_order,
    split_streams,
    groups_with_zero_or_tiny_scales,
    encode_into_caller_buffers,
    products_chained_in_one_pass,
    f16_inputs,
    dense_baselines,
    corrupt_stream_is_refused,
    device_times_are_measured,
    fused_vectors_shared_out_over_workgroups,
    fused_split_vector_staged_in_workgroup_memory,
    fused_split_vector_as_digits,
    fused_split_blocks_as_digits,
    fused_trip_x_loaded_before_its_steps,
    fused_row_tiles_in_pairs,
    fused_tasks_dealt_out_in_runs,
    fused_trip_x_held_by_its_slab,
);

/// A quantized matrix with skewed random symbols (so the coder has something to gain) and f16 scales.
fn random_matrix(rows: usize, cols: usize, bits: u32, group_size: usize, seed: u64) -> QuantizedMatrix {
    let mut rng = StdRng::seed_from_u64(seed);
    let levels = 1u32 << bits;
    let symbols = (0..rows * cols)
        .map(|_| {
            // A triangle-shaped distribution peaking at the middle level.
            let t: f64 = (rng.gen::<f64>() + rng.gen::<f64>()) / 2.0;
            ((t * levels as f64) as u32).min(levels - 1) as u8
        })
        .collect();
    let groups = rows * cols / group_size;
    let scales = (0..groups).map(|_| f16::from_f32(rng.gen_range(0.001f32..0.05)).to_f32()).collect();
    let biases = (0..groups).map(|_| f16::from_f32(rng.gen_range(-0.5f32..0.5)).to_f32()).collect();
    QuantizedMatrix { rows, cols, bits, group_size, symbols, scales, biases, scale_dtype: ScaleDtype::F16 }
}

/// Encoded at the default precision, the table size users get.
fn encode(q: &QuantizedMatrix, segment: usize) -> EcTensor {
    encode_at(q, segment, ecq::rans::DEFAULT_PRECISION)
}

/// Streams not split and split in each form.
const SPLITS: [Option<SplitForm>; 3] = [None, Some(SplitForm::Low2), Some(SplitForm::Low3)];

/// `q` encoded at the default precision, its stream `split` in that form or not.
fn encode_as(q: &QuantizedMatrix, segment: usize, split: Option<SplitForm>) -> EcTensor {
    encode_with(q, EncodeOptions { segment, precision: ecq::rans::DEFAULT_PRECISION, split, min_tiles: 0 })
}

fn encode_at(q: &QuantizedMatrix, segment: usize, precision: u32) -> EcTensor {
    encode_with(q, EncodeOptions { segment, precision, split: None, min_tiles: 0 })
}

/// `q` encoded with `options`, whose segment the encoder must keep as asked.
fn encode_with(q: &QuantizedMatrix, options: EncodeOptions) -> EcTensor {
    let t = EcTensor::encode(q, options).expect("encode");
    assert_eq!(t.layout().segment(), options.segment, "segment was adjusted");
    t
}

fn random_vectors(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1f32..1.0)).collect()
}

/// Float64 reference of `Y = X W^T` and, per element, the magnitude its tolerance scales with.
fn reference(q: &QuantizedMatrix, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let w = q.dequantize();
    let (n, k, gs) = (q.rows, q.cols, q.group_size);
    let mut y = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for v in 0..m {
        let xv = &x[v * k..(v + 1) * k];
        for r in 0..n {
            let (mut acc, mut size) = (0f64, 0f64);
            for c in 0..k {
                let g = r * (k / gs) + c / gs;
                let xi = xv[c] as f64;
                acc += w[r * k + c] as f64 * xi;
                size += (q.scales[g] as f64 * q.symbols[r * k + c] as f64 * xi).abs() + (q.biases[g] as f64 * xi).abs();
            }
            y[v * n + r] = acc;
            mag[v * n + r] = size;
        }
    }
    (y, mag)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], mag: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = rel * s + GEMV_ABS_TOL;
        assert!((g as f64 - w).abs() <= tol, "{what}: element {i} is {g}, reference {w}, tolerance {tol}");
    }
}

/// Decodes on the GPU twice, into outputs poisoned with all-zero and all-one words, and checks both runs
/// against the CPU decoder exactly: as packed words (`pack_mlx`) and as unpacked symbols.
fn check_decode(ctx: &GpuContext, t: &EcTensor, what: &str) {
    let cpu = t.decode_symbols().expect("CPU decode");
    let want = pack_mlx(&cpu, t.cols(), t.bits()).unwrap();
    let stream = GpuStream::upload(ctx, t).unwrap();
    let out = GpuPacked::for_stream(ctx, &stream).unwrap();
    for poison in [0u32, u32::MAX] {
        ctx.queue().write_buffer(out.buffer(), 0, bytemuck::cast_slice(&vec![poison; want.len()]));
        kernels::decode_into(ctx, &stream, &out).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = out.read(ctx).unwrap();
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what} ({:?}, poison {poison:#x}): packed word {first} is {:#x}, CPU {:#x}",
                ctx.lane_mode(),
                got[first],
                want[first]
            );
        }
        assert_eq!(unpack_mlx(&got, t.cols(), t.bits()).unwrap(), cpu, "{what}: unpacked symbols");
    }
}

/// Runs `tensor` through both GPU strategies for every `m` and checks against the float64 reference.
fn check_products(ctx: &GpuContext, q: &QuantizedMatrix, t: &EcTensor, ms: &[usize], what: &str) {
    for strategy in [Strategy::Fused, Strategy::Cached] {
        let mm = EcMatmul::new(ctx, t, strategy).unwrap_or_else(|e| panic!("{what} {strategy:?}: {e}"));
        for &m in ms {
            let x = random_vectors(m * q.cols, 7 + m as u64);
            let (want, mag) = reference(q, &x, m);
            let mut y = vec![f32::NAN; m * q.rows];
            mm.matmul(&x, m, &mut y).unwrap_or_else(|e| panic!("{what} {strategy:?} m={m}: {e}"));
            assert_close(&format!("{what} {strategy:?} {:?} m={m}", ctx.lane_mode()), &y, &want, &mag, GEMV_REL_TOL);
        }
    }
}

/// Tile decode equals the CPU decoder at every bit width the format allows, on 67 x 1088 (segments of 256:
/// the last one holds 64 columns; the last row tile 3 rows).
fn decode_equals_cpu_every_bit_width(ctx: &GpuContext) {
    for bits in 1..=8 {
        let q = random_matrix(67, 1088, bits, 32, bits as u64);
        check_decode(ctx, &encode(&q, 256), &format!("67x1088 {bits}-bit"));
    }
    // Other table sizes than the default (the largest, P = 12, and P = 10) specialize the kernels' table size.
    let q = random_matrix(67, 1088, 4, 32, 9);
    for precision in [10, ecq::rans::MAX_PRECISION] {
        let t = encode_at(&q, 256, precision);
        check_decode(ctx, &t, &format!("67x1088 4-bit P={precision}"));
        check_products(ctx, &q, &t, &[1, 3], &format!("67x1088 4-bit P={precision}"));
    }
}

/// Every weight the same symbol, so one joint symbol holds the whole table (frequency 2^P, the widest field a
/// decode table entry holds): at P = 10, 11 and 12, split and not, decoded and multiplied as the CPU does.
fn decode_one_symbol_tables(ctx: &GpuContext) {
    let mut q = random_matrix(40, 256, 4, 32, 21);
    q.symbols.iter_mut().for_each(|s| *s = 11);
    for precision in [10, ecq::rans::DEFAULT_PRECISION, ecq::rans::MAX_PRECISION] {
        for split in SPLITS {
            let t =
                EcTensor::encode(&q, EncodeOptions { segment: 128, precision, split, min_tiles: 0 }).expect("encode");
            let what = format!("one symbol P={precision} split={split:?}");
            check_decode(ctx, &t, &what);
            check_products(ctx, &q, &t, &[1, 4], &what);
        }
    }
}

/// One tile: 20 rows (12 inactive lanes) by one segment.
fn decode_single_tile(ctx: &GpuContext) {
    for bits in [3, 4, 8] {
        let q = random_matrix(20, 128, bits, 32, 100 + bits as u64);
        let t = encode(&q, 128);
        assert_eq!(t.layout().tiles(), 1);
        check_decode(ctx, &t, &format!("single tile {bits}-bit"));
        check_products(ctx, &q, &t, &[1, 3], &format!("single tile {bits}-bit"));
    }
}

/// 2048 x 8192 with S = 128 and groups of 32: 64 x 64 = 4096 tiles.
fn decode_and_gemv_thousands_of_tiles(ctx: &GpuContext) {
    let q = random_matrix(2048, 8192, 4, 32, 4096);
    let t = encode(&q, 128);
    assert_eq!(t.layout().tiles(), 4096);
    check_decode(ctx, &t, "2048x8192 S=128");
    check_products(ctx, &q, &t, &[1], "2048x8192 S=128");
}

/// Fused and Cached at every bit width, for 1, 3, 8 and 33 vectors (33: the fused path decodes once and runs
/// the tiled quantized matmul in blocks of 8).
fn fused_and_cached_every_bit_width(ctx: &GpuContext) {
    for bits in 1..=8 {
        let q = random_matrix(67, 1088, bits, 32, 200 + bits as u64);
        let t = encode(&q, 256);
        check_products(ctx, &q, &t, &[1, 3, 8, 33], &format!("67x1088 {bits}-bit"));
    }
}

/// 4160 columns (groups of 64, segments of 512: the last one holds 64 columns), 2-, 4- and 6-bit; 8448; 1-bit
/// 4096; 16384 at 1 to 3 bits.
fn fused_and_cached_wide_rows(ctx: &GpuContext) {
    for bits in [2, 4, 6] {
        let q = random_matrix(67, 4160, bits, 64, 300 + bits as u64);
        let t = encode(&q, 512);
        check_products(ctx, &q, &t, &[1, 3, 8, 33], &format!("67x4160 {bits}-bit"));
    }
    // 8448 columns: 264 chunks of 32 per row; 4- and 8-bit rows are read as vec4s, 264 (4-bit) or 528 (8-bit)
    // per row over 64 invocations, so the last step is partial.
    for bits in [4, 8] {
        let q = random_matrix(37, 8448, bits, 64, 310 + bits as u64);
        let t = encode(&q, 512);
        check_products(ctx, &q, &t, &[1, 3], &format!("37x8448 {bits}-bit"));
    }
    // 1-bit rows of whole vec4s (4096 columns: 32 vec4s of 128 symbols, each over four groups of 32).
    let q = random_matrix(67, 4096, 1, 32, 315);
    let t = encode(&q, 512);
    check_products(ctx, &q, &t, &[1, 3], "67x4096 1-bit");
    // Two segments of 1024 8-bit columns: few slabs per workgroup, long tiles (about 14000 words each).
    let q = random_matrix(37, 2048, 8, 64, 320);
    let t = encode(&q, 1024);
    check_products(ctx, &q, &t, &[1, 3], "37x2048 8-bit S=1024");
    // Rows of at least Q_GEMV_WIDE_ROW_BYTES at 1, 2 and 3 bits: q_gemv's 8-row workgroups on the word path with a
    // fold per word, and on the chunk path; 21 rows leave the last block's second quad partly past the end.
    for bits in [1, 2, 3] {
        let cols = 16384;
        assert!(cols * bits as usize / 8 >= ecq::gpu::kernels::Q_GEMV_WIDE_ROW_BYTES);
        let q = random_matrix(21, cols, bits, 64, 330 + bits as u64);
        let t = encode(&q, 512);
        check_products(ctx, &q, &t, &[1, 3, 5], &format!("21x{cols} {bits}-bit"));
    }
}

/// Products large enough that q_gemv reads x in lane order (x_lanes.wgsl first, `kernels::lane_x`): 4-bit rows of
/// 2048 bytes (8 rows by 128 lanes, one step a lane), 4-bit rows of 544 bytes (4 rows by 64 lanes, one partial
/// step), 8-bit rows of 8448 bytes (five steps, the last of 16 lanes), 1- and 2-bit rows, and 3 vectors in one
/// block; 3 to 250 vectors. Fused products of more than 8 vectors decode once and take the same q_gemv.
fn cached_reads_x_in_lane_order(ctx: &GpuContext) {
    let cases: [(usize, usize, u32, usize); 6] = [
        (256, 4096, 4, 65),
        (2000, 1088, 4, 33),
        (37, 8448, 8, 220),
        (67, 4096, 1, 250),
        (67, 4096, 2, 250),
        (5504, 4096, 4, 3),
    ];
    for (i, &(rows, cols, bits, m)) in cases.iter().enumerate() {
        assert!(ecq::gpu::kernels::lane_x(bits, rows, cols, m), "{rows}x{cols} {bits}-bit m={m} reads x in place");
        let q = random_matrix(rows, cols, bits, 64, 350 + i as u64);
        let t = encode(&q, 512);
        check_products(ctx, &q, &t, &[m], &format!("{rows}x{cols} {bits}-bit, x in lane order"));
    }
}

/// Split 4-bit streams (the high 2 bits coded four weights a step, the low 2 bits stored): decode equal to the
/// CPU decoder and products against float64 on 67 x 1088 (segments of 256, the last of 64 columns; the last row
/// tile 3 rows) at P = 10, 11 and 12, one tile of 20 rows, segments of 1024 with groups of 64, a row tile of zero
/// scales; 1 to 33 vectors. Then 970 x 2144 in segments of 32 columns: 2077 tiles, which rans_decode takes 16 a
/// workgroup (`kernels::SPLIT_WIDE_TILES`; the last workgroup 13), where the device allows it.
fn split_streams(ctx: &GpuContext) {
    split_streams_of(ctx, SplitForm::Low2);
    split_streams_of(ctx, SplitForm::Low3);
}

fn split_streams_of(ctx: &GpuContext, form: SplitForm) {
    let split = |q: &QuantizedMatrix, segment: usize, precision: u32| {
        let t = EcTensor::encode(q, EncodeOptions { segment, precision, split: Some(form), min_tiles: 0 })
            .expect("encode split");
        assert!(t.split() == Some(form) && t.layout().bits() == form.coded_bits() && t.bits() == 4, "not split");
        t
    };
    let q = random_matrix(67, 1088, 4, 32, 400);
    for precision in [10, ecq::rans::DEFAULT_PRECISION, ecq::rans::MAX_PRECISION] {
        let t = split(&q, 256, precision);
        let what = format!("67x1088 split {form:?} P={precision}");
        check_decode(ctx, &t, &what);
        check_products(ctx, &q, &t, &[1, 3, 8, 33], &what);
    }
    let q = random_matrix(20, 128, 4, 32, 401);
    let t = split(&q, 128, ecq::rans::DEFAULT_PRECISION);
    check_decode(ctx, &t, &format!("single tile split {form:?}"));
    check_products(ctx, &q, &t, &[1, 4], &format!("single tile split {form:?}"));
    let mut q = random_matrix(37, 2048, 4, 64, 402);
    // Row tile 1 (rows 32..37) with zero scales: the products fold b / s into the symbols only where it is finite.
    let groups = 2048 / 64;
    q.scales[32 * groups..].fill(0.0);
    let t = split(&q, 1024, ecq::rans::DEFAULT_PRECISION);
    check_decode(ctx, &t, &format!("37x2048 split {form:?} S=1024"));
    check_products(ctx, &q, &t, &[1, 2, 5, 8], &format!("37x2048 split {form:?} S=1024"));
    let q = random_matrix(970, 2144, 4, 32, 403);
    let t = split(&q, 32, ecq::rans::DEFAULT_PRECISION);
    assert!(t.layout().tiles() >= kernels::SPLIT_WIDE_TILES && t.layout().tiles() % 16 != 0);
    let spec = kernels::rans_decode_spec(ctx, &GpuStream::upload(ctx, &t).unwrap());
    if ctx.limits().max_compute_invocations_per_workgroup >= kernels::SPLIT_TILE_WORKGROUP {
        assert_eq!(spec.workgroup, kernels::SPLIT_TILE_WORKGROUP, "{spec:?}");
    }
    check_decode(ctx, &t, &format!("970x2144 split {form:?} S=32"));
}

/// Groups whose scale is 0, -0 or so small that bias / scale overflows f32, with nonzero symbols and biases (the
/// weights are then the bias alone, or nearly): fused products with several vectors fold b / s into the symbols
/// and must take such groups another way. 2-, 3- and 4-bit, 1 to 8 vectors.
fn groups_with_zero_or_tiny_scales(ctx: &GpuContext) {
    for bits in [2, 3, 4] {
        let mut q = random_matrix(67, 1088, bits, 32, 340 + bits as u64);
        q.scale_dtype = ScaleDtype::F32;
        for (g, s) in q.scales.iter_mut().enumerate() {
            match g % 5 {
                0 => *s = 0.0,
                1 => *s = -0.0,
                2 => *s = 1e-38,
                _ => {}
            }
        }
        let t = encode(&q, 256);
        check_products(ctx, &q, &t, &[1, 2, 3, 4, 8], &format!("67x1088 {bits}-bit, zero and tiny scales"));
    }
}

/// `EcMatmul::encode` records into a caller's encoder and buffers; nothing unwritten survives the NaN poison.
fn encode_into_caller_buffers(ctx: &GpuContext) {
    let q = random_matrix(67, 1088, 4, 32, 400);
    let t = encode(&q, 256);
    for strategy in [Strategy::Fused, Strategy::Cached] {
        let mm = EcMatmul::new(ctx, &t, strategy).unwrap();
        for m in [1, 3, 33] {
            let x = random_vectors(m * q.cols, 500 + m as u64);
            let (want, mag) = reference(&q, &x, m);
            let (xb, yb) = (storage(ctx, x.len()), storage(ctx, m * q.rows));
            ctx.queue().write_buffer(&xb, 0, bytemuck::cast_slice(&x));
            ctx.queue().write_buffer(&yb, 0, bytemuck::cast_slice(&vec![f32::NAN; m * q.rows]));
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            mm.encode(&mut encoder, &xb, &yb, m).unwrap();
            let y = read_buffer(ctx, encoder, &yb, m * q.rows);
            assert_close(&format!("encode {strategy:?} m={m}"), &y, &want, &mag, GEMV_REL_TOL);
        }
        // Buffers too small for m vectors are refused, not read past.
        let small = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        assert!(matches!(mm.encode(&mut encoder, &small, &small, 1), Err(Error::ShapeMismatch { .. })));
    }
}

/// `EcMatmul::encode_pass`: two products in one compute pass, the second reading what the first wrote (so a
/// missing barrier would feed it the NaN poison), and with 33 vectors the fused path's own two dispatches.
fn products_chained_in_one_pass(ctx: &GpuContext) {
    let qa = random_matrix(64, 1088, 4, 32, 410);
    let qb = random_matrix(40, 64, 4, 32, 420);
    let (ta, tb) = (encode(&qa, 256), encode(&qb, 64));
    for strategy in [Strategy::Fused, Strategy::Cached] {
        let (a, b) = (EcMatmul::new(ctx, &ta, strategy).unwrap(), EcMatmul::new(ctx, &tb, strategy).unwrap());
        for m in [1, 33] {
            let x = random_vectors(m * qa.cols, 600 + m as u64);
            let (xb, y1, y2) = (storage(ctx, m * qa.cols), storage(ctx, m * qa.rows), storage(ctx, m * qb.rows));
            ctx.queue().write_buffer(&xb, 0, bytemuck::cast_slice(&x));
            for y in [&y1, &y2] {
                ctx.queue().write_buffer(y, 0, bytemuck::cast_slice(&vec![f32::NAN; (y.size() / 4) as usize]));
            }
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                a.encode_pass(&mut pass, &xb, &y1, m).unwrap();
                b.encode_pass(&mut pass, &y1, &y2, m).unwrap();
            }
            let got2 = read_buffer(ctx, encoder, &y2, m * qb.rows);
            let got1 = read_buffer(ctx, ctx.device().create_command_encoder(&Default::default()), &y1, m * qa.rows);
            let what = format!("one pass {strategy:?} m={m}");
            let (want1, mag1) = reference(&qa, &x, m);
            assert_close(&format!("{what}, first"), &got1, &want1, &mag1, GEMV_REL_TOL);
            // The second product's reference takes the first's output as the device computed it.
            let (want2, mag2) = reference(&qb, &got1, m);
            assert_close(&format!("{what}, second"), &got2, &want2, &mag2, GEMV_REL_TOL);
        }
    }
}

/// A storage buffer of `len` f32 that can be written and read back.
fn storage(ctx: &GpuContext, len: usize) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: len as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// Submits `encoder` after copying `len` f32 of `buffer` into a mappable buffer, and returns them.
fn read_buffer(ctx: &GpuContext, mut encoder: wgpu::CommandEncoder, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: len as u64 * 4,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, len as u64 * 4);
    ctx.queue().submit([encoder.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    ctx.device().poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).unwrap();
    let data = staging.get_mapped_range(..).unwrap();
    bytemuck::pod_collect_to_vec(&data[..])
}

/// f16 inputs give the product of the same vectors widened to f32.
fn f16_inputs(ctx: &GpuContext) {
    let q = random_matrix(67, 1088, 4, 32, 600);
    let t = encode(&q, 256);
    let x16: Vec<f16> = random_vectors(3 * q.cols, 601).iter().map(|&v| f16::from_f32(v)).collect();
    let x: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    let (want, mag) = reference(&q, &x, 3);
    for strategy in [Strategy::Fused, Strategy::Cached] {
        let mm = EcMatmul::new(ctx, &t, strategy).unwrap();
        let mut y = vec![f32::NAN; 3 * q.rows];
        mm.matmul_f16(&x16, 3, &mut y).unwrap();
        assert_close(&format!("f16 {strategy:?}"), &y, &want, &mag, GEMV_REL_TOL);
        let mut y1 = vec![f32::NAN; q.rows];
        mm.matvec_f16(&x16[..q.cols], &mut y1).unwrap();
        assert_close(&format!("f16 matvec {strategy:?}"), &y1, &want[..q.rows], &mag[..q.rows], GEMV_REL_TOL);
    }
}

/// The dense f32 and f16 baselines against the float64 product of the same weights, on rows that start on 16
/// bytes (the vector loads, with and without the unrolled loop) and rows that do not (the scalar fallback).
fn dense_baselines(ctx: &GpuContext) {
    for (rows, cols) in [(67, 1000), (37, 4104), (29, 1002)] {
        let w = random_vectors(rows * cols, 700 + cols as u64);
        for (dtype, rel) in [(DenseDtype::F32, GEMV_REL_TOL), (DenseDtype::F16, DENSE_F16_REL_TOL)] {
            let dense = DenseGemv::new(ctx, &w, rows, cols, dtype).unwrap();
            for m in [1, 3, 33] {
                let x = random_vectors(m * cols, 701 + m as u64);
                let mut want = vec![0f64; m * rows];
                let mut mag = vec![0f64; m * rows];
                for v in 0..m {
                    for r in 0..rows {
                        for c in 0..cols {
                            let p = w[r * cols + c] as f64 * x[v * cols + c] as f64;
                            want[v * rows + r] += p;
                            mag[v * rows + r] += p.abs();
                        }
                    }
                }
                let mut y = vec![f32::NAN; m * rows];
                dense.matmul(&x, m, &mut y).unwrap();
                assert_close(&format!("dense {dtype:?} {rows}x{cols} m={m}"), &y, &want, &mag, rel);
            }
        }
    }
}

/// A stream with one flipped word fails the GPU tile check at load, as it fails the CPU decoder.
fn corrupt_stream_is_refused(ctx: &GpuContext) {
    let q = random_matrix(67, 1088, 4, 32, 800);
    let t = encode(&q, 256);
    let mut stream = t.stream().clone();
    let tile = 5;
    let w = stream.tile_offsets[tile] as usize + 3;
    stream.words[w] ^= 0x5a5a;
    let bad = EcTensor::from_parts(
        *t.layout(),
        t.group_size(),
        t.table().clone(),
        stream,
        t.scales().to_vec(),
        t.biases().to_vec(),
        t.scale_dtype(),
        t.low().map(<[u32]>::to_vec),
    )
    .unwrap();
    assert!(bad.decode_symbols().is_err(), "the CPU decoder accepts the corrupt stream");
    match EcMatmul::new(ctx, &bad, Strategy::Cached) {
        Err(Error::CorruptStream { tile: found, .. }) => assert_eq!(found, tile, "lowest failing tile"),
        Err(e) => panic!("expected CorruptStream, got {e}"),
        Ok(_) => panic!("a corrupt stream was accepted"),
    }
    // The MSL fused kernel (Metal) checks every tile once at load.
    if ctx.fused_uses_msl() {
        match EcMatmul::new(ctx, &bad, Strategy::Fused) {
            Err(Error::CorruptStream { tile: found, .. }) => assert_eq!(found, tile, "lowest failing tile (MSL)"),
            Err(e) => panic!("expected CorruptStream from the MSL fused kernel, got {e}"),
            Ok(_) => panic!("the MSL fused kernel accepted a corrupt stream"),
        }
    }
}

/// Workgroup memory above the device limit is refused with a clear error, not left to the driver: a device
/// limited to 8 KiB cannot hold a 2^12-entry decode table (16 KiB) on any kernel path.
#[test]
fn workgroup_memory_above_limit_is_refused() {
    let Some(ctx) = limited_context(|l| l.max_compute_workgroup_storage_size = 8192) else { return };
    let q = random_matrix(67, 1088, 4, 32, 900);
    let t = encode_at(&q, 256, ecq::rans::MAX_PRECISION);
    match EcMatmul::new(&ctx, &t, Strategy::Cached) {
        Err(Error::Gpu(msg)) => assert!(msg.contains("workgroup memory"), "{msg}"),
        Err(e) => panic!("expected Error::Gpu, got {e}"),
        Ok(_) => panic!("a decode table above the workgroup memory limit was accepted"),
    }
    let fused = EcMatmul::new(&ctx, &t, Strategy::Fused).unwrap();
    let mut y = vec![0f32; q.rows];
    match fused.matvec(&vec![0f32; q.cols], &mut y) {
        Err(Error::Gpu(msg)) => assert!(msg.contains("workgroup memory"), "{msg}"),
        other => panic!("expected Error::Gpu, got {other:?}"),
    }
}

/// A kernel source that declares more workgroup memory than the device allows is refused before wgpu (which
/// does not check it) hands it to the driver: an edited decode kernel with a 64 KiB array added, on a device
/// limited to 32 KiB.
#[test]
fn edited_kernel_above_workgroup_limit_is_refused() {
    let Some(ctx) = limited_context(|l| l.max_compute_workgroup_storage_size = 32 * 1024) else { return };
    let spec = Spec::new(ctx.lane_mode(), 4, 11, 1, 256);
    let own = kernels::edited_pipeline(&ctx, Kernel::RansDecode, spec, |s| s);
    assert!(own.is_ok(), "the kernel as it is: {:?}", own.err());
    let grown =
        kernels::edited_pipeline(&ctx, Kernel::RansDecode, spec, |s| s + "var<workgroup> extra: array<u32, 16384>;\n");
    match grown {
        Err(Error::Gpu(msg)) => assert!(msg.contains("workgroup memory"), "{msg}"),
        Err(e) => panic!("expected Error::Gpu, got {e}"),
        Ok(_) => panic!("a kernel above the workgroup memory limit was built"),
    }
}

/// Arrays above the storage binding limit are refused with a clear error.
#[test]
fn tensor_above_binding_limit_is_refused() {
    let Some(ctx) = limited_context(|l| l.max_storage_buffer_binding_size = 64 * 1024) else { return };
    // 256 x 4096 8-bit symbols: 1 MiB packed, and the stream well above 64 KiB.
    let q = random_matrix(256, 4096, 8, 32, 1000);
    let t = encode(&q, 512);
    for strategy in [Strategy::Fused, Strategy::Cached] {
        match EcMatmul::new(&ctx, &t, strategy) {
            Err(Error::Gpu(msg)) => assert!(msg.contains("storage binding limit"), "{msg}"),
            Err(e) => panic!("expected Error::Gpu, got {e}"),
            Ok(_) => panic!("{strategy:?} accepted arrays above the binding limit"),
        }
    }
}

/// On a device that allows only 256 invocations a workgroup, ec_gemv takes rows of more than 8 segments in rounds,
/// the segments spread evenly over the slabs (9 segments: 5 slabs, 2 rounds, the second one slab short; 28: 7 slabs,
/// 4 rounds), and its products still match float64, on 4-bit and split streams.
#[test]
fn fused_products_in_rounds_under_a_small_workgroup_limit() {
    let Some(ctx) = limited_context(|l| l.max_compute_invocations_per_workgroup = 256) else { return };
    for (cols, slabs) in [(4160, 5), (14336, 7)] {
        let q = random_matrix(37, cols, 4, 64, 1100 + cols as u64);
        for split in SPLITS {
            let t = encode_as(&q, 512, split);
            assert_eq!(kernels::gemv_slabs(t.layout().segments(), 256), slabs, "{cols} columns");
            check_products(&ctx, &q, &t, &[1, 4], &format!("37x{cols} split {split:?}, 256 invocations"));
        }
    }
}

/// A context on a new device of the default adapter with its limits changed by `limit`.
fn limited_context(limit: impl FnOnce(&mut wgpu::Limits)) -> Option<GpuContext> {
    let ctx = device()?;
    let backends =
        wgpu::Backends::from_env().unwrap_or(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12);
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let name = ctx.adapter_info().name.clone();
    let adapter = pollster::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .find(|a| a.get_info().name == name)
        .expect("the adapter of the shared context");
    let mut limits = adapter.limits();
    limit(&mut limits);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("limited"),
        required_features: adapter.features() & wgpu::Features::SUBGROUP,
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with lower limits");
    Some(GpuContext::from_device(device, queue))
}

/// The fused products of `m` random vectors by `t` (quantized from `q`) on contexts `a` and `b`, the outputs
/// poisoned first: each within tolerance of the float64 reference, and the two equal bit for bit.
fn fused_equal_on_both(a: &GpuContext, b: &GpuContext, q: &QuantizedMatrix, t: &EcTensor, m: usize, what: &str) {
    let ys = [a, b].map(|c| fused_close_to_reference(c, q, t, m, what));
    let first = ys[0].iter().zip(&ys[1]).position(|(p, r)| p.to_bits() != r.to_bits());
    assert!(first.is_none(), "{what}: element {first:?} differs between the two contexts");
}

/// The fused product of `m` vectors (seeded by `m`) by `t` on `c`, checked against the float64 reference within
/// tolerance with the outputs poisoned first.
fn fused_close_to_reference(c: &GpuContext, q: &QuantizedMatrix, t: &EcTensor, m: usize, what: &str) -> Vec<f32> {
    let x = random_vectors(m * q.cols, 1300 + m as u64);
    let (want, mag) = reference(q, &x, m);
    let mm = EcMatmul::new(c, t, Strategy::Fused).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut y = vec![f32::NAN; m * q.rows];
    mm.matmul(&x, m, &mut y).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(what, &y, &want, &mag, GEMV_REL_TOL);
    y
}

/// With the device taken to have many compute units, a fused product shares its vectors out over rows of
/// workgroups (`kernels::vector_groups`: 4 vectors as 2 rows of 2, 6 as 3 of 2, 8 as 4 of 2; 2 and 3 vectors in
/// one row). Its products equal, bit for bit, those of the same context taken to have no known compute units
/// (one row), and the float64 reference within tolerance, on 4-bit and split streams of 67 rows (the last row
/// tile partial), with the outputs poisoned first.
fn fused_vectors_shared_out_over_workgroups(ctx: &GpuContext) {
    let q = random_matrix(67, 1088, 4, 32, 1200);
    let many = ctx.with_compute_units(Some(1024));
    let none = ctx.with_compute_units(None);
    for split in SPLITS {
        let t = encode_as(&q, 256, split);
        let stream = GpuStream::upload(&many, &t).unwrap();
        for (m, groups) in [(2, 1), (3, 1), (4, 2), (6, 3), (8, 4)] {
            assert_eq!(kernels::ec_gemv_spec(&many, &stream, m).1, groups);
            let what =
                format!("67x1088 split {split:?} {:?} m={m}, one row of workgroups and {groups}", ctx.lane_mode());
            fused_equal_on_both(&none, &many, &q, &t, m, &what);
        }
    }
}

/// With the device taken to have 2 compute units and no fast 8-bit dot products (with them, split streams' products of
/// up to 4 vectors take blocks of digits: `fused_split_blocks_as_digits`), fused products over 7 and 8 row tiles (200
/// and 256 rows; 7 an odd count, its last row tile partial) of 6 segments (1472 columns, the last segment 192 wide)
/// take two row tiles a workgroup (`kernels::row_tile_pairs`) at 1 to 4 vectors, and over 8 row tiles of 8 segments
/// (2048 columns) at 1 to 8 vectors on split streams and 1 to 7 on 4-bit streams: their products equal, bit for bit,
/// those of the same context taken to have no known compute units (one row tile a workgroup), and the float64 reference
/// within tolerance, with the outputs poisoned first. More vectors, 6 row tiles (3 a unit, 4 in pairs) and rows of 4
/// segments keep one row tile a workgroup. Up to `kernels::SPREAD_VECTORS` vectors by the 7 row tiles of 1472 columns
/// are dealt out in runs instead (`fused_tasks_dealt_out_in_runs`): their products, on both contexts, come within
/// tolerance of the reference, and are not compared bit for bit (the row tiles across two workgroups add their parts in
/// another order).
fn fused_row_tiles_in_pairs(ctx: &GpuContext) {
    let slow = ctx.with_integer_dot(false);
    let two = slow.with_compute_units(Some(2));
    let none = slow.with_compute_units(None);
    // (rows, columns, most vectors paired on 4-bit and on split streams)
    for (rows, cols, most) in
        [(200, 1472, [4, 4]), (256, 1472, [4, 4]), (256, 2048, [7, 8]), (192, 1472, [0, 0]), (256, 1024, [0, 0])]
    {
        let q = random_matrix(rows, cols, 4, 32, 1500 + (rows + cols) as u64);
        for split in SPLITS {
            let t = encode_as(&q, 256, split);
            let stream = GpuStream::upload(&two, &t).unwrap();
            for m in 1..=8 {
                let what = format!("{rows}x{cols} split {split:?} {:?} m={m}", ctx.lane_mode());
                let (spec, groups) = kernels::ec_gemv_spec(&two, &stream, m);
                if (rows, cols) == (200, 1472) && m <= kernels::SPREAD_VECTORS {
                    assert!(spec.spread && !spec.tile_pairs, "{what}");
                    for c in [&none, &two] {
                        fused_close_to_reference(c, &q, &t, m, &what);
                    }
                    continue;
                }
                assert_eq!((spec.tile_pairs, groups), (m <= most[split.is_some() as usize], 1), "{what}");
                assert!(!kernels::ec_gemv_spec(&none, &stream, m).0.tile_pairs, "{what}");
                fused_equal_on_both(&none, &two, &q, &t, m, &what);
            }
        }
    }
}

/// With the device taken to have a compute unit for every workgroup, a fused product of one vector by a split
/// stream of at most `kernels::STAGED_X_COLS` columns, in workgroups of at least `kernels::STAGE_X_MIN_SLABS` slabs,
/// holds x in workgroup memory (`kernels::stage_x`): on 67 rows (the last row tile partial) by 4096 columns (the
/// most, 8 segments) and by 1600 (the last of 7 segments 64 columns wide), its products equal, bit for bit, those
/// of the same context taken to have no known compute units (x read from global memory), and the float64 reference
/// within tolerance, with the outputs poisoned first. 4160 columns, 5 segments, or fewer units than row tiles (one
/// unit, which the three row tiles' workgroups fill as evenly as runs of tasks would) keep x where it is.
fn fused_split_vector_staged_in_workgroup_memory(ctx: &GpuContext) {
    let none = ctx.with_compute_units(None);
    let cases = [
        (4096, 512, 1024, true),
        (1600, 256, 1024, true),
        (4160, 512, 1024, false),
        (1088, 256, 1024, false),
        (1600, 256, 1, false),
    ];
    for (form, (cols, segment, units, staged)) in
        [SplitForm::Low2, SplitForm::Low3].into_iter().flat_map(|f| cases.map(|c| (f, c)))
    {
        let units = ctx.with_compute_units(Some(units));
        let q = random_matrix(67, cols, 4, 32, 1400 + cols as u64);
        let t = encode_as(&q, segment, Some(form));
        let stream = GpuStream::upload(&units, &t).unwrap();
        let what = format!("67x{cols} split {form:?} {:?} with {:?} units", ctx.lane_mode(), units.compute_units());
        assert_eq!(kernels::ec_gemv_spec(&units, &stream, 1).0.stage_x, staged, "{what}");
        assert!(!kernels::ec_gemv_spec(&none, &stream, 1).0.stage_x, "{what}");
        fused_equal_on_both(&none, &units, &q, &t, 1, &what);
    }
}

/// With the device taken to have fast 8-bit dot products and a compute unit for every workgroup, a fused product of
/// one vector by a split stream whose workgroups hold at least `kernels::DIGITS_MIN_SLABS` slabs stages x as 8-bit
/// digits (`kernels::integer_dot`; not where the device is taken to lack them): on 67 rows (the last row tile partial)
/// by 4000 columns in 25 segments of 160, in both split forms, its products come within tolerance of the float64
/// reference, with the outputs poisoned first, for x uniform in (-1, 1) and for x whose 32-column blocks run from
/// 1e-38 to 1e30 in magnitude (with zero blocks, subnormal values, lone outliers and mixed signs); an infinity or a
/// NaN in x makes every row's product non-finite.
fn fused_split_vector_as_digits(ctx: &GpuContext) {
    let fast = ctx.with_compute_units(Some(1024)).with_integer_dot(true);
    let slow = fast.with_integer_dot(false);
    let q = random_matrix(67, 4000, 4, 32, 1500);
    let wide = wide_range_vectors(4000, 1501);
    for form in [SplitForm::Low2, SplitForm::Low3] {
        let t = encode_as(&q, 160, Some(form));
        let stream = GpuStream::upload(&fast, &t).unwrap();
        let (spec, _) = kernels::ec_gemv_spec(&fast, &stream, 1);
        let what = format!("67x4000 split {form:?} {:?} as digits", ctx.lane_mode());
        assert!(spec.stage_x && spec.digits && spec.slabs() >= kernels::DIGITS_MIN_SLABS, "{what}: {spec:?}");
        assert!(!kernels::ec_gemv_spec(&slow, &stream, 1).0.digits, "{what}");
        fused_close_to_reference(&fast, &q, &t, 1, &what);
        let mm = EcMatmul::new(&fast, &t, Strategy::Fused).unwrap();
        let (want, mag) = reference(&q, &wide, 1);
        let mut y = vec![f32::NAN; q.rows];
        mm.matvec(&wide, &mut y).unwrap();
        assert_close(&format!("{what}, x of wide range"), &y, &want, &mag, GEMV_REL_TOL);
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut x = random_vectors(4000, 1502);
            x[1234] = bad;
            let mut y = vec![0.0; q.rows];
            mm.matvec(&x, &mut y).unwrap();
            assert!(y.iter().all(|v| !v.is_finite()), "{what}, x holding {bad}: {y:?}");
        }
    }
}

/// `len` values whose 32-column blocks run from 1e-38 to 1e30 in magnitude: zero blocks, subnormal values, lone
/// outliers among small values, mixed signs.
fn wide_range_vectors(len: usize, seed: u64) -> Vec<f32> {
    random_vectors(len, seed)
        .iter()
        .enumerate()
        .map(|(c, &v)| {
            let block = c / 32;
            match block % 7 {
                0 => 0.0,
                1 => v * 1e-38,
                2 if c % 32 == 5 => 1e30,
                2 => v * 1e-3,
                3 => v * 10f32.powi(block as i32 % 61 - 30),
                4 => -v.abs() * 7e4,
                _ => v,
            }
        })
        .collect()
}

/// With the device taken to have fast 8-bit dot products and a few compute units, fused products by split streams deal
/// the row tiles' segments out in blocks, each workgroup staging its part of the row as digits for every vector
/// (`kernels::task_blocks`): 2 to 4 vectors on 390 rows (13 row tiles, the last partial) by 8 segments of 256 columns,
/// the last 160 wide in groups of 32 (1952 columns), 192 wide in groups of 64 (1984) and 128 wide in groups of 128
/// (1920), in 4 workgroups of 7 row tiles by 4 segments, the digits of a group sharing one scale
/// (`kernels::shared_digit_scales`); one vector on 200 rows by 4160 columns (17 segments, the last 64 wide) in 6
/// workgroups of 3 row tiles by 9 segments; so each row tile's two halves meet in the seam words, and the last block
/// has fewer row tiles and its second part fewer segments. Rows that two parts cannot hold, on a device whose workgroup
/// memory holds no wider parts (`kernels::widest_block_cols`: 32 KiB at P = 11 hold 2048 columns of two vectors and
/// 1024 of three or four), take more parts, meeting in a tree of seam words (`kernels::seam_tree`): 2 vectors on 390
/// rows by 5440 columns (22 segments, the last 64 wide, groups of 32) in six parts of 4 segments (the last 2), 12
/// workgroups of 7 row tiles; 3 and 4 vectors on 390 rows by 3968 columns (16 segments, the last 128 wide, groups of
/// 64) in four parts of 4 segments, 8 workgroups of 7 row tiles (where 2048 columns fit, in halves of 8 segments, 8
/// workgroups of 4 row tiles; where 4096 fit for 2 vectors, 5440 columns take no blocks). Where slabs past the last
/// row tile skip their steps (full subgroups of 32 lanes or more) and 2048 columns fit, 3 and 4 vectors on 390 rows
/// by 6144 columns (24 segments, groups of 64) on 10 units take three parts of 8 segments in 12 workgroups of 4 row
/// tiles, the last row of blocks one row tile. In both split forms, with the
/// outputs poisoned first, the
/// products come within tolerance of the float64 reference for uniform x and for x of wide range in every vector; a
/// second product of the same x equals the first bit for bit (the seams are left empty); an infinity or a NaN in the
/// first vector makes every row of its product non-finite and leaves the others' finite. Without the fast dot
/// products, or with no count of compute units, the products take no blocks; nor do several vectors where the groups
/// are of 256 columns (390 rows by 2048 columns), whose products come within tolerance all the same. Where a group's
/// integer sums come nearest their 32-bit bound (two vectors, almost every weight 15, every x 1.99 in one vector and
/// -1.99 in the other, groups of 64 and of 128), the products come within tolerance too.
fn fused_split_blocks_as_digits(ctx: &GpuContext) {
    // The blocks' parts, segments a part and row tiles a block, by the most columns the device stages a vector (0:
    // any) and whether they need slabs past the last row tile to skip their steps (`kernels::tail_skips`); where
    // none is listed, the products are checked but not the blocks.
    let any: &[(u32, bool, (usize, usize, usize))] = &[(0, false, (2, 4, 7))];
    let cases = [
        (390, 1952, 32, 4, 2..=4, any),
        (390, 1984, 64, 4, 2..=4, any),
        (390, 1920, 128, 4, 2..=4, any),
        (200, 4160, 32, 6, 1..=1, &[(0, false, (2, 9, 3))]),
        (390, 5440, 32, 12, 2..=2, &[(2048, false, (6, 4, 7))]),
        (390, 3968, 64, 8, 3..=4, &[(1024, false, (4, 4, 7)), (2048, false, (2, 8, 4))]),
        (390, 6144, 64, 10, 3..=4, &[(2048, true, (3, 8, 4))]),
    ];
    for (rows, cols, group, units, ms, shapes) in cases {
        let fast = ctx.with_compute_units(Some(units)).with_integer_dot(true);
        let q = random_matrix(rows, cols, 4, group, 1800 + rows as u64);
        for form in [SplitForm::Low2, SplitForm::Low3] {
            let t = encode_as(&q, 256, Some(form));
            let stream = GpuStream::upload(&fast, &t).unwrap();
            let mm = EcMatmul::new(&fast, &t, Strategy::Fused).unwrap();
            for m in ms.clone() {
                let what =
                    format!("{rows}x{cols} in groups of {group} split {form:?} {:?} m={m} in blocks", ctx.lane_mode());
                let (spec, groups) = kernels::ec_gemv_spec(&fast, &stream, m);
                let widest = kernels::widest_block_cols(&fast, &stream, m);
                let skips = kernels::tail_skips(fast.lane_mode());
                let listed = |&&(w, tail, _): &&(u32, bool, _)| (w == 0 || w == widest) && (skips || !tail);
                let shape = shapes.iter().find(listed).map(|&(_, _, shape)| shape);
                let invocations = ctx.limits().max_compute_invocations_per_workgroup;
                if let Some((parts, per, tiles)) =
                    shape.filter(|&(_, per, tiles)| invocations >= 32 * (per * tiles) as u32)
                {
                    let device = kernels::BlockDevice {
                        compute_units: Some(units),
                        max_invocations: u32::MAX,
                        widest,
                        fast: true,
                        tail_skips: skips,
                    };
                    let b = kernels::task_blocks(t.layout(), m, true, &device).unwrap();
                    assert_eq!((b.parts, b.per, b.tiles, groups), (parts, per, tiles, 1), "{what}");
                    assert!(spec.digits && spec.block_cols == b.cols && spec.slabs() as usize == per * tiles, "{what}");
                    assert_eq!(spec.seam_tree, parts > 2, "{what}");
                    // The seam words hold every meeting of the parts: 4 vectors' rows, parts - 1 a row.
                    let meetings = 16 * 32 * t.layout().row_tiles() * (parts - 1).max(1);
                    assert!(kernels::seam_bytes(&fast, &stream) as usize >= meetings, "{what}");
                }
                for slow in [fast.with_integer_dot(false), fast.with_compute_units(None)] {
                    assert_eq!(kernels::ec_gemv_spec(&slow, &stream, m).0.block_cols, 0, "{what}");
                }
                let uniform = random_vectors(m * cols, 1801);
                let wide: Vec<f32> = (0..m).flat_map(|v| wide_range_vectors(cols, 1802 + v as u64)).collect();
                for (kind, x) in [("uniform x", &uniform), ("x of wide range", &wide)] {
                    let (want, mag) = reference(&q, x, m);
                    let mut ys = Vec::new();
                    for _ in 0..2 {
                        let mut y = vec![f32::NAN; m * rows];
                        mm.matmul(x, m, &mut y).unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_close(&format!("{what}, {kind}"), &y, &want, &mag, GEMV_REL_TOL);
                        ys.push(y);
                    }
                    let first = ys[0].iter().zip(&ys[1]).position(|(a, b)| a.to_bits() != b.to_bits());
                    assert!(first.is_none(), "{what}, {kind}: element {first:?} differs between two products");
                }
                for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                    let mut x = uniform.clone();
                    x[cols - 7] = bad;
                    let mut y = vec![0.0; m * rows];
                    mm.matmul(&x, m, &mut y).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(y[..rows].iter().all(|v| !v.is_finite()), "{what}, x holding {bad}: {y:?}");
                    assert!(y[rows..].iter().all(|v| v.is_finite()), "{what}, x holding {bad}: {y:?}");
                }
            }
        }
    }
    let fast = ctx.with_compute_units(Some(4)).with_integer_dot(true);
    // The groups' sums nearest the 32-bit bound: almost every weight 15, and x 1.99 in one vector, -1.99 in the other.
    for (cols, group) in [(1984, 64), (1920, 128)] {
        let mut q = random_matrix(390, cols, 4, group, 1804);
        q.symbols.iter_mut().filter(|s| **s >= 2).for_each(|s| *s = 15);
        let t = encode_as(&q, 256, Some(SplitForm::Low3));
        let what = format!("390x{cols} in groups of {group}, weights of 15, {:?}", ctx.lane_mode());
        let stream = GpuStream::upload(&fast, &t).unwrap();
        let invocations = ctx.limits().max_compute_invocations_per_workgroup;
        assert_eq!(kernels::ec_gemv_spec(&fast, &stream, 2).0.block_cols > 0, invocations >= 32 * 28, "{what}");
        let x: Vec<f32> = (0..2 * cols).map(|i| if i < cols { 1.99 } else { -1.99 }).collect();
        let (want, mag) = reference(&q, &x, 2);
        let mut y = vec![f32::NAN; 2 * 390];
        EcMatmul::new(&fast, &t, Strategy::Fused).unwrap().matmul(&x, 2, &mut y).unwrap();
        assert_close(&what, &y, &want, &mag, GEMV_REL_TOL);
    }
    let q = random_matrix(390, 2048, 4, 256, 1803);
    for form in [SplitForm::Low2, SplitForm::Low3] {
        let t = encode_as(&q, 256, Some(form));
        let stream = GpuStream::upload(&fast, &t).unwrap();
        for m in 2..=4 {
            let what = format!("390x2048 in groups of 256 split {form:?} {:?} m={m}", ctx.lane_mode());
            assert_eq!(kernels::ec_gemv_spec(&fast, &stream, m).0.block_cols, 0, "{what}");
            fused_close_to_reference(&fast, &q, &t, m, &what);
        }
    }
}

/// With the device taken to have 3 compute units and no fast 8-bit dot products (with them, split streams' products of
/// up to 4 vectors take blocks of digits: `fused_split_blocks_as_digits`), fused products load each loop trip's x
/// before its steps
/// (`kernels::early_x`) where the vectors take one row of workgroups: of 4 vectors by 4-bit streams that are not
/// split, on 67 rows (3 row tiles, the last partial) by 4160 columns in 17 segments (the last 64 columns wide); of 2
/// to 4 vectors by split streams of 22 segments, on 67 rows by 5440 columns (the last segment 64 columns wide),
/// where their slabs do not hold each trip's x (`kernels::slab_x`, which those products take where the workgroup
/// memory allows). Their products equal, bit for bit, those of the same context taken to have no known compute
/// units, and the float64 reference within tolerance, with the outputs poisoned first. Those that keep the loads
/// after the steps: 8 vectors on 67 rows (one row of 8) and on 20 rows (2 rows of 4 vectors) not split; 1 and 5
/// vectors split, and split streams of 21 segments (5376 columns).
fn fused_trip_x_loaded_before_its_steps(ctx: &GpuContext) {
    let none = ctx.with_compute_units(None).with_integer_dot(false);
    let units = ctx.with_compute_units(Some(3)).with_integer_dot(false);
    let plain_cases = [(67, 4160, None, 4, 1, true), (20, 4160, None, 8, 2, false), (67, 4160, None, 8, 1, false)];
    let low2 = Some(SplitForm::Low2);
    let split_cases = [2, 3, 4, 1, 5].map(|m| (67, 5440, low2, m, 1, (2..=4).contains(&m)));
    let narrow_split = (67, 5376, low2, 4, 1, false);
    let split3_cases = [2, 4, 1].map(|m| (67, 5440, Some(SplitForm::Low3), m, 1, m != 1));
    let cases = plain_cases.into_iter().chain(split_cases).chain([narrow_split]).chain(split3_cases);
    for (rows, cols, split, m, groups, early) in cases {
        let q = random_matrix(rows, cols, 4, 32, 1500 + rows as u64);
        let t = encode_as(&q, 256, split);
        let stream = GpuStream::upload(&units, &t).unwrap();
        let what = format!("{rows}x{cols} split={split:?} {:?} m={m}", ctx.lane_mode());
        let (spec, g) = kernels::ec_gemv_spec(&units, &stream, m);
        if ctx.limits().max_compute_invocations_per_workgroup >= t.layout().segments() as u32 * 32 {
            assert_eq!((spec.early_x, g), (early && !spec.slab_x, groups), "{what}");
        }
        assert!(!kernels::ec_gemv_spec(&none, &stream, m).0.early_x, "{what}");
        fused_equal_on_both(&none, &units, &q, &t, m, &what);
    }
}

/// With the device taken to have 2 or 3 compute units and no fast 8-bit dot products (with them, split streams'
/// products take blocks of digits: `fused_split_blocks_as_digits`), fused products of 1, 3 and 4 vectors deal the row
/// tiles' segments out over the workgroups in runs (`kernels::spread_slabs`) where whole row tiles would leave one unit
/// more slabs: 200 rows (7 row tiles, the last partial) by 1472 columns (6 segments, the last 192 wide) in 2 workgroups
/// of 21 slabs and in 3 of 14, and 224 rows by 2048 columns (4 segments) in 3 workgroups of 10, so that row tiles lie
/// across two workgroups and meet in the seam words (a row of them for each vector). On streams not split and split in
/// both forms, products with two sets of vectors in turn each come within tolerance of the float64 reference, with the
/// outputs poisoned first (the second finds the seams empty again), and a third, of the first set, equals the first bit
/// for bit; so does a product of one vector recorded with weights bound on a context with no compute units known
/// (`kernels::ec_gemv_weights` holds the seam words whatever the context). Five vectors keep whole row tiles.
fn fused_tasks_dealt_out_in_runs(ctx: &GpuContext) {
    for (rows, cols, segment, units, slabs) in
        [(200, 1472, 256, 2, 21), (200, 1472, 256, 3, 14), (224, 2048, 512, 3, 10)]
    {
        let dealt = ctx.with_integer_dot(false).with_compute_units(Some(units));
        let q = random_matrix(rows, cols, 4, 32, 1600 + (rows + cols) as u64 + units as u64);
        for split in SPLITS {
            let t = encode_as(&q, segment, split);
            let stream = GpuStream::upload(&dealt, &t).unwrap();
            let what = format!("{rows}x{cols} split {split:?} {:?} with {units} units", ctx.lane_mode());
            let mm = EcMatmul::new(&dealt, &t, Strategy::Fused).unwrap_or_else(|e| panic!("{what}: {e}"));
            for m in [1, 3, 4] {
                let (spec, groups) = kernels::ec_gemv_spec(&dealt, &stream, m);
                if ctx.limits().max_compute_invocations_per_workgroup >= 32 * slabs {
                    assert_eq!((spec.spread, spec.slabs(), groups), (true, slabs, 1), "{what} m={m}");
                }
                let mut ys = Vec::new();
                for seed in [1700, 1701, 1700] {
                    let x = random_vectors(m * cols, seed);
                    let (want, mag) = reference(&q, &x, m);
                    let mut y = vec![f32::NAN; m * rows];
                    mm.matmul(&x, m, &mut y).unwrap_or_else(|e| panic!("{what} m={m}: {e}"));
                    assert_close(&format!("{what} m={m}, x seed {seed}"), &y, &want, &mag, GEMV_REL_TOL);
                    ys.push(y);
                }
                let first = ys[0].iter().zip(&ys[2]).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(first.is_none(), "{what} m={m}: element {first:?} differs between two products of the same x");
            }
            assert!(!kernels::ec_gemv_spec(&dealt, &stream, 5).0.spread, "{what}");
            let plain = ctx.with_compute_units(None);
            let scales = kernels::GpuScales::upload_tiles(&plain, &t).unwrap();
            let weights = kernels::ec_gemv_weights(&plain, &stream, &scales).unwrap();
            let x = random_vectors(cols, 1700);
            let mut first_product = vec![f32::NAN; rows];
            mm.matmul(&x, 1, &mut first_product).unwrap_or_else(|e| panic!("{what}: {e}"));
            let y = ec_gemv_recorded(&dealt, &x, rows, |pass, io| {
                kernels::ec_gemv(&dealt, pass, &stream, &weights, io, 1).unwrap();
            });
            let first = first_product.iter().zip(&y).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(first.is_none(), "{what}: element {first:?} differs with weights bound on another context");
        }
    }
}

/// The `len` outputs of what `record` records into one compute pass with ec_gemv's group 1 (`x`, and y poisoned with
/// NaN first) at hand.
fn ec_gemv_recorded(
    ctx: &GpuContext,
    x: &[f32],
    len: usize,
    record: impl FnOnce(&mut wgpu::ComputePass<'_>, &wgpu::BindGroup),
) -> Vec<f32> {
    let (xb, yb) = (storage(ctx, x.len()), storage(ctx, len));
    ctx.queue().write_buffer(&xb, 0, bytemuck::cast_slice(x));
    ctx.queue().write_buffer(&yb, 0, bytemuck::cast_slice(&vec![f32::NAN; len]));
    let io = kernels::io_bind_group(ctx, Kernel::EcGemv, &xb, &yb, None, None);
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        record(&mut pass, &io);
    }
    read_buffer(ctx, encoder, &yb, len)
}

/// Fused products by 4-bit streams not split and split in both forms, of 1 to 8 vectors, on 67 rows (the last row
/// tile partial) by 1472 columns (6 segments, the last 192 wide) and by 4160 (17 segments, the last 64 wide): where x
/// is read in 16-byte pieces (split streams, and several vectors), the workgroup memory allows and the slab's lanes
/// can wait for each other, each slab holds its loop trip's x in workgroup memory (`kernels::slab_x`; not where one
/// vector is staged whole), and the products equal, bit for bit, those of the same specialization with x read from
/// global memory, and the float64 reference within tolerance, with the outputs poisoned first.
fn fused_trip_x_held_by_its_slab(ctx: &GpuContext) {
    let limit = u64::from(ctx.limits().max_compute_workgroup_storage_size);
    let barrier = ctx.features().contains(wgpu::Features::SUBGROUP_BARRIER);
    let forms = [None, Some(SplitForm::Low2), Some(SplitForm::Low3)];
    let mut held = 0;
    for (cols, form) in [1472, 4160].into_iter().flat_map(|c| forms.map(move |f| (c, f))) {
        let q = random_matrix(67, cols, 4, 32, 1800 + cols as u64);
        let t = encode_as(&q, 256, form);
        let stream = GpuStream::upload(ctx, &t).unwrap();
        let scales = kernels::GpuScales::upload_tiles(ctx, &t).unwrap();
        let weights = kernels::ec_gemv_weights(ctx, &stream, &scales).unwrap();
        for m in 1..=8 {
            let what = format!("67x{cols} split {form:?} {:?} m={m}", ctx.lane_mode());
            let (spec, groups) = kernels::ec_gemv_spec(ctx, &stream, m);
            let fits = kernels::workgroup_bytes(Kernel::EcGemv, &Spec { slab_x: true, ..spec }) <= limit;
            assert_eq!(spec.slab_x, fits && kernels::slab_x(&spec, barrier), "{what}");
            if !spec.slab_x {
                continue;
            }
            held += 1;
            let x = random_vectors(m * cols, 1900 + m as u64);
            let (want, mag) = reference(&q, &x, m);
            let ys = [spec, Spec { slab_x: false, ..spec }].map(|s| {
                let pipeline = kernels::edited_pipeline(ctx, Kernel::EcGemv, s, |src| src).unwrap();
                ec_gemv_recorded(ctx, &x, m * 67, |pass, io| {
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, &weights, &[]);
                    pass.set_bind_group(1, io, &[]);
                    let n = kernels::ec_gemv_workgroups(&s, t.layout()) as u32;
                    pass.dispatch_workgroups(n, groups as u32, 1);
                })
            });
            assert_close(&what, &ys[0], &want, &mag, GEMV_REL_TOL);
            let first = ys[0].iter().zip(&ys[1]).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(first.is_none(), "{what}: element {first:?} differs with x read from global memory");
        }
    }
    if ctx.lane_mode() != LaneMode::SubgroupWide || barrier {
        assert!(held > 0, "no product held its trip's x on {:?}", ctx.lane_mode());
    }
}

/// Timestamp queries give one positive duration per run for every GPU product.
fn device_times_are_measured(ctx: &GpuContext) {
    if !ctx.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
        eprintln!("\n!!!!!!!! SKIPPING device timing: {} has no timestamp queries\n", ctx.adapter_info().name);
        return;
    }
    let q = random_matrix(67, 1088, 4, 32, 1100);
    let t = encode(&q, 256);
    for strategy in [Strategy::Fused, Strategy::Cached] {
        let mm = EcMatmul::new(ctx, &t, strategy).unwrap();
        for m in [1, 33] {
            let times = mm.device_times(m, 3).unwrap();
            assert_eq!(times.len(), 3);
            assert!(times.iter().all(|d| !d.is_zero()), "{strategy:?} m={m}: {times:?}");
        }
    }
    let dense = DenseGemv::new(ctx, &random_vectors(67 * 1000, 1101), 67, 1000, DenseDtype::F16).unwrap();
    let times = dense.device_times(1, 2).unwrap();
    assert!(times.len() == 2 && times.iter().all(|d| !d.is_zero()), "dense: {times:?}");
    assert!(EcMatmul::cpu(&t).device_times(1, 1).is_err(), "the CPU path has no device time");
}

/// Shapes the GPU kernels do not take are refused with typed errors; an empty matrix runs and writes nothing.
#[test]
fn unsupported_and_empty_shapes() {
    let Some(ctx) = device() else { return };
    // Groups of 16 columns: the kernels need whole 32-symbol chunks per group.
    let q = random_matrix(40, 96, 4, 16, 1200);
    let t = EcTensor::encode(&q, EncodeOptions { segment: 48, precision: 12, split: None, min_tiles: 0 }).unwrap();
    for strategy in [Strategy::Fused, Strategy::Cached] {
        assert!(
            matches!(EcMatmul::new(&ctx, &t, strategy), Err(Error::InvalidParameter { name: "group_size", .. })),
            "{strategy:?} accepted groups of 16"
        );
    }
    // No rows at all.
    let q = random_matrix(0, 128, 4, 32, 1201);
    let t = encode(&q, 128);
    for strategy in [Strategy::Fused, Strategy::Cached] {
        let mm = EcMatmul::new(&ctx, &t, strategy).unwrap();
        let mut y: Vec<f32> = Vec::new();
        mm.matmul(&random_vectors(2 * 128, 1202), 2, &mut y).unwrap();
    }
    // A buffer without STORAGE usage is refused before wgpu sees it.
    let q = random_matrix(32, 128, 4, 32, 1203);
    let mm = EcMatmul::new(&ctx, &encode(&q, 128), Strategy::Fused).unwrap();
    let plain = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4096,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    assert!(matches!(mm.encode(&mut encoder, &plain, &plain, 1), Err(Error::InvalidParameter { .. })));
}

/// ec_gemv.wgsl reads the scales in tile order, q_gemv row-major: each kernel's bind group refuses the other order,
/// and the tile order places every group of 67x1088 (segments of 256 in groups of 32, the last segment 64 columns;
/// the last row tile 3 rows) at its own index inside the padded buffer, a segment's groups of a row side by side.
/// (Products through the tile order, and of more vectors than one ec_gemv pass takes, which go back to rows through
/// scale_rows.wgsl, are checked by every product test.)
#[test]
fn scales_in_the_order_each_kernel_reads() {
    let q = random_matrix(67, 1088, 4, 32, 1300);
    let t = encode(&q, 256);
    let l = *t.layout();
    let (groups, per_segment) = (1088 / 32, 256 / 32);
    let len = l.row_tiles() * 32 * l.segments() * per_segment;
    let mut seen = vec![false; len];
    for row in 0..67 {
        for group in 0..groups {
            let i = kernels::tile_scale_index(&l, per_segment, row, group);
            assert!(i < len && !seen[i], "row {row} group {group}: index {i}");
            seen[i] = true;
            if group % per_segment != 0 {
                assert_eq!(i, kernels::tile_scale_index(&l, per_segment, row, group - 1) + 1);
            }
        }
    }
    let Some(ctx) = device() else { return };
    let stream = GpuStream::upload(&ctx, &t).unwrap();
    let rows = kernels::GpuScales::upload(&ctx, &t).unwrap();
    let tiles = kernels::GpuScales::upload_tiles(&ctx, &t).unwrap();
    assert_eq!((rows.order(), tiles.order()), (kernels::ScaleOrder::Rows, kernels::ScaleOrder::Tiles));
    assert!(matches!(
        kernels::ec_gemv_weights(&ctx, &stream, &rows),
        Err(Error::InvalidParameter { name: "scales", .. })
    ));
    let packed = kernels::decode_to_packed(&ctx, &stream).unwrap();
    assert!(matches!(
        kernels::q_gemv_weights(&ctx, &packed, &tiles),
        Err(Error::InvalidParameter { name: "scales", .. })
    ));
    assert!(
        kernels::ec_gemv_weights(&ctx, &stream, &tiles).is_ok()
            && kernels::q_gemv_weights(&ctx, &packed, &rows).is_ok()
    );
}
