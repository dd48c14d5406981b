//! The hand-written Metal kernels (msl/) run on the CPU through the emulation harness in tests/msl_emu/ and
//! are compared with ecq's CPU reference: decoded symbols exactly, GEMV outputs within [`GEMV_TOLERANCE`] of a
//! float64 reference.
//!
//! The .metal sources are compiled unchanged as C++17 against a small shim (tests/msl_emu/metal_shim.h) that
//! runs every GPU thread as a fiber and computes `simd_*` collectives over 32 emulated lanes; the shim itself is
//! checked by tests/msl_emu/shim_selftest.cpp (known collective results, rejected divergence). Needs a C++17
//! compiler (`$CXX`, else `g++`, `clang++` or `c++`); without one every test here passes after printing a
//! loud SKIPPED line, unless `ECQ_REQUIRE_MSL_EMU=1`, which turns the skip into a failure (set it in CI).
//! `ECQ_MSL_EMU_WORKERS=n` runs the emulated grid on n OS threads (default 1).
//!
//! Run: `cargo test --test msl_emu`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ecq::format::{EcTensor, EncodeOptions};
use ecq::quant::{pack_mlx, quantize, QuantConfig, QuantizedMatrix, ScaleDtype};
use ecq::rans::{self, EncodedStream, FreqTable, TileLayout, LANES};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Largest accepted `|y - y_ref|` as a fraction of the output's magnitude
/// `sum over groups of |scale| * sum(q |x|) + |bias| * sum(|x|)`. f32 accumulation over these shapes stays
/// near 2e-8 (each test prints its maximum); a wrong symbol moves a result by 1e-4 or more.
const GEMV_TOLERANCE: f64 = 1e-6;

/// Threads per threadgroup the kernels are written for: 8 simdgroups of 32.
const THREADS: u32 = 256;

const SOURCES: [&str; 10] = [
    "msl/ec_rans.h",
    "msl/ec_gemv.metal",
    "msl/rans_decode.metal",
    "tests/msl_emu/metal_shim.h",
    "tests/msl_emu/metal_shim_end.h",
    "tests/msl_emu/metal_stdlib",
    "tests/msl_emu/driver.h",
    "tests/msl_emu/ec_gemv_main.cpp",
    "tests/msl_emu/rans_decode_main.cpp",
    "tests/msl_emu/shim_selftest.cpp",
];
const CXX_FLAGS: [&str; 8] =
    ["-std=c++17", "-O2", "-Wall", "-Wextra", "-pthread", "-U_FORTIFY_SOURCE", "-Itests/msl_emu", "-Imsl"];

// ---------------------------------------------------------------------------------------------------------
// Building and running the emulator

struct Emulator {
    cxx: String,
    ec_gemv: PathBuf,
    rans_decode: PathBuf,
    shim_selftest: PathBuf,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn find_compiler() -> Option<String> {
    let candidates: Vec<String> = match std::env::var("CXX") {
        Ok(cxx) if !cxx.is_empty() => vec![cxx],
        _ => vec!["g++".into(), "clang++".into(), "c++".into()],
    };
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// The compiled drivers, built once per source version into the test target directory; `None` (after a
/// loud message) when no C++ compiler exists and `ECQ_REQUIRE_MSL_EMU` is not `1`.
fn emulator() -> Option<&'static Emulator> {
    static EMULATOR: OnceLock<Option<Emulator>> = OnceLock::new();
    EMULATOR
        .get_or_init(|| {
            let require = std::env::var("ECQ_REQUIRE_MSL_EMU").is_ok_and(|v| v == "1");
            let Some(cxx) = find_compiler() else {
                assert!(!require, "ECQ_REQUIRE_MSL_EMU=1 but no C++ compiler was found (set CXX or install g++)");
                eprintln!(
                    "\n*** SKIPPED: no C++ compiler (CXX, g++, clang++, c++): the MSL emulation tests did not run. \
                     Set ECQ_REQUIRE_MSL_EMU=1 to make this a failure. ***\n"
                );
                return None;
            };
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(cxx.as_bytes());
            for flag in CXX_FLAGS {
                hasher.update(flag.as_bytes());
            }
            for source in SOURCES {
                let text = std::fs::read(root().join(source)).unwrap_or_else(|e| panic!("reading {source}: {e}"));
                hasher.update(&text);
            }
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("msl-emu-{:08x}", hasher.finalize()));
            std::fs::create_dir_all(&dir).unwrap();
            let build = |main: &str, name: &str| {
                let out = dir.join(name);
                if out.exists() {
                    return out;
                }
                let partial = dir.join(format!("{name}.partial"));
                let started = std::time::Instant::now();
                let result = Command::new(&cxx)
                    .current_dir(root())
                    .args(CXX_FLAGS)
                    .arg(main)
                    .arg("-o")
                    .arg(&partial)
                    .output()
                    .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
                assert!(
                    result.status.success(),
                    "compiling {main} with {cxx} failed:\n{}",
                    String::from_utf8_lossy(&result.stderr)
                );
                let warnings = String::from_utf8_lossy(&result.stderr);
                if !warnings.trim().is_empty() {
                    eprintln!("{cxx} warnings for {main}:\n{warnings}");
                }
                std::fs::rename(&partial, &out).unwrap();
                eprintln!("built {} in {:.1} s", out.display(), started.elapsed().as_secs_f64());
                out
            };
            Some(Emulator {
                cxx: cxx.clone(),
                ec_gemv: build("tests/msl_emu/ec_gemv_main.cpp", "ec_gemv_emu"),
                rans_decode: build("tests/msl_emu/rans_decode_main.cpp", "rans_decode_emu"),
                shim_selftest: build("tests/msl_emu/shim_selftest.cpp", "shim_selftest"),
            })
        })
        .as_ref()
}

