//! Every WGSL source of the crate, loaded from one place, and the specialization that turns one into a module.
//!
//! A kernel's final source is: a block of `const` declarations (its [`Spec`]), then the shared preambles it
//! needs, then the kernel file. All of them may carry `//#if FLAG`, `//#else`, `//#endif` lines (nestable)
//! with the flags `SUBGROUP` (use subgroup operations) and `NARROW` (subgroups narrower than 32 lanes), so the
//! portable variant never names a subgroup built-in and compiles on devices without the feature, and, for
//! ec_gemv only, `PAIRS` and `QUADS` (a step takes an even number of weights, so x is read a pair of columns at
//! a time for one vector, four for more), and for q_gemv only `XLANES` (the word path reads x in the order
//! x_lanes.wgsl puts it in; [`Spec::lane_x`]).

/// Tile decode to MLX-packed symbols.
pub const RANS_DECODE: &str = include_str!("../../wgsl/rans_decode.wgsl");
/// Fused decode + dequantize + GEMV.
pub const EC_GEMV: &str = include_str!("../../wgsl/ec_gemv.wgsl");
/// Quantized GEMV on MLX-packed symbols.
pub const Q_GEMV: &str = include_str!("../../wgsl/q_gemv.wgsl");
/// The input vectors in the order q_gemv's lanes read them.
pub const X_LANES: &str = include_str!("../../wgsl/x_lanes.wgsl");
/// Scales and biases from ec_gemv's tile order back to rows.
pub const SCALE_ROWS: &str = include_str!("../../wgsl/scale_rows.wgsl");
/// Dense GEMV with f32 weights.
pub const GEMV_F32: &str = include_str!("../../wgsl/gemv_f32.wgsl");
/// Dense GEMV with f16 weights.
pub const GEMV_F16: &str = include_str!("../../wgsl/gemv_f16.wgsl");
/// Preamble: word positions of the lanes of a tile (ballot or workgroup memory).
pub const LANES: &str = include_str!("../../wgsl/lanes.wgsl");
/// Preamble: workgroup sum (subgroupAdd or a tree in workgroup memory).
pub const REDUCE: &str = include_str!("../../wgsl/reduce.wgsl");
/// Preamble: q_gemv's weight parameters (group 0, binding 0), which x_lanes reads too.
pub const PACKED: &str = include_str!("../../wgsl/packed.wgsl");
/// Preamble: the call's bindings (group 1) of the row kernels.
pub const ROW_IO: &str = include_str!("../../wgsl/row_io.wgsl");
/// Preamble: row blocks of NR rows per workgroup and their sums (subgroupAdd or
/// workgroup memory).
pub const ROWS: &str = include_str!("../../wgsl/rows.wgsl");

/// The kernels, one per WGSL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `wgsl/rans_decode.wgsl`.
    RansDecode,
    /// `wgsl/ec_gemv.wgsl`.
    EcGemv,
    /// `wgsl/q_gemv.wgsl`.
    QGemv,
    /// `wgsl/x_lanes.wgsl`.
    XLanes,
    /// `wgsl/scale_rows.wgsl`.
    ScaleRows,
    /// `wgsl/gemv_f32.wgsl`.
    GemvF32,
    /// `wgsl/gemv_f16.wgsl`.
    GemvF16,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 7] = [
        Kernel::RansDecode,
        Kernel::EcGemv,
        Kernel::QGemv,
        Kernel::XLanes,
        Kernel::ScaleRows,
        Kernel::GemvF32,
        Kernel::GemvF16,
    ];

    /// The kernel's file name under `wgsl/`.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::RansDecode => "rans_decode.wgsl",
            Kernel::EcGemv => "ec_gemv.wgsl",
            Kernel::QGemv => "q_gemv.wgsl",
            Kernel::XLanes => "x_lanes.wgsl",
            Kernel::ScaleRows => "scale_rows.wgsl",
            Kernel::GemvF32 => "gemv_f32.wgsl",
            Kernel::GemvF16 => "gemv_f16.wgsl",
        }
    }

    /// The preambles the kernel needs, in order, and its own file.
    fn parts(self) -> (&'static [&'static str], &'static str) {
        match self {
            Kernel::RansDecode => (&[LANES], RANS_DECODE),
            Kernel::EcGemv => (&[LANES], EC_GEMV),
            Kernel::QGemv => (&[PACKED, ROW_IO, ROWS], Q_GEMV),
            Kernel::XLanes => (&[PACKED, ROW_IO], X_LANES),
            Kernel::ScaleRows => (&[], SCALE_ROWS),
            Kernel::GemvF32 => (&[ROW_IO, REDUCE], GEMV_F32),
            Kernel::GemvF16 => (&[ROW_IO, ROWS], GEMV_F16),
        }
    }
}

/// How the lanes of a workgroup cooperate: the one switch between the portable and the subgroup kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LaneMode {
    /// Workgroup memory only; runs on any device, with or without subgroup operations.
    Portable,
    /// Subgroup operations, subgroups of 32 lanes or more (NVIDIA 32, AMD 64): a tile fits in one ballot.
    SubgroupWide,
    /// Subgroup operations, subgroups of 4, 8 or 16 lanes (lavapipe 8): ballots per subgroup, counts exchanged
    /// through workgroup memory.
    SubgroupNarrow,
}