/// Named arrays in the driver's file format (tests/msl_emu/driver.h).
#[derive(Default)]
struct Arrays(Vec<(String, Vec<u8>)>);

impl Arrays {
    fn put(&mut self, name: &str, bytes: &[u8]) {
        self.0.push((name.to_string(), bytes.to_vec()));
    }
    fn put_u32(&mut self, name: &str, v: &[u32]) {
        self.put(name, bytemuck::cast_slice(v));
    }
    fn put_scalar(&mut self, name: &str, v: u32) {
        self.put_u32(name, &[v]);
    }
    fn encode(&self) -> Vec<u8> {
        let mut out = b"ECQEMU01".to_vec();
        for (name, bytes) in &self.0 {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }
    fn decode(data: &[u8]) -> Self {
        assert_eq!(&data[..8], b"ECQEMU01", "bad magic in emulator output");
        let mut arrays = Arrays::default();
        let mut at = 8;
        while at < data.len() {
            let name_len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let name = String::from_utf8(data[at + 4..at + 4 + name_len].to_vec()).unwrap();
            at += 4 + name_len;
            let len = u64::from_le_bytes(data[at..at + 8].try_into().unwrap()) as usize;
            at += 8;
            arrays.0.push((name, data[at..at + len].to_vec()));
            at += len;
        }
        arrays
    }
    fn get(&self, name: &str) -> &[u8] {
        &self.0.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no array {name} in output")).1
    }
    fn get_u32(&self, name: &str) -> Vec<u32> {
        self.get(name).chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    fn get_f32(&self, name: &str) -> Vec<f32> {
        self.get(name).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

fn workers() -> u32 {
    std::env::var("ECQ_MSL_EMU_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Runs one driver on `input`; panics with the driver's stderr (or the signal) if it fails.
fn run_driver(binary: &Path, input: &Arrays, what: &str) -> Arrays {
    let dir = tempfile::tempdir().unwrap();
    let (input_path, output_path) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::write(&input_path, input.encode()).unwrap();
    let started = std::time::Instant::now();
    let result = Command::new(binary).arg(&input_path).arg(&output_path).output().unwrap();
    assert!(
        result.status.success(),
        "{what}: emulator {} failed ({}):\n{}",
        binary.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("{what}: emulated in {:.2} s", started.elapsed().as_secs_f64());
    Arrays::decode(&std::fs::read(&output_path).unwrap())
}

/// The `host_name` strings of a kernel file after macro expansion (adjacent string literals joined).
fn host_names(emu: &Emulator, kernel_file: &str) -> Vec<String> {
    let result = Command::new(&emu.cxx)
        .current_dir(root())
        .args(["-E", "-P", "-x", "c++", kernel_file])
        .output()
        .unwrap_or_else(|e| panic!("running {} -E: {e}", emu.cxx));
    assert!(result.status.success(), "preprocessing {kernel_file}: {}", String::from_utf8_lossy(&result.stderr));
    let text = String::from_utf8(result.stdout).unwrap();
    let mut names = Vec::new();
    for piece in text.split("host_name(").skip(1) {
        let literals = &piece[..piece.find(')').unwrap()];
        names.push(literals.split('"').skip(1).step_by(2).collect::<String>());
    }
    names
}

#[test]
fn shim_collectives_match_their_definitions() {
    let Some(emu) = emulator() else { return };
    let result = Command::new(&emu.shim_selftest).arg("collectives").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&result.stdout), String::from_utf8_lossy(&result.stderr));
    assert!(result.status.success() && stdout.contains("shim selftest ok"), "{}\n{stdout}{stderr}", result.status);
}

#[test]
fn shim_rejects_divergent_collectives_and_barriers() {
    let Some(emu) = emulator() else { return };
    for mode in ["divergent", "early_return"] {
        let result = Command::new(&emu.shim_selftest).arg(mode).output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(3), "{mode}: {stderr}");
        assert!(stderr.contains("diverged at a collective"), "{mode}: {stderr}");
    }
}

#[test]
fn entry_points_cover_every_width() {
    let Some(emu) = emulator() else { return };
    let kinds = (1..=8).map(|b| format!("b{b}")).chain(["split".to_string(), "split3".to_string()]);
    let want: Vec<String> =
        kinds.flat_map(|k| [1, 8].map(|v| [11, 12].map(|t| format!("ec_gemv_{k}_v{v}_t{t}")))).flatten().collect();
    assert_eq!(host_names(emu, "msl/ec_gemv.metal"), want);
    // The passthrough loader declares exactly these entry points.
    assert_eq!(ecq::kernels_msl::ec_gemv_entry_points(), want);
    let want: Vec<String> = (1..=8).flat_map(|b| [11, 12].map(|t| format!("rans_decode_b{b}_t{t}"))).collect();
    assert_eq!(host_names(emu, "msl/rans_decode.metal"), want);
}

// ---------------------------------------------------------------------------------------------------------
// Inputs

/// An encoded matrix with everything the kernels read: the stream arrays plus the quantized matrix.
#[derive(Clone)]
struct Case {
    name: String,
    layout: TileLayout,
    group_size: usize,
    table: FreqTable,
    stream: EncodedStream,
    /// A split stream's low words.
    low: Option<Vec<u32>>,
    q: QuantizedMatrix,
}

/// Roughly bell-shaped random weights, so the symbols are skewed as in real models, quantized by ecq's quantizer
/// with f16 scales.
fn bell_quantized(rows: usize, cols: usize, bits: u32, group_size: usize, seed: u64) -> QuantizedMatrix {
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f32> = (0..rows * cols).map(|_| (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0).collect();
    quantize(&w, rows, cols, QuantConfig { bits, group_size, scale_dtype: ScaleDtype::F16 }).unwrap()
}

impl Case {
    /// Random weights quantized by ecq's quantizer and encoded with `EcTensor::encode`.
    fn quantized(rows: usize, cols: usize, bits: u32, group_size: usize, segment: usize, seed: u64) -> Self {
        Self::encoded(bell_quantized(rows, cols, bits, group_size, seed), segment, None)
    }

    /// [`Case::quantized`] at 4 bits as a split stream in `form` (high 2 bits coded and low 2 stored, or one bit
    /// coded and 3 stored).
    fn split(rows: usize, cols: usize, group_size: usize, segment: usize, seed: u64, form: rans::SplitForm) -> Self {
        Self::encoded(bell_quantized(rows, cols, 4, group_size, seed), segment, Some(form))
    }

    /// `q` encoded in segments of `segment` columns at the default precision, split in `split` or not.
    fn encoded(q: QuantizedMatrix, segment: usize, split: Option<rans::SplitForm>) -> Self {
        let t =
            EcTensor::encode(&q, EncodeOptions { segment, precision: rans::DEFAULT_PRECISION, split, min_tiles: 0 })
                .unwrap();
        let kind = split.map_or(String::new(), |f| format!(" split {f:?}"));
        let name = format!("{}x{} b{}{kind} g{} s{segment}", q.rows, q.cols, q.bits, q.group_size);
        Self::from_tensor(name, &t, q)
    }

    /// Random skewed symbols of any width 1..=8 (beyond what the quantizer produces) with f32 scales, coded at
    /// precision 11.
    fn raw(rows: usize, cols: usize, bits: u32, group_size: usize, segment: usize, seed: u64) -> Self {
        Self::raw_at(rows, cols, bits, group_size, segment, seed, 11)
    }

    /// [`Case::raw`] coded at `precision`.
    fn raw_at(
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
        segment: usize,
        seed: u64,
        precision: u32,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let top = 1u32 << bits;
        let symbols: Vec<u8> = (0..rows * cols)
            .map(|_| {
                let u: f64 = rng.gen();
                ((u * u * top as f64) as u32).min(top - 1) as u8
            })
            .collect();
        let groups = rows * cols / group_size;
        let scales: Vec<f32> = (0..groups).map(|_| rng.gen_range(0.001f32..0.1)).collect();
        let biases: Vec<f32> = (0..groups).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let layout = TileLayout::new(rows, cols, bits, segment).unwrap();
        let table = FreqTable::from_counts(&rans::joint_counts(&symbols, &layout).unwrap(), precision).unwrap();
        let stream = rans::encode(&symbols, &layout, &table).unwrap();
        let t = EcTensor::from_parts(
            layout,
            group_size,
            table,
            stream,
            scales.clone(),
            biases.clone(),
            ScaleDtype::F32,
            None,
        )
        .unwrap();
        let q = QuantizedMatrix { rows, cols, bits, group_size, symbols, scales, biases, scale_dtype: ScaleDtype::F32 };
        Self::from_tensor(format!("{rows}x{cols} b{bits} g{group_size} s{segment} raw P{precision}"), &t, q)
    }

    fn from_tensor(name: String, t: &EcTensor, q: QuantizedMatrix) -> Self {
        Self {
            name,
            layout: *t.layout(),
            group_size: t.group_size(),
            table: t.table().clone(),
            stream: t.stream().clone(),
            low: t.low().map(<[u32]>::to_vec),
            q,
        }
    }

    fn tiles(&self) -> usize {
        self.layout.tiles()
    }

    /// `EcParams` of msl/ec_rans.h: twelve u32.
    fn params(&self, vectors: u32) -> [u32; 12] {
        let l = &self.layout;
        [
            l.rows() as u32,
            l.cols() as u32,
            l.bits(),
            self.group_size as u32,
            l.segment() as u32,
            l.segments() as u32,
            l.row_tiles() as u32,
            self.table.precision(),
            self.stream.words.len() as u32,
            vectors,
            // A split stream stores the bits its coded symbols leave out of 4.
            if self.low.is_some() { rans::SPLIT_BITS - l.bits() } else { 0 },
            0,
        ]
    }

    /// The arrays both kernels read.
    fn stream_arrays(&self, vectors: u32) -> Arrays {
        let mut a = Arrays::default();
        a.put("words", bytemuck::cast_slice(&self.stream.words));
        a.put_u32("tile_offsets", &self.stream.tile_offsets);
        a.put_u32("states", &self.stream.states);
        a.put_u32("decode_table", &self.table.decode_table());
        a.put_u32("params", &self.params(vectors));
        // ec_gemv binds the low words always (a stand-in where the stream is not split).
        a.put_u32("low", self.low.as_deref().unwrap_or(&[0]));
        a.put_scalar("workers", workers());
        a
    }

    fn random_x(&self, m: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..m * self.layout.cols()).map(|_| rng.gen_range(-1f32..1.0)).collect()
    }
}

// ---------------------------------------------------------------------------------------------------------
// ec_gemv

struct GemvRun {
    y: Vec<f32>,
    tile_status: Vec<u32>,
}

fn run_gemv(emu: &Emulator, case: &Case, x: &[f32], m: usize, variant: u32, threads: u32) -> GemvRun {
    let mut a = case.stream_arrays(m as u32);
    a.put("scales", bytemuck::cast_slice(&case.q.scales));
    a.put("biases", bytemuck::cast_slice(&case.q.biases));
    a.put("x", bytemuck::cast_slice(x));
    a.put_scalar("variant", variant);
    a.put_scalar("threads", threads);
    let table = ecq::kernels_msl::msl_table_bits(case.table.precision());
    let kind = match (&case.low, case.layout.bits()) {
        (Some(_), 1) => "split3".to_string(),
        (Some(_), _) => "split".to_string(),
        (None, bits) => format!("b{bits}"),
    };
    let what = format!("ec_gemv_{kind}_v{variant}_t{table} {} m={m} threads={threads}", case.name);
    let out = run_driver(&emu.ec_gemv, &a, &what);
    GemvRun { y: out.get_f32("y"), tile_status: out.get_u32("tile_status") }
}

/// `(y_ref, magnitude)` per output, in float64: `y = sum_k (scale * q + bias) * x`.
fn gemv_reference(q: &QuantizedMatrix, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (n, k, gs) = (q.rows, q.cols, q.group_size);
    let groups = k / gs;
    let (mut y, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
    for v in 0..m {
        let xv = &x[v * k..(v + 1) * k];
        for r in 0..n {
            let (mut acc, mut size) = (0f64, 0f64);
            for g in 0..groups {
                let (scale, bias) = (q.scales[r * groups + g] as f64, q.biases[r * groups + g] as f64);
                let (qs, xs) = (&q.symbols[r * k + g * gs..r * k + (g + 1) * gs], &xv[g * gs..(g + 1) * gs]);
                for (&qi, &xi) in qs.iter().zip(xs) {
                    let (qi, xi) = (qi as f64, xi as f64);
                    acc += (scale * qi + bias) * xi;
                    size += scale.abs() * qi * xi.abs() + bias.abs() * xi.abs();
                }
            }
            y[v * n + r] = acc;
            mag[v * n + r] = size;
        }
    }
    (y, mag)
}

/// Runs ec_gemv on `case` with `m` vectors and checks every output and every tile status.
fn check_gemv(case: &Case, m: usize, variant: u32, threads: u32) {
    let Some(emu) = emulator() else { return };
    let x = case.random_x(m, 7 + m as u64);
    let run = run_gemv(emu, case, &x, m, variant, threads);
    let (y_ref, mag) = gemv_reference(&case.q, &x, m);
    assert_eq!(run.y.len(), y_ref.len());
    let rows = case.layout.rows();
    let mut worst = 0f64;
    let mut outside = Vec::new();
    for (i, ((&y, &want), &size)) in run.y.iter().zip(&y_ref).zip(&mag).enumerate() {
        let err = (y as f64 - want).abs() / size.max(f64::MIN_POSITIVE);
        if err.is_nan() || err > GEMV_TOLERANCE {
            outside.push(format!(
                "vector {} row {}: got {y}, float64 reference {want} (relative error {err:.2e})",
                i / rows,
                i % rows
            ));
        }
        worst = worst.max(err);
    }
    let flagged = run.tile_status.iter().filter(|&&s| s != 0).count();
    assert!(
        outside.is_empty() && flagged == 0,
        "{} m={m}: {} of {} outputs outside tolerance {GEMV_TOLERANCE:.0e}{}; {flagged} of {} tiles flagged (status {:?})",
        case.name,
        outside.len(),
        run.y.len(),
        outside.first().map(|f| format!(", first {f}")).unwrap_or_default(),
        case.tiles(),
        &run.tile_status[..run.tile_status.len().min(16)]
    );
    eprintln!("{} m={m} v{variant}: max relative error {worst:.2e} (tolerance {GEMV_TOLERANCE:.0e})", case.name);
}

const PARITY_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// Split streams of both forms (ec_gemv_split_* and ec_gemv_split3_*): a 3-row last row tile and a 64-column last
/// segment, one 20-row tile, long segments with groups of 64; one vector and several.
#[test]
fn ec_gemv_split_streams_match_reference() {
    for form in [rans::SplitForm::Low2, rans::SplitForm::Low3] {
        let case = Case::split(67, 1088, 32, 256, 500, form);
        check_gemv(&case, 1, 1, THREADS);
        check_gemv(&case, 3, 8, THREADS);
        check_gemv(&Case::split(20, 128, 32, 128, 501, form), 1, 1, THREADS);
        check_gemv(&Case::split(37, 2048, 64, 1024, 502, form), 8, 8, THREADS);
    }
}

#[test]
fn ec_gemv_67x1088_every_width_matches_reference() {
    for bits in PARITY_BITS {
        check_gemv(&Case::quantized(67, 1088, bits, 64, 512, bits as u64), 1, 1, THREADS);
    }
}

#[test]
fn ec_gemv_67x4160_every_width_matches_reference() {
    for bits in PARITY_BITS {
        check_gemv(&Case::quantized(67, 4160, bits, 32, 512, 100 + bits as u64), 1, 1, THREADS);
    }
}

#[test]
fn ec_gemv_single_tile_matches_reference() {
    for bits in PARITY_BITS {
        let case = Case::quantized(20, 256, bits, 64, 512, 200 + bits as u64);
        assert_eq!(case.tiles(), 1);
        check_gemv(&case, 1, 1, THREADS);
    }
}

#[test]
fn ec_gemv_thousands_of_tiles_matches_reference() {
    // 2048 x 8192, segment 128, group 32: 64 row tiles x 64 segments = 4096 tiles.
    for bits in PARITY_BITS {
        let case = Case::quantized(2048, 8192, bits, 32, 128, 300 + bits as u64);
        assert_eq!(case.tiles(), 4096);
        check_gemv(&case, 1, 1, THREADS);
    }
}

#[test]
fn ec_gemv_several_vectors_match_reference() {
    for bits in PARITY_BITS {
        let case = Case::quantized(67, 1088, bits, 64, 256, 400 + bits as u64);
        check_gemv(&case, 3, 8, THREADS);
        check_gemv(&case, 8, 8, THREADS);
    }
    let case = Case::quantized(67, 4160, 4, 32, 512, 410);
    check_gemv(&case, 8, 8, THREADS);
    // The 8-vector kernel with one vector gives the same numbers as the reference too.
    check_gemv(&case, 1, 8, THREADS);
}

#[test]
fn ec_gemv_other_threadgroup_sizes_match_reference() {
    // 2 simdgroups (segments strided over fewer workers) and 10 (two idle simdgroups past the maximum of 8).
    let case = Case::quantized(67, 4160, 4, 32, 256, 500);
    for threads in [64, 320] {
        check_gemv(&case, 1, 1, threads);
        check_gemv(&case, 3, 8, threads);
    }
}

#[test]
fn ec_gemv_widths_1_and_7_match_reference() {
    for bits in [1, 7] {
        check_gemv(&Case::raw(67, 1088, bits, 64, 256, 600 + bits as u64), 1, 1, THREADS);
    }
}

// ---------------------------------------------------------------------------------------------------------
// rans_decode

struct DecodeRun {
    packed: Vec<u32>,
    tile_status: Vec<u32>,
}

fn run_decode(emu: &Emulator, case: &Case, arrays: Arrays, threadgroups: u32) -> DecodeRun {
    let mut a = arrays;
    let packed_words = case.layout.rows() * case.layout.cols() * case.layout.bits() as usize / 32;
    a.put_scalar("threadgroups", threadgroups);
    a.put_scalar("threads", THREADS);
    a.put_scalar("packed_words", packed_words as u32);
    let table = ecq::kernels_msl::msl_table_bits(case.table.precision());
    let what = format!("rans_decode_b{}_t{table} {} threadgroups={threadgroups}", case.layout.bits(), case.name);
    let out = run_driver(&emu.rans_decode, &a, &what);
    DecodeRun { packed: out.get_u32("packed"), tile_status: out.get_u32("tile_status") }
}

/// Decodes `case` with `threadgroups` threadgroups and compares with `pack_mlx` of the CPU-decoded symbols.
fn check_decode(case: &Case, threadgroups: u32) {
    let Some(emu) = emulator() else { return };
    let cpu = rans::decode(&case.stream, &case.layout, &case.table).unwrap();
    assert_eq!(cpu, case.q.symbols, "{}: CPU decode", case.name);
    let want = pack_mlx(&cpu, case.layout.cols(), case.layout.bits()).unwrap();
    let run = run_decode(emu, case, case.stream_arrays(1), threadgroups);
    assert_eq!(run.packed.len(), want.len());
    let wrong = run.packed.iter().zip(&want).filter(|(a, b)| a != b).count();
    let first = run.packed.iter().zip(&want).position(|(a, b)| a != b);
    let flagged = run.tile_status.iter().filter(|&&s| s != 0).count();
    let wpr = want.len() / case.layout.rows();
    assert!(
        wrong == 0 && flagged == 0,
        "{}: {wrong} of {} packed words differ from the CPU reference{}; {flagged} of {} tiles flagged (status {:?})",
        case.name,
        want.len(),
        first
            .map(|i| format!(
                ", first word {i} (row {}, word {} of the row): {:#010x}, CPU reference {:#010x}",
                i / wpr,
                i % wpr,
                run.packed[i],
                want[i]
            ))
            .unwrap_or_default(),
        case.tiles(),
        &run.tile_status[..run.tile_status.len().min(16)]
    );
}

fn decode_grid(case: &Case) -> u32 {
    case.tiles().div_ceil((THREADS / 32) as usize) as u32
}

#[test]
fn rans_decode_parity_shapes_every_width_exact() {
    for bits in PARITY_BITS {
        for (rows, cols, group, segment) in [(67, 1088, 64, 512), (67, 4160, 32, 512), (20, 256, 64, 512)] {
            let case = Case::quantized(rows, cols, bits, group, segment, 700 + bits as u64);
            check_decode(&case, decode_grid(&case));
        }
    }
}

#[test]
fn rans_decode_thousands_of_tiles_exact() {
    // Two widths only, to keep the emulation time down: ec_gemv_thousands_of_tiles_matches_reference runs the
    // same decode steps at every width. 3-bit: symbols straddle packed words; 8-bit: one weight a step.
    for bits in [3, 8] {
        let case = Case::quantized(2048, 8192, bits, 32, 128, 800 + bits as u64);
        assert_eq!(case.tiles(), 4096);
        check_decode(&case, decode_grid(&case));
    }
}

#[test]
fn rans_decode_small_grid_strides_over_tiles() {
    // 3 threadgroups of 8 simdgroups for 27 tiles: simdgroups take a second tile, some a third... none idle.
    let case = Case::quantized(67, 4160, 4, 32, 512, 900);
    assert_eq!(case.tiles(), 27);
    check_decode(&case, 3);
    check_decode(&case, 1);
}

#[test]
fn rans_decode_widths_1_and_7_exact() {
    for bits in [1, 7] {
        let case = Case::raw(67, 1088, bits, 64, 256, 1000 + bits as u64);
        check_decode(&case, decode_grid(&case));
    }
}

/// P = 12 runs the instantiations with a 2^12-entry table (t12); P = 10 the 2^11-entry ones (t11) with part of
/// the table unused. (Every other test here codes at P = 11.)
#[test]
fn other_table_sizes_match_reference() {
    for precision in [10, 12] {
        let case = Case::raw_at(67, 1088, 4, 64, 256, 1200 + precision as u64, precision);
        assert_eq!(case.table.precision(), precision);
        check_gemv(&case, 1, 1, THREADS);
        check_gemv(&case, 3, 8, THREADS);
        check_decode(&case, decode_grid(&case));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Corrupt streams: flagged in tile_status, never an out-of-bounds access (the driver's buffers end at guard
// pages, so a stray read or write kills the emulator and fails the test).

#[test]
fn corrupt_streams_are_flagged_without_out_of_bounds_access() {
    let Some(emu) = emulator() else { return };
    let case = Case::quantized(67, 1088, 4, 64, 256, 1100);
    assert_eq!(case.tiles(), 15);
    let mid = case.stream.tile_offsets[7] as usize + 3;
    // (what, corruption, tiles that must be flagged)
    type Corruption = Box<dyn Fn(&mut EncodedStream)>;
    let corruptions: [(&str, Corruption, &[usize]); 4] = [
        ("an offset far past the end", Box::new(|s| s.tile_offsets[5] = 0xffff_fff0), &[4, 5]),
        ("decreasing offsets", Box::new(|s| s.tile_offsets[9] = 0), &[8, 9]),
        ("a flipped word", Box::new(move |s| s.words[mid] ^= 0x5a5a), &[7]),
        ("a wrong state", Box::new(|s| s.states[11 * LANES + 1] ^= 0x0100_0000), &[11]),
    ];
    for (what, corrupt, flagged) in corruptions {
        let mut bad = case.clone();
        corrupt(&mut bad.stream);
        bad.name = format!("{} with {what}", case.name);

        let run = run_decode(emu, &bad, bad.stream_arrays(1), 1);
        for &tile in flagged {
            assert_ne!(run.tile_status[tile], 0, "rans_decode, {what}: tile {tile} not flagged: {:?}", run.tile_status);
        }

        let run = run_gemv(emu, &bad, &bad.random_x(1, 1), 1, 1, THREADS);
        for &tile in flagged {
            assert_ne!(run.tile_status[tile], 0, "ec_gemv, {what}: tile {tile} not flagged: {:?}", run.tile_status);
        }
        // Every output is still written (the driver fills y with NaN) and finite.
        assert!(run.y.iter().all(|y| y.is_finite()), "ec_gemv, {what}: output not written: {:?}", run.y);
    }
}