/// Everything a pipeline is specialized on; with the [`Kernel`] it is the pipeline cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Spec {
    /// Lane cooperation.
    pub lanes: LaneMode,
    /// Bits per weight symbol (1..=8); 0 for the dense kernels.
    pub bits: u32,
    /// Decode-table precision `P`; 0 where no table is used.
    pub precision: u32,
    /// Vectors handled per workgroup (accumulators per lane), 1..=8.
    pub m: u32,
    /// Invocations per workgroup.
    pub workgroup: u32,
    /// q_gemv only: its word path reads x in lane order (`XLANES`), from x_lanes.wgsl run just before (see
    /// [`super::kernels::lane_x`]); false for every other kernel.
    pub lane_x: bool,
    /// rans_decode and ec_gemv only: the stream is split (`SPLIT`, docs/FORMAT.md sections 2.1 and 2.2): `bits`
    /// is then the coded symbols' 2 (or 1: `SPLIT3` as well), the weights have 4, and binding 7 holds the low
    /// words; false for every other kernel.
    pub split: bool,
    /// ec_gemv only: the grid's second dimension shares out the vectors, `m` to a row of workgroups (`GROUPED`;
    /// see [`super::kernels::vector_groups`]); false for every other kernel.
    pub grouped: bool,
    /// ec_gemv only, with `split` and `m` = 1: x is copied into workgroup memory, up to
    /// [`super::kernels::STAGED_X_COLS`] columns (`STAGE_X`; see [`super::kernels::stage_x`]); false for every
    /// other kernel.
    pub stage_x: bool,
    /// ec_gemv only, `m` >= 2 and not `grouped`, on 4-bit streams that are not split or on split streams: each loop
    /// trip's x is loaded before its steps (`EARLY_X`; see [`super::kernels::early_x`]); false for every other
    /// kernel.
    pub early_x: bool,
    /// ec_gemv only, not `grouped`: each workgroup takes two row tiles at a time, half its slabs each
    /// (`TILE_PAIRS`; see [`super::kernels::row_tile_pairs`]); false for every other kernel.
    pub tile_pairs: bool,
    /// ec_gemv only, `m` up to [`super::kernels::SPREAD_VECTORS`], not `grouped` or `tile_pairs`: the row tiles'
    /// segments are dealt out over the workgroups in runs of [`Self::slabs`], a row tile across two workgroups
    /// meeting in the seam words (`SPREAD`; see [`super::kernels::spread_slabs`]); false for every other kernel.
    pub spread: bool,
    /// ec_gemv only, reading x in 16-byte pieces ([`Self::reads_x_pieces`]) and not `stage_x`: each slab holds a loop
    /// trip's x in workgroup memory, loaded a trip ahead (`SLAB_X`; see [`super::kernels::slab_x`]); false for every
    /// other kernel.
    pub slab_x: bool,
    /// ec_gemv only, with `stage_x` or `block_cols`: x is staged as 8-bit digits and the products are integer dot
    /// products of four weights an instruction (`DIGITS`; see [`super::kernels::integer_dot`]); false for every other
    /// kernel.
    pub digits: bool,
    /// ec_gemv only, with `split` and `digits`, `m` up to [`super::kernels::SPREAD_VECTORS`], not `grouped`: the row
    /// tiles' segments are dealt out in blocks, each workgroup staging this many columns of every vector as digits
    /// (one of [`super::kernels::BLOCK_COLS`]; `BLOCKS`, see [`super::kernels::task_blocks`]); 0 otherwise and for
    /// every other kernel.
    pub block_cols: u32,
    /// ec_gemv only, with `block_cols`: a row's parts are more than two and meet in a tree of seam words
    /// (`SEAM_TREE`; see [`super::kernels::seam_tree`]); false otherwise and for every other kernel.
    pub seam_tree: bool,
}

impl Spec {
    /// `kernel`-independent fields; the kernel-specific switches (`lane_x`, `split`, `grouped`, `stage_x`,
    /// `early_x`, `tile_pairs`, `spread`, `slab_x`, `digits`, `block_cols`, `seam_tree`) off.
    pub fn new(lanes: LaneMode, bits: u32, precision: u32, m: u32, workgroup: u32) -> Self {
        Self {
            lanes,
            bits,
            precision,
            m,
            workgroup,
            lane_x: false,
            split: false,
            grouped: false,
            stage_x: false,
            early_x: false,
            tile_pairs: false,
            spread: false,
            slab_x: false,
            digits: false,
            block_cols: 0,
            seam_tree: false,
        }
    }

    /// Tiles per workgroup of the tile kernels: 32 lanes each.
    pub fn slabs(&self) -> u32 {
        self.workgroup / 32
    }

    /// Weights per joint symbol, `k = 8 / bits` (the kernels' `KW`).
    pub(crate) fn weights_per_step(&self) -> u32 {
        8 / self.bits.max(1)
    }

    /// ec_gemv: whether a step takes an even number of weights (4 bits or fewer), so x is read two columns at a time
    /// at one vector (`PAIRS`) and four at several (`QUADS`).
    fn even_steps(&self) -> bool {
        self.weights_per_step() % 2 == 0
    }

    /// ec_gemv: whether it reads x in 16-byte pieces, a loop trip's 4 KW columns of a vector in KW of them: on split
    /// streams, and where a step takes an even number of weights at several vectors (`QUADS`).
    pub fn reads_x_pieces(&self) -> bool {
        self.split || (self.m > 1 && self.even_steps())
    }

    /// The `const` block of `kernel` under this spec; `NR` is the row block of the row kernels
    /// ([`super::kernels::rows_per_group`], so host and kernel share one definition).
    fn prefix(&self, kernel: Kernel) -> String {
        let bits = self.bits.max(1);
        let mut out = format!(
            "const BITS: u32 = {bits}u;\nconst KW: u32 = {}u;\nconst P: u32 = {}u;\nconst M: u32 = {}u;\n\
             const WG: u32 = {}u;\nconst SLABS: u32 = {}u;\nconst NR: u32 = {}u;\n",
            self.weights_per_step(),
            self.precision.max(1),
            self.m,
            self.workgroup,
            self.slabs().max(1),
            super::kernels::rows_per_group(kernel, self),
        );
        if kernel == Kernel::RansDecode && self.split {
            out.push_str(&format!("const STAGE: u32 = {}u;\n", super::kernels::split_stage(self)));
        }
        if kernel == Kernel::EcGemv && (self.stage_x || self.block_cols > 0) {
            let cols = if self.stage_x { super::kernels::STAGED_X_COLS as u32 } else { self.block_cols };
            out.push_str(&format!("const XS_COLS: u32 = {cols}u;\n"));
        }
        if kernel == Kernel::EcGemv && self.seam_tree {
            out.push_str(&format!("const SEAM_VECTORS: u32 = {}u;\n", super::kernels::SPREAD_VECTORS));
        }
        out
    }
}

/// The complete WGSL source of `kernel` specialized by `spec`.
pub fn source(kernel: Kernel, spec: &Spec) -> String {
    source_with_body(kernel, spec, kernel.parts().1, true)
}

/// The source of `kernel` specialized by `spec` with `body` in place of its WGSL file, and its preambles unless
/// `with_preamble` is false (`body` then brings its own): for benchmarks that time a kernel variant read at
/// run time. `body` may carry the same `//#if` lines as the kernel files.
pub fn source_with_body(kernel: Kernel, spec: &Spec, body: &str, with_preamble: bool) -> String {
    let flags = &spec_flags(kernel, spec);
    let mut out = spec.prefix(kernel);
    if with_preamble {
        for preamble in kernel.parts().0 {
            out.push_str(&preprocess(preamble, flags));
        }
    }
    out.push_str(&preprocess(body, flags));
    out
}

/// The `//#if` flags of `kernel` under `spec`: the lane mode's, and where ec_gemv's steps take an even number of
/// weights (4 bits or fewer) `PAIRS` for one vector (x read a pair of columns at a time) or `QUADS` for more (four
/// at a time, and b / s added to the symbols instead of sum(x) kept per vector); for q_gemv where `spec.lane_x`,
/// `XLANES` (its word path reads x in lane order, as x_lanes.wgsl writes it).
fn spec_flags(kernel: Kernel, spec: &Spec) -> Vec<&'static str> {
    let mut flags = match spec.lanes {
        LaneMode::Portable => vec![],
        LaneMode::SubgroupWide => vec!["SUBGROUP"],
        LaneMode::SubgroupNarrow => vec!["SUBGROUP", "NARROW"],
    };
    // Digits take sum(q x) and sum(x) whatever the vectors (no b / s on the symbols).
    if kernel == Kernel::EcGemv && spec.even_steps() && !(spec.digits && spec.m > 1) {
        flags.push(if spec.m > 1 { "QUADS" } else { "PAIRS" });
    }
    if kernel == Kernel::QGemv && spec.lane_x {
        flags.push("XLANES");
    }
    if matches!(kernel, Kernel::RansDecode | Kernel::EcGemv) && spec.split {
        flags.push("SPLIT");
        // The form that codes one bit of each weight (docs/FORMAT.md, section 2.2).
        if spec.bits == crate::rans::SplitForm::Low3.coded_bits() {
            flags.push("SPLIT3");
        }
    }
    if kernel == Kernel::EcGemv && spec.grouped {
        flags.push("GROUPED");
    }
    if kernel == Kernel::EcGemv && spec.stage_x {
        flags.push("STAGE_X");
    }
    if kernel == Kernel::EcGemv && spec.early_x {
        flags.push("EARLY_X");
    }
    if kernel == Kernel::EcGemv && spec.tile_pairs {
        flags.push("TILE_PAIRS");
    }
    if kernel == Kernel::EcGemv && spec.spread {
        flags.push("SPREAD");
    }
    if kernel == Kernel::EcGemv && spec.slab_x {
        flags.push("SLAB_X");
    }
    if kernel == Kernel::EcGemv && spec.digits {
        flags.push("DIGITS");
    }
    if kernel == Kernel::EcGemv && spec.block_cols > 0 {
        flags.push("BLOCKS");
    }
    // A row tile across two workgroups, or more.
    if kernel == Kernel::EcGemv && (spec.spread || spec.block_cols > 0) {
        flags.push("SEAMS");
    }
    if kernel == Kernel::EcGemv && spec.seam_tree {
        flags.push("SEAM_TREE");
    }
    flags
}

/// Bytes of workgroup memory `source` (a whole WGSL kernel) declares: the sizes of its `var<workgroup>`
/// variables as naga lays them out (a driver may add padding between them). wgpu does not check this against
/// the device's limit, and a kernel past it may hang the device, so every pipeline is checked before it is
/// built ([`super::GpuContext`]).
pub fn declared_workgroup_bytes(source: &str) -> Result<u64, String> {
    use wgpu::naga;
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).map_err(|e| e.to_string())?;
    Ok(module
        .global_variables
        .iter()
        .filter(|(_, var)| var.space == naga::AddressSpace::WorkGroup)
        .map(|(_, var)| u64::from(layouter[var.ty].size))
        .sum())
}

/// Every `(kernel, spec)` pair the host functions of [`super::kernels`] can build, for checks that cover all
/// of them (e.g. the WGSL-to-MSL translation test): each lane mode, bit width 1..=8 (0 for the dense kernels),
/// decode-table precision 1..=12 for the tile kernels, vector count 1..=8 for the GEMV kernels, and the
/// workgroup sizes the host functions pick. Keep it in step with the `Spec`s built in kernels.rs.
pub fn specializations() -> Vec<(Kernel, Spec)> {
    use super::kernels::{
        decode_workgroup, early_x_kind, row_workgroup, tile_pair_vectors, BLOCK_COLS, BLOCK_X_COLS, DIGITS_MIN_SLABS,
        MAX_GEMV_SLABS, MAX_VECTORS_PER_PASS, SCALE_ROWS_WORKGROUP, SPLIT_WIDE_TILES, SPREAD_VECTORS,
        STAGE_X_MIN_SLABS, TILE_WORKGROUP,
    };
    let lane_modes = [LaneMode::Portable, LaneMode::SubgroupWide, LaneMode::SubgroupNarrow];
    let vectors = 1..=MAX_VECTORS_PER_PASS as u32;
    let precisions = 1..=crate::rans::MAX_PRECISION;
    let mut out = Vec::new();
    for lanes in lane_modes {
        for bits in 1..=8 {
            // Split streams code 2-bit or 1-bit symbols.
            let splits: &[bool] =
                if crate::rans::SplitForm::from_coded_bits(bits).is_some() { &[false, true] } else { &[false] };
            for (&split, precision) in splits.iter().flat_map(|s| precisions.clone().map(move |p| (s, p))) {
                let spec = Spec { split, ..Spec::new(lanes, bits, precision, 1, TILE_WORKGROUP) };
                out.push((Kernel::RansDecode, spec));
                // A large split stream's workgroup, where it fits.
                let wide = decode_workgroup(&spec, SPLIT_WIDE_TILES, u32::MAX);
                if wide != TILE_WORKGROUP {
                    out.push((Kernel::RansDecode, Spec { workgroup: wide, ..spec }));
                }
                for m in vectors.clone() {
                    // What `gemv_slabs` returns: any count up to the most; with the vectors shared out over rows of
                    // workgroups (`vector_groups`), each takes 2 to half the most.
                    let groupings: &[bool] =
                        if (2..=MAX_VECTORS_PER_PASS as u32 / 2).contains(&m) { &[false, true] } else { &[false] };
                    for (&grouped, slabs) in
                        groupings.iter().flat_map(|g| (1..=MAX_GEMV_SLABS as u32).map(move |s| (g, s)))
                    {
                        let base = Spec { split, grouped, ..Spec::new(lanes, bits, precision, m, 32 * slabs) };
                        // Each form, and where it reads x in pieces the same with each trip's x held by its slab
                        // (`slab_x`).
                        let mut push = |spec: Spec| {
                            out.push((Kernel::EcGemv, spec));
                            if spec.reads_x_pieces() && !spec.stage_x && !spec.early_x && spec.block_cols == 0 {
                                out.push((Kernel::EcGemv, Spec { slab_x: true, ..spec }));
                            }
                        };
                        push(base);
                        // One vector of a split stream held in workgroup memory (`stage_x`), as f32 or as digits
                        // (`digits`); a trip's x loaded before its steps (`early_x`).
                        if split && m == 1 && slabs >= STAGE_X_MIN_SLABS {
                            push(Spec { stage_x: true, ..base });
                            if slabs >= DIGITS_MIN_SLABS {
                                push(Spec { stage_x: true, digits: true, ..base });
                            }
                        }
                        if !grouped && early_x_kind(split, bits, m, slabs) {
                            push(Spec { early_x: true, ..base });
                        }
                        // Two row tiles a workgroup (`row_tile_pairs`): twice the slabs.
                        if !grouped && m <= tile_pair_vectors(slabs, split) {
                            push(Spec { tile_pairs: true, workgroup: 64 * slabs, ..base });
                        }
                        // Tasks dealt out in runs (`spread_slabs`), with one vector staged as above.
                        if !grouped && m <= SPREAD_VECTORS as u32 {
                            push(Spec { spread: true, ..base });
                            if split && m == 1 && slabs >= STAGE_X_MIN_SLABS {
                                push(Spec { spread: true, stage_x: true, ..base });
                                if slabs >= DIGITS_MIN_SLABS {
                                    push(Spec { spread: true, stage_x: true, digits: true, ..base });
                                }
                            }
                            // Blocks of row tiles by segments (`task_blocks`), each vector's part staged as digits.
                            if split && slabs >= DIGITS_MIN_SLABS {
                                for cols in BLOCK_COLS.into_iter().filter(|&c| m * c <= BLOCK_X_COLS) {
                                    push(Spec { digits: true, block_cols: cols, ..base });
                                    push(Spec { digits: true, block_cols: cols, seam_tree: true, ..base });
                                }
                            }
                        }
                    }
                }
            }
            for m in vectors.clone() {
                // Narrow rows and wide ones (`Q_GEMV_WIDE_ROW_BYTES`).
                let mut workgroups =
                    vec![row_workgroup(Kernel::QGemv, m, 0), row_workgroup(Kernel::QGemv, m, usize::MAX)];
                workgroups.dedup();
                for workgroup in workgroups {
                    out.push((Kernel::QGemv, Spec::new(lanes, bits, 0, m, workgroup)));
                    if m > 1 {
                        out.push((Kernel::QGemv, Spec { lane_x: true, ..Spec::new(lanes, bits, 0, m, workgroup) }));
                    }
                }
            }
            // x_lanes takes the bits and the workgroup of the q_gemv pipeline it feeds (several vectors).
            let mut workgroups = vec![row_workgroup(Kernel::QGemv, 2, 0), row_workgroup(Kernel::QGemv, 2, usize::MAX)];
            workgroups.dedup();
            for workgroup in workgroups {
                out.push((Kernel::XLanes, Spec::new(lanes, bits, 0, 1, workgroup)));
            }
        }
        out.push((Kernel::ScaleRows, Spec::new(lanes, 0, 0, 1, SCALE_ROWS_WORKGROUP)));
        for kernel in [Kernel::GemvF32, Kernel::GemvF16] {
            for m in vectors.clone() {
                out.push((kernel, Spec::new(lanes, 0, 0, m, row_workgroup(kernel, m, 0))));
            }
        }
    }
    out
}

/// Keeps the lines whose enclosing `//#if FLAG` / `//#else` branches are all taken under `flags`.
fn preprocess(text: &str, flags: &[&str]) -> String {
    // One entry per open `//#if`: (this branch taken, the enclosing branches all taken).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        let live = stack.last().is_none_or(|&(taken, outer)| taken && outer);
        if let Some(flag) = trimmed.strip_prefix("//#if ") {
            stack.push((flags.contains(&flag.trim()), live));
        } else if trimmed == "//#else" {
            if let Some(top) = stack.last_mut() {
                top.0 = !top.0;
            }
        } else if trimmed == "//#endif" {
            stack.pop();
        } else if live {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::naga;

    fn validate(kernel: Kernel, spec: &Spec) {
        let src = source(kernel, spec);
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{} {spec:?} does not parse:\n{}", kernel.file(), e.emit_to_string(&src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{} {spec:?} does not validate:\n{}", kernel.file(), e.emit_to_string(&src)));
    }

    /// Every kernel file parses and validates with naga, in every lane mode, at every bit width it takes.
    #[test]
    fn every_wgsl_kernel_validates() {
        for kernel in Kernel::ALL {
            for lanes in [LaneMode::Portable, LaneMode::SubgroupWide, LaneMode::SubgroupNarrow] {
                let bit_widths: Vec<u32> = match kernel {
                    Kernel::GemvF32 | Kernel::GemvF16 => vec![0],
                    _ => (1..=8).collect(),
                };
                for bits in bit_widths {
                    for m in [1, 8] {
                        for row_bytes in [0, usize::MAX] {
                            let workgroup = match kernel {
                                Kernel::RansDecode | Kernel::EcGemv => 256,
                                k => super::super::kernels::row_workgroup(k, m, row_bytes),
                            };
                            validate(kernel, &Spec::new(lanes, bits, 12, m, workgroup));
                        }
                    }
                }
            }
        }
    }

    /// The workgroup memory the host computes for each kernel (`kernels::workgroup_bytes`) is what its source
    /// declares, in every lane mode, for the extreme decode-table precisions and every vector count and
    /// workgroup size the host builds.
    #[test]
    fn host_workgroup_bytes_match_the_sources() {
        let mut checked = 0;
        for (kernel, spec) in specializations() {
            let widths = [1, 3, 8].contains(&spec.bits.max(1)) || spec.split;
            if ![0, 1, crate::rans::MAX_PRECISION].contains(&spec.precision) || !widths {
                continue;
            }
            let declared = declared_workgroup_bytes(&source(kernel, &spec)).unwrap();
            assert_eq!(declared, super::super::kernels::workgroup_bytes(kernel, &spec), "{} {spec:?}", kernel.file());
            checked += 1;
        }
        assert!(checked > 1000, "only {checked} specializations checked");
    }

    /// Every `var<workgroup>` counts, at its laid-out size, and nothing else does.
    #[test]
    fn declared_workgroup_bytes_adds_every_workgroup_variable() {
        let src = "var<workgroup> a: array<u32, 1000>;\nvar<workgroup> b: array<vec4<f32>, 10>;\n\
                   var<private> c: array<u32, 4096>;\n@compute @workgroup_size(1) fn main() { a[0] = 1u; b[0] = vec4<f32>(0.0); c[0] = 1u; }";
        assert_eq!(declared_workgroup_bytes(src).unwrap(), 4000 + 160);
    }

    /// The portable variants name no subgroup built-in, so they compile on devices without the feature.
    #[test]
    fn portable_sources_use_no_subgroup_operations() {
        for kernel in Kernel::ALL {
            let spec = Spec::new(LaneMode::Portable, 4, 12, 1, 64);
            let src: String = source(kernel, &spec).lines().map(|l| l.split("//").next().unwrap_or("")).collect();
            for token in ["subgroupBallot", "subgroupAdd", "subgroup_id", "subgroup_size", "subgroup_invocation_id"] {
                assert!(!src.contains(token), "{} portable source uses {token}", kernel.file());
            }
        }
    }

    /// The ec_gemv workgroup the host picks for any segment count and device limit is one of the listed
    /// specializations, never above the limit, and takes the segments in the fewest rounds (all in one up to 32),
    /// spread evenly over them.
    #[test]
    fn gemv_slabs_are_listed_specializations() {
        use super::super::kernels::{gemv_slabs, MAX_GEMV_SLABS};
        let listed: Vec<u32> = specializations()
            .iter()
            .filter(|(k, s)| *k == Kernel::EcGemv && s.m == 1 && s.bits == 4 && s.precision == 12)
            .filter(|(_, s)| s.lanes == LaneMode::SubgroupWide)
            .map(|(_, s)| s.workgroup / 32)
            .collect();
        for max_invocations in [32, 64, 256, 768, 1024, 2048] {
            for segments in 0..=70 {
                let slabs = gemv_slabs(segments, max_invocations);
                assert!(listed.contains(&slabs), "{segments} segments, limit {max_invocations}: {slabs} slabs");
                assert!(32 * slabs <= max_invocations.max(32));
                if max_invocations >= 1024 && (1..=32).contains(&segments) {
                    assert!(slabs as usize >= segments, "{segments} segments in one round");
                }
                let cap = (max_invocations / 32).clamp(1, MAX_GEMV_SLABS as u32) as usize;
                let rounds = segments.max(1).div_ceil(slabs as usize);
                assert_eq!(rounds, segments.max(1).div_ceil(cap), "{segments} segments, limit {max_invocations}");
                // Spread evenly: fewer idle slab-rounds than rounds.
                let idle = slabs as usize * rounds - segments.max(1);
                assert!(idle < rounds, "{segments} segments, limit {max_invocations}: {slabs} slabs, {idle} idle");
            }
        }
        assert_eq!(
            (gemv_slabs(3, 1024), gemv_slabs(9, 1024), gemv_slabs(28, 1024), gemv_slabs(28, 256), gemv_slabs(67, 1024)),
            (3, 9, 28, 7, 23)
        );
    }

    /// The rows of workgroups a fused product shares its vectors over: none without a compute-unit count, never
    /// fewer than 2 vectors a workgroup, a divisor of the vector count, at most `VECTOR_GROUP_SLABS_PER_UNIT` slabs
    /// a unit in all; and every ec_gemv specialization it leads to is listed.
    #[test]
    fn vector_groups_share_out_whole_vector_pairs() {
        use super::super::kernels::{vector_groups, MAX_VECTORS_PER_PASS, VECTOR_GROUP_SLABS_PER_UNIT};
        assert_eq!(VECTOR_GROUP_SLABS_PER_UNIT, 16);
        // 4096x4096 on 132 SMs: 128 row tiles of 8 slabs.
        let groups =
            |row_tiles, slabs| (1..=8).map(|m| vector_groups(row_tiles, slabs, m, Some(132))).collect::<Vec<_>>();
        assert_eq!(groups(128, 8), [1, 1, 1, 2, 1, 2, 1, 2]);
        // 2048x4096 and SmolLM2's 576x1536 (18 row tiles of 3 slabs).
        assert_eq!(groups(64, 8), [1, 1, 1, 2, 1, 3, 1, 4]);
        assert_eq!(groups(18, 3), [1, 1, 1, 2, 1, 3, 1, 4]);
        // 6144x4096, 14336x4096 and 4096x14336 (28 slabs): the GPU is full already.
        assert_eq!(groups(192, 8), [1; 8]);
        assert_eq!(groups(448, 8), [1; 8]);
        assert_eq!(groups(128, 28), [1; 8]);
        assert_eq!(vector_groups(3, 1, 8, None), 1);
        let listed = specializations();
        for units in [1, 8, 132, 10_000] {
            for (row_tiles, slabs) in [(1, 1), (3, 5), (64, 8), (128, 8), (500, 32)] {
                for m in 1..=MAX_VECTORS_PER_PASS {
                    let g = vector_groups(row_tiles, slabs, m, Some(units));
                    let within = row_tiles * slabs as usize * g <= VECTOR_GROUP_SLABS_PER_UNIT * units as usize;
                    assert!(m % g == 0 && (g == 1 || (m / g >= 2 && within)), "{m} vectors, {g} rows");
                    let spec =
                        Spec { grouped: g > 1, ..Spec::new(LaneMode::SubgroupWide, 4, 11, (m / g) as u32, 32 * slabs) };
                    assert!(listed.contains(&(Kernel::EcGemv, spec)), "{m} vectors in {g} rows: {spec:?}");
                }
            }
        }
    }

    /// x goes to workgroup memory only for a split stream's single vector of at most `STAGED_X_COLS` columns, in
    /// workgroups of at least `STAGE_X_MIN_SLABS` slabs, only where the workgroups do not outnumber the compute
    /// units, never without a count; every such specialization is listed, and its source declares the 16 KiB.
    #[test]
    fn stage_x_only_for_one_split_vector_with_a_unit_per_workgroup() {
        use super::super::kernels::{stage_x, STAGED_X_COLS, STAGE_X_MIN_SLABS};
        assert_eq!((STAGED_X_COLS, STAGE_X_MIN_SLABS), (4096, 6));
        let one = Spec { split: true, ..Spec::new(LaneMode::SubgroupWide, 2, 11, 1, 256) };
        // 4096x4096, 2048x4096 and 1024x4096 on 132 SMs; not 6144x4096 (192 row tiles) or 14336x4096.
        for workgroups in [128, 64, 32, 132] {
            assert!(stage_x(&one, workgroups, 4096, Some(132)), "{workgroups}");
        }
        for workgroups in [133, 192, 448] {
            assert!(!stage_x(&one, workgroups, 4096, Some(132)), "{workgroups}");
        }
        // Not split, several vectors a workgroup, wider rows, no count.
        let plain = Spec { split: false, bits: 4, ..one };
        assert!(!stage_x(&plain, 128, 4096, Some(132)));
        assert!(!stage_x(&Spec { m: 2, ..one }, 64, 4096, Some(132)));
        assert!(!stage_x(&one, 128, 4112, Some(132)));
        assert!(!stage_x(&one, 1, 16, None));
        // 6 slabs and more (4096x3072 and wider), not 5 (4096x2560) or fewer.
        for slabs in 1..=32 {
            let spec = Spec { workgroup: 32 * slabs, ..one };
            assert_eq!(stage_x(&spec, 128, 4096, Some(132)), slabs >= 6, "{slabs} slabs");
        }
        let listed = specializations();
        for slabs in 6..=32 {
            for precision in 1..=crate::rans::MAX_PRECISION {
                let spec = Spec { stage_x: true, precision, workgroup: 32 * slabs, ..one };
                assert!(listed.contains(&(Kernel::EcGemv, spec)), "{spec:?}");
            }
        }
        let staged = Spec { stage_x: true, ..one };
        let bytes = |spec: &Spec| declared_workgroup_bytes(&source(Kernel::EcGemv, spec)).unwrap();
        assert_eq!(bytes(&staged), bytes(&one) + 4 * STAGED_X_COLS as u64);
        let odd = |s: &Spec| !s.split || s.m != 1 || s.grouped || s.early_x || s.slabs() < STAGE_X_MIN_SLABS;
        assert!(!listed.iter().any(|(_, s)| s.stage_x && odd(s)));
    }

    /// x is staged as 8-bit digits only where it is staged, in workgroups of at least `DIGITS_MIN_SLABS` slabs, on a
    /// device with fast 8-bit dot products; every such specialization is listed, and no other; the digits take the
    /// same workgroup memory as x staged as f32.
    #[test]
    fn digits_only_where_x_is_staged_in_wide_workgroups_on_fast_devices() {
        use super::super::kernels::{integer_dot, DIGITS_MIN_SLABS};
        assert_eq!(DIGITS_MIN_SLABS, 24);
        let one = Spec { split: true, stage_x: true, ..Spec::new(LaneMode::SubgroupWide, 1, 11, 1, 32 * 28) };
        assert!(integer_dot(&one, true));
        assert!(!integer_dot(&one, false));
        assert!(!integer_dot(&Spec { stage_x: false, ..one }, true));
        for slabs in 1..=32 {
            let spec = Spec { workgroup: 32 * slabs, ..one };
            assert_eq!(integer_dot(&spec, true), slabs >= 24, "{slabs} slabs");
        }
        let listed = specializations();
        for (bits, lanes) in
            [1, 2].into_iter().flat_map(|b| [LaneMode::Portable, LaneMode::SubgroupNarrow].map(|l| (b, l)))
        {
            for spread in [false, true] {
                let spec = Spec { bits, lanes, spread, digits: true, workgroup: 32 * 24, ..one };
                assert!(listed.contains(&(Kernel::EcGemv, spec)), "{spec:?}");
            }
        }
        let staged = |s: &Spec| s.stage_x != (s.block_cols > 0);
        assert!(!listed.iter().any(|(_, s)| s.digits && (!staged(s) || s.slabs() < DIGITS_MIN_SLABS)));
        let bytes = |spec: &Spec| declared_workgroup_bytes(&source(Kernel::EcGemv, spec)).unwrap();
        assert_eq!(bytes(&Spec { digits: true, ..one }), bytes(&one));
    }

    /// Blocks of row tiles by segments (`kernels::task_blocks`) only for split streams of up to 4 vectors on a device
    /// with fast 8-bit dot products and a known count of compute units; they take the fewest slabs among the column
    /// counts whose digits fit, in workgroups that fit on the units, and take the shapes measured: 14336x4096 at 2
    /// to 4 vectors and 4096x14336 at one and two on 132 SMs in 128 blocks of 28 slabs (two vectors in quarters of the
    /// row). Every specialization the rule can give is listed, with its digits, with and without the tree of seams;
    /// none stages x as f32 or holds a trip's x by its slab.
    #[test]
    fn blocks_for_split_streams_of_up_to_4_vectors_on_fast_devices() {
        use super::super::kernels::{
            block_parts, ec_gemv_workgroups, seam_tree, task_blocks, BlockDevice, TaskBlocks, BLOCK_COLS,
            BLOCK_MIN_SEGMENT, BLOCK_X_COLS,
        };
        use crate::rans::TileLayout;
        let tall = TileLayout::new(14336, 4096, 1, 512).unwrap();
        let wide = TileLayout::new(4096, 14336, 1, 512).unwrap();
        // An H200's 48 KiB holds 8192 columns of digits at P = 11, a device of 32 KiB half as many.
        let widest = |m: usize| BLOCK_COLS.into_iter().filter(|&cols| m as u32 * cols <= BLOCK_X_COLS).max().unwrap();
        // An H200: 132 SMs, 1024 invocations, fast dot products; slabs past the last row tile skipping or not.
        let h200 = |widest: u32, tail_skips: bool| BlockDevice {
            compute_units: Some(132),
            max_invocations: 1024,
            widest,
            fast: true,
            tail_skips,
        };
        let blocks = |l: &TileLayout, m| task_blocks(l, m, true, &h200(widest(m), false));
        for m in 2..=4 {
            assert_eq!(blocks(&tall, m), Some(TaskBlocks { cols: 2048, parts: 2, per: 4, tiles: 7 }), "m={m}");
        }
        assert_eq!(blocks(&wide, 1), Some(TaskBlocks { cols: 8192, parts: 2, per: 14, tiles: 2 }));
        // Two vectors' digits of 14 segments are past 32 KiB: quarters of 7 segments. Three or four vectors' parts of
        // 2048 columns (7 parts) make blocks that outnumber the units (133 of 7 row tiles).
        assert_eq!(blocks(&wide, 2), Some(TaskBlocks { cols: 4096, parts: 4, per: 7, tiles: 4 }));
        assert_eq!((blocks(&wide, 3), blocks(&wide, 4)), (None, None));
        // Where slabs past the last row tile skip their steps, the last row of blocks (2 row tiles) may take a unit a
        // second time: 7 parts of 4 segments, 133 workgroups of 7 row tiles. In 32 segments of 448 columns the row
        // splits into 8 parts, 128 workgroups of 8 row tiles.
        let seven = Some(TaskBlocks { cols: 2048, parts: 7, per: 4, tiles: 7 });
        for m in 3..=4 {
            assert_eq!(task_blocks(&wide, m, true, &h200(widest(m), true)), seven, "m={m}");
        }
        let wide448 = TileLayout::new(4096, 14336, 1, 448).unwrap();
        let eight = Some(TaskBlocks { cols: 2048, parts: 8, per: 4, tiles: 8 });
        for skips in [false, true] {
            assert_eq!(task_blocks(&wide448, 4, true, &h200(widest(4), skips)), eight);
        }
        // Not for rows of two parts: 14336x4096's blocks fit the units as they are.
        assert_eq!(task_blocks(&tall, 4, true, &h200(widest(4), true)), blocks(&tall, 4));
        // Only rows that two parts of the most columns staged cannot hold take more parts: with half the room, four
        // vectors on 14336x4096 take quarters of 1024 columns.
        assert!((1..=4).all(|m| !seam_tree(&tall, widest(m))) && !seam_tree(&wide, widest(1)));
        assert!((2..=4).all(|m| seam_tree(&wide, widest(m))) && seam_tree(&tall, 1024));
        let quarters = task_blocks(&tall, 4, true, &h200(1024, false));
        assert_eq!(quarters, Some(TaskBlocks { cols: 1024, parts: 4, per: 2, tiles: 14 }));
        // Segments shorter than BLOCK_MIN_SEGMENT take blocks for one or two vectors only (4096x4096 in 128 columns).
        let short = TileLayout::new(4096, 4096, 1, 128).unwrap();
        assert_eq!(blocks(&short, 2), Some(TaskBlocks { cols: 4096, parts: 1, per: 32, tiles: 1 }));
        assert_eq!((blocks(&short, 3), blocks(&short, 4), BLOCK_MIN_SEGMENT), (None, None, 256));
        assert_eq!(block_parts(28, 512, 2048), Some((7, 4)));
        assert_eq!(block_parts(56, 256, 1024), None);
        assert_eq!(block_parts(28, 512, 4096), Some((4, 7)));
        assert_eq!(block_parts(8, 512, 4096), Some((1, 8)));
        assert_eq!(block_parts(17, 256, 4096), Some((2, 9)));
        assert_eq!(block_parts(11, 256, 1024), Some((3, 4)));
        assert_eq!(block_parts(2, 512, 256), None);
        // Not split, more vectors, slow dot products, no count of units, too few slabs (4096x4096: 128 row tiles).
        assert_eq!(task_blocks(&tall, 2, false, &h200(4096, false)), None);
        assert_eq!(task_blocks(&tall, 5, true, &h200(4096, false)), None);
        assert_eq!(task_blocks(&tall, 2, true, &BlockDevice { fast: false, ..h200(4096, false) }), None);
        assert_eq!(task_blocks(&tall, 2, true, &BlockDevice { compute_units: None, ..h200(4096, false) }), None);
        assert_eq!(blocks(&TileLayout::new(4096, 4096, 1, 512).unwrap(), 2), None);
        let listed = specializations();
        for (l, m) in [(tall, 2), (tall, 3), (tall, 4), (wide, 1), (wide, 2)] {
            let b = blocks(&l, m).unwrap();
            let spec = Spec {
                split: true,
                digits: true,
                block_cols: b.cols,
                seam_tree: b.parts > 2,
                ..Spec::new(LaneMode::SubgroupWide, 1, 11, m as u32, 32 * (b.tiles * b.per) as u32)
            };
            assert!(listed.contains(&(Kernel::EcGemv, spec)), "{spec:?}");
            assert_eq!(ec_gemv_workgroups(&spec, &l), 128, "{spec:?}");
        }
        for (_, s) in listed.iter().filter(|(_, s)| s.block_cols > 0) {
            assert!(s.split && s.digits && s.m <= 4 && !s.grouped && !s.stage_x && !s.slab_x, "{s:?}");
            assert!(listed.contains(&(Kernel::EcGemv, Spec { seam_tree: !s.seam_tree, ..*s })), "{s:?}");
            assert!(BLOCK_COLS.contains(&s.block_cols) && s.m * s.block_cols <= BLOCK_X_COLS, "{s:?}");
        }
    }

    /// A trip's x is loaded before its steps only for 4-bit streams that are not split at 4 vectors a workgroup,
    /// and for split streams at 2 to 4 vectors in workgroups of at least 22 slabs; in one row of workgroups, only
    /// where the workgroups do not outnumber the compute units, never without a count; every such specialization is
    /// listed, and no other.
    #[test]
    fn early_x_only_for_plain_4_bit_4_vectors_and_wide_split_2_to_4_with_a_unit_per_workgroup() {
        use super::super::kernels::{early_x, EARLY_X_VECTORS, SPLIT_EARLY_X_MIN_SLABS};
        assert_eq!((EARLY_X_VECTORS, SPLIT_EARLY_X_MIN_SLABS), (4, 22));
        let four = Spec::new(LaneMode::SubgroupNarrow, 4, 11, 4, 32 * 28);
        let split = Spec { bits: 2, split: true, ..four };
        // 4096x14336 and 2048x14336 on 132 SMs; not 6144x4096 (192 row tiles) or 14336x4096 (448).
        for spec in [four, split, Spec { m: 2, ..split }, Spec { m: 3, ..split }, Spec { workgroup: 32 * 22, ..split }]
        {
            assert!(early_x(&spec, 128, Some(132)), "{spec:?}");
            assert!(early_x(&spec, 64, Some(132)), "{spec:?}");
            assert!(!early_x(&spec, 192, Some(132)), "{spec:?}");
            assert!(!early_x(&spec, 448, Some(132)), "{spec:?}");
            // Rows of workgroups, no count.
            assert!(!early_x(&Spec { grouped: true, ..spec }, 64, Some(132)), "{spec:?}");
            assert!(!early_x(&spec, 1, None), "{spec:?}");
        }
        // Other vector counts, other widths, split workgroups of fewer slabs.
        for m in [1, 2, 3, 8] {
            assert!(!early_x(&Spec { m, ..four }, 128, Some(132)), "{m}");
        }
        for m in [1, 5, 8] {
            assert!(!early_x(&Spec { m, ..split }, 128, Some(132)), "{m}");
        }
        assert!(!early_x(&Spec { bits: 3, ..four }, 128, Some(132)));
        assert!(!early_x(&Spec { bits: 2, ..four }, 128, Some(132)));
        assert!(!early_x(&Spec { workgroup: 32 * 21, ..split }, 128, Some(132)));
        assert!(!early_x(&Spec { workgroup: 32 * 8, ..split }, 128, Some(132)));
        let listed = specializations();
        for slabs in 1..=32 {
            for precision in 1..=crate::rans::MAX_PRECISION {
                let spec = Spec { early_x: true, precision, workgroup: 32 * slabs, ..four };
                assert!(listed.contains(&(Kernel::EcGemv, spec)), "{spec:?}");
                for m in 2..=4 {
                    let spec = Spec { early_x: true, precision, workgroup: 32 * slabs, m, ..split };
                    assert_eq!(listed.contains(&(Kernel::EcGemv, spec)), slabs >= 22, "{spec:?}");
                }
            }
        }
        let odd = |s: &Spec| {
            s.grouped || if s.split { !(2..=4).contains(&s.m) || s.slabs() < 22 } else { s.bits != 4 || s.m != 4 }
        };
        assert!(!listed.iter().any(|(_, s)| s.early_x && odd(s)));
    }

    /// Workgroups take two row tiles only where the row tiles number more than 2 and at most 4 a compute unit and
    /// pairs leave no unit more of them, in one row of workgroups, for 6 to 8 slabs a row tile and up to 4 vectors
    /// (at 8 slabs, 8 on split streams and 7 on others), never without a count; every such specialization is
    /// listed, with twice the slabs.
    #[test]
    fn row_tile_pairs_only_where_they_spread_the_row_tiles_no_worse() {
        use super::super::kernels::{row_tile_pairs, tile_pair_vectors, TILE_PAIR_SLABS};
        assert_eq!(TILE_PAIR_SLABS, 6..=8);
        let vectors: Vec<_> = [(6, false), (6, true), (7, true), (8, false), (8, true), (4, true), (9, false)]
            .iter()
            .map(|&(slabs, split)| tile_pair_vectors(slabs, split))
            .collect();
        assert_eq!(vectors, [4, 4, 4, 7, 8, 0, 0]);
        let pairs =
            |row_tiles, slabs, m, split, groups, units| row_tile_pairs(row_tiles, slabs, m, split, groups, units, 1024);
        // 14336x4096 (448 row tiles), 13312x4096 (416) and 16896x4096 (528) on 132 SMs, and 14336x3072 (6 slabs);
        // not 12672x4096 (396: 3 a unit, 4 in pairs), 8448x4096 (264) or 4096x4096 (128).
        assert!(pairs(448, 8, 1, false, 1, Some(132)));
        assert!(pairs(416, 8, 1, true, 1, Some(132)));
        assert!(pairs(528, 8, 4, false, 1, Some(132)));
        assert!(pairs(448, 6, 4, false, 1, Some(132)));
        for row_tiles in [396, 264, 128, 529, 1000] {
            assert!(!pairs(row_tiles, 8, 1, true, 1, Some(132)), "{row_tiles}");
        }
        // An odd count: 7 row tiles on 2 units, 4 a unit either way.
        assert!(pairs(7, 6, 1, false, 1, Some(2)));
        // More vectors only at 8 slabs, 8 only on split streams; rows of workgroups, other slab counts (14336x2048
        // has 4), invocations past the device's, no count.
        assert!(!pairs(448, 6, 5, true, 1, Some(132)));
        assert!(pairs(448, 8, 7, false, 1, Some(132)));
        assert!(!pairs(448, 8, 8, false, 1, Some(132)));
        assert!(pairs(448, 8, 8, true, 1, Some(132)));
        assert!(!pairs(448, 8, 4, false, 2, Some(132)));
        for slabs in [1, 4, 5, 9, 16] {
            assert!(!pairs(448, slabs, 1, true, 1, Some(132)), "{slabs}");
        }
        assert!(!row_tile_pairs(448, 8, 1, true, 1, Some(132), 256));
        assert!(!pairs(448, 8, 1, true, 1, None));
        let listed = specializations();
        for (m, slabs, split) in [(1, 8, true), (7, 8, false), (4, 6, false), (8, 8, true), (2, 7, true)] {
            let one = Spec { split, ..Spec::new(LaneMode::SubgroupWide, if split { 2 } else { 4 }, 11, m, 32 * slabs) };
            let paired = Spec { tile_pairs: true, workgroup: 64 * slabs, ..one };
            assert!(listed.contains(&(Kernel::EcGemv, paired)), "{paired:?}");
        }
        let odd = |s: &Spec| {
            let slabs = s.slabs() / 2;
            s.grouped
                || s.slabs() % 2 == 1
                || !TILE_PAIR_SLABS.contains(&slabs)
                || s.m > tile_pair_vectors(slabs, s.split)
        };
        assert!(!listed.iter().any(|(k, s)| s.tile_pairs && (*k != Kernel::EcGemv || odd(s))));
    }

    /// rans_decode takes 16 tiles a workgroup only for split streams of at least `SPLIT_WIDE_TILES` tiles, on a
    /// device that allows 512 invocations, and where the workgroup memory stays within 32 KiB.
    #[test]
    fn decode_workgroup_widens_large_split_streams_only() {
        use crate::gpu::kernels::{decode_workgroup, SPLIT_TILE_WORKGROUP, SPLIT_WIDE_TILES, TILE_WORKGROUP};
        let split = Spec { split: true, ..Spec::new(LaneMode::SubgroupWide, 2, 11, 1, TILE_WORKGROUP) };
        assert_eq!(decode_workgroup(&split, SPLIT_WIDE_TILES, 1024), SPLIT_TILE_WORKGROUP);
        assert_eq!(decode_workgroup(&split, SPLIT_WIDE_TILES - 1, 1024), TILE_WORKGROUP);
        assert_eq!(decode_workgroup(&split, SPLIT_WIDE_TILES, 256), TILE_WORKGROUP);
        assert_eq!(decode_workgroup(&Spec { split: false, ..split }, 1 << 20, 1024), TILE_WORKGROUP);
        // A 16 KiB table leaves room for 16 slabs only where the lanes need no workgroup memory of their own.
        assert_eq!(decode_workgroup(&Spec { precision: 12, ..split }, SPLIT_WIDE_TILES, 1024), SPLIT_TILE_WORKGROUP);
        let narrow = Spec { precision: 12, lanes: LaneMode::SubgroupNarrow, ..split };
        assert_eq!(decode_workgroup(&narrow, SPLIT_WIDE_TILES, 1024), TILE_WORKGROUP);
        for spec in
            [split, Spec { lanes: LaneMode::Portable, ..split }, Spec { lanes: LaneMode::SubgroupNarrow, ..split }]
        {
            let wide = Spec { workgroup: decode_workgroup(&spec, SPLIT_WIDE_TILES, 1024), ..spec };
            let src = source(Kernel::RansDecode, &wide);
            assert!(declared_workgroup_bytes(&src).unwrap() <= 32 << 10, "{wide:?}");
        }
    }

    #[test]
    fn preprocess_keeps_taken_branches() {
        let text = "a\n//#if X\nb\n//#if Y\nc\n//#else\nd\n//#endif\n//#else\ne\n//#endif\nf\n";
        assert_eq!(preprocess(text, &["X"]), "a\nb\nd\nf\n");
        assert_eq!(preprocess(text, &["X", "Y"]), "a\nb\nc\nf\n");
        assert_eq!(preprocess(text, &[]), "a\ne\nf\n");
    }
}
