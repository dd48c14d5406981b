//! One host function per kernel, the GPU-side arrays they read, and the bind group layouts they share.
//!
//! Every kernel has an explicit bind group layout (not one derived from the shader), so one bind group serves
//! every specialization of a kernel: the subgroup and portable variants and every vector count.
//! Group 0 holds the weights (built once per weight), group 1 the call's vectors (built per buffer pair).
//! Each host function records its dispatch into a compute pass the caller began, so several products share
//! one pass (wgpu places the barriers between them); wgpu turns every pass into command buffers of its own,
//! about 3.4 us of device time each back to back on an H200's driver (see BENCHMARKS.md).

use super::context::GpuContext;
use super::shaders::{Kernel, LaneMode, Spec};
use crate::error::{Error, Result};
use crate::format::EcTensor;
use crate::quant::mlx_words_per_row;
use crate::rans::TileLayout;

/// Invocations per workgroup of rans_decode: 8 slabs of 32 lanes, 8 tiles at once sharing one decode table.
pub const TILE_WORKGROUP: u32 = 256;
/// Invocations per workgroup of rans_decode for a split stream of at least [`SPLIT_WIDE_TILES`] tiles: 16 slabs.
pub const SPLIT_TILE_WORKGROUP: u32 = 512;
/// Tiles from which [`rans_decode`] decodes a split stream 16 tiles a workgroup. Measured on an H200 (decode-only,
/// P = 11, one shape a run): 14336x4096 (3584 tiles) 50.4 against 62.0 us with 8 tiles a workgroup, 4096x14336
/// 50.9 against 61.6, 8192x8192 51.3 against 62.8, real SmolLM2 symbols (`stack_k576 x4`, 4608 tiles) 78.1
/// against 91.7; `stack_k1536 x4` (1728 tiles) 33.6 against 33.4; 4096x4096 (1024 tiles, which then fill only 64
/// workgroups) 32.2 against 29.1.
pub const SPLIT_WIDE_TILES: usize = 2048;
/// Most slabs of 32 lanes in one ec_gemv workgroup: up to 32 segments of a row tile decode at once.
pub const MAX_GEMV_SLABS: usize = 32;

/// Slabs of 32 lanes per ec_gemv workgroup for rows of `segments` segments on a device that allows
/// `max_invocations` per workgroup: one per segment, up to what the device allows (at most 32); past that, the
/// fewest rounds, the segments spread evenly over them. Measured on an H200: 4096x14336 (28 segments) took 248.7
/// us with 8 slabs (4 rounds), 159.7 with 16 and 141.7 with 32; more slabs than segments only idle (4096x4096, 8
/// segments: 73.3 us with 8 slabs, 87.3 with 16). Exactly one slab per segment against the next power of two (28
/// slabs against 32, split streams, outputs identical, one shape a process): 4096x14336 M = 1 / 2 / 4 / 8 58.4 /
/// 68.2 / 84.0 / 116.1 us against 62.5 / 72.9 / 98.2 / 137.1, 8192x14336 110.8 / 130.4 / 162.3 / 226.1 against
/// 118.8 / 140.7 / 193.1 / 269.3; 28 slabs on 4096x11008 (22 segments) 55.5 / 65.6 / 80.2 / 112.6 against 59.5 /
/// 70.1 / 94.2 / 133.7. (An SM's 65536 registers leave a 1024-invocation workgroup at most 64 a lane, an
/// 896-invocation one 72.)
pub fn gemv_slabs(segments: usize, max_invocations: u32) -> u32 {
    let cap = (max_invocations / 32).clamp(1, MAX_GEMV_SLABS as u32) as usize;
    let segments = segments.max(1);
    segments.div_ceil(segments.div_ceil(cap)) as u32
}

/// Slabs of 32 lanes per compute unit up to which [`vector_groups`] shares out a product's vectors (see there).
pub const VECTOR_GROUP_SLABS_PER_UNIT: usize = 16;

/// Rows of ec_gemv workgroups that share out the `m` vectors of one fused product (the grid's second dimension;
/// each row takes `m / groups` vectors and decodes every row tile itself), for `row_tiles` workgroups of `slabs`
/// slabs on a device of `compute_units`: the most that divide `m`, leave each workgroup at least 2 vectors (so its
/// arithmetic, and so every product, is that of the whole `m`) and keep all the workgroups' slabs within
/// [`VECTOR_GROUP_SLABS_PER_UNIT`] per compute unit; 1 where the device does not say how many compute units it
/// has. Where the row tiles leave the GPU mostly idle the extra decodes cost nothing and each workgroup has fewer
/// vectors to multiply; where they fill it, every extra decode costs its full time. Measured on an H200 (132 SMs),
/// fused us in one row against the rule's rows: 4096x4096 M = 4 62.2 -> 50.2 split and 70.0 -> 60.7 not split (2
/// rows), 2048x4096 M = 8 75.3 -> 49.2 and 123.2 -> 59.7 (4 rows); 4096x14336 (28 slabs a row tile) took 41-60%
/// longer at M = 4 and 8 in 2 rows, and 8192x4096 at M = 4 69.5 -> 76.8, which the slab count keeps in one.
pub fn vector_groups(row_tiles: usize, slabs: u32, m: usize, compute_units: Option<u32>) -> usize {
    let Some(units) = compute_units else {
        return 1;
    };
    let room = units as usize * VECTOR_GROUP_SLABS_PER_UNIT;
    let slabs = row_tiles * slabs as usize;
    (1..=m / 2).rev().find(|&g| m % g == 0 && slabs * g <= room).unwrap_or(1)
}

/// Most columns of x that ec_gemv holds in workgroup memory under [`stage_x`] (16 KiB of f32).
pub const STAGED_X_COLS: usize = 4096;

/// Fewest slabs a workgroup for which [`stage_x`] applies.
pub const STAGE_X_MIN_SLABS: u32 = 6;

/// Whether ec_gemv, specialized as `spec` otherwise, copies x into workgroup memory (`Spec::stage_x`) for
/// `workgroups` workgroups (row tiles times [`vector_groups`]) over `cols` columns on a device of `compute_units`:
/// only for a split stream's single vector of at most [`STAGED_X_COLS`] columns, in workgroups of at least
/// [`STAGE_X_MIN_SLABS`] slabs, and only where every workgroup has a compute unit to itself (the caller also checks
/// the workgroup memory against the device's limit). Measured on an H200 (132 SMs), split streams, M = 1, products
/// identical, us against x read from global memory: 4096x4096 (8 slabs) 42.4 -> 38.2, 2048x4096 42.1 -> 37.3,
/// 1024x4096 42.2 -> 37.1, 4096x3584 (7) 42.3 -> 37.6, 4096x3072 (6) 42.0 -> 37.9, 4096x4096 at `--segment 256`
/// (16) 29.5 -> 25.2; with fewer slabs, whose workgroups took 34-39 us without it, none or slower: 4096x2560 (5)
/// 36.8 -> 37.0, 4096x2048 (4) 35.3 -> 36.3, 4096x1024 (2) 35.5 -> 35.8, SmolLM2's 576x1536 (3) 34.3 -> 34.5 and
/// 1536x576 (1) 38.6 -> 39.0. Where an SM must hold two workgroups or more, as if it then held one at a time:
/// 6144x4096 (192 workgroups) 44.0 -> 68.4, 14336x4096 68.7 -> 129.4. Streams that are not split read x a pair of
/// columns a step, and staging them was slower (4096x4096 50.0 -> 52.4, 51.7 as 16-byte pieces).
pub fn stage_x(spec: &Spec, workgroups: usize, cols: usize, compute_units: Option<u32>) -> bool {
    let Some(units) = compute_units else {
        return false;
    };
    spec.split
        && spec.m == 1
        && spec.slabs() >= STAGE_X_MIN_SLABS
        && cols <= STAGED_X_COLS
        && workgroups <= units as usize
}

/// Vectors per workgroup at which [`early_x`] applies to streams that are not split; the most for split ones.
pub const EARLY_X_VECTORS: u32 = 4;

/// Fewest slabs a workgroup for which [`early_x`] applies to split streams.
pub const SPLIT_EARLY_X_MIN_SLABS: u32 = 22;

/// Whether ec_gemv, specialized as `spec` otherwise, loads each loop trip's x before the trip's steps
/// (`Spec::early_x`) for `workgroups` workgroups on a device of `compute_units`: in one row of workgroups (not
/// `grouped`), only where every workgroup has a compute unit to itself, whose few warps otherwise wait on the loads
/// after the steps; for 4-bit streams that are not split at [`EARLY_X_VECTORS`] vectors a workgroup, and for split
/// streams at 2 to [`EARLY_X_VECTORS`] vectors in workgroups of at least [`SPLIT_EARLY_X_MIN_SLABS`] slabs.
///
/// Not split, measured on an H100 (132 SMs), against the loads after the steps in the same process, us at M = 3 / 4:
/// 4096x14336 (28 slabs) 115.3 / 125.9 -> 102.2 / 107.6, 2048x14336 109.8 / 118.0 -> 98.5 / 102.8, 4096x11008 (22
/// slabs) 91.8 / 93.4 -> 96.8 / 87.6; where an SM holds more than one workgroup, slower: 6144x4096 71.5 / 80.0 ->
/// 82.1 / 84.3, 14336x4096 M = 4 122.8 -> 124.6; M = 2 unchanged, M = 8 on 14336x4096 160.1 -> 256.2. Rows of
/// workgroups of 4 vectors each (8 vectors shared out) were not measured, so they keep the loads after the steps.
///
/// Split, measured on an H200 (132 SMs) in one process each (BENCHMARKS.md, "A split block's x loaded before its
/// steps"), us at M = 2 / 3 / 4: 4096x14336 (28 slabs) 66.4 / 77.3 / 83.0 -> 63.4 / 73.5 / 79.3, 2048x14336 65.1 /
/// 76.5 / 81.7 -> 62.2 / 72.7 / 77.7, 4096x11008 (22 slabs) 59.5 / 69.9 / 76.2 -> 59.7 / 64.3 / 71.2; with fewer
/// slabs mixed or slower: 4096x8192 (16) 51.5 / 57.6 / 69.1 -> 53.2 / 65.5 / 61.6, 4096x6144 (12) 48.9 / 62.1 / 66.9
/// -> 46.9 / 64.4 / 78.0, 4096x4096 (8) 48.0 / 46.1 / 63.6 -> 57.8 / 63.1 / 63.6. One vector went both ways
/// (4096x14336 54.0 -> 55.8, 4096x6144 42.7 -> 49.4, 4096x8192 52.2 -> 43.8), so it keeps the loads after the steps.
/// The crate's kernel on 4096x14336 before and after, M = 2 / 3 / 4: H200 66.1 / 77.0 / 82.8 -> 63.6 / 73.4 / 79.3,
/// H100 67.6 / 81.1 / 87.4 -> 65.2 / 76.6 / 83.5. Where each slab holds its trip's x ([`slab_x`], faster still),
/// [`ec_gemv_spec`] leaves this off.
pub fn early_x(spec: &Spec, workgroups: usize, compute_units: Option<u32>) -> bool {
    let Some(units) = compute_units else {
        return false;
    };
    early_x_kind(spec.split, spec.bits, spec.m, spec.slabs()) && !spec.grouped && workgroups <= units as usize
}

/// The part of [`early_x`] that the specialization alone decides: `m` vectors a workgroup of `slabs` slabs, on a
/// stream of `bits`-bit coded symbols, `split` or not.
pub fn early_x_kind(split: bool, bits: u32, m: u32, slabs: u32) -> bool {
    if split {
        (2..=EARLY_X_VECTORS).contains(&m) && slabs >= SPLIT_EARLY_X_MIN_SLABS
    } else {
        bits == 4 && m == EARLY_X_VECTORS
    }
}

/// Slabs a row tile (segments of the row, [`gemv_slabs`]) for which [`row_tile_pairs`] applies.
pub const TILE_PAIR_SLABS: std::ops::RangeInclusive<u32> = 6..=8;

/// Most vectors a workgroup at which [`row_tile_pairs`] applies to rows of `slabs` slabs of a stream that is
/// `split` or not: none outside [`TILE_PAIR_SLABS`], else 4, and at 8 slabs a row tile all 8 on split streams and 7
/// on others. Measured on an H200, one row tile a workgroup against pairs, us at M = 5 / 6 / 7 / 8: 14336x4096
/// split 127.5 / 143.4 / 183.9 / 201.7 -> 98.6 / 104.3 / 123.6 / 143.5, not split 136.7 / 151.3 / 198.5 / 153.9 ->
/// 123.7 / 129.6 / 149.1 / 166.8 (the last in an earlier process, against 154.0); 14336x3072 (6 slabs) split 85.6 /
/// 90.6 / 96.4 / 106.9 -> 88.0 / 83.9 / 107.1 / 107.8, not split 107.7 / 117.6 / 124.9 -> 96.9 / 104.6 / 115.5 at M
/// = 5 / 6 / 7 (BENCHMARKS.md, "Two row tiles a workgroup").
pub fn tile_pair_vectors(slabs: u32, split: bool) -> u32 {
    match (slabs, split) {
        (8, true) => MAX_VECTORS_PER_PASS as u32,
        (8, false) => 7,
        _ if TILE_PAIR_SLABS.contains(&slabs) => 4,
        _ => 0,
    }
}

/// Whether ec_gemv workgroups take two row tiles at a time, `slabs` slabs each (`Spec::tile_pairs`), for
/// `row_tiles` row tiles of a stream (`split` or not) in one row of workgroups (`groups` = 1; at most
/// [`tile_pair_vectors`] vectors, so [`TILE_PAIR_SLABS`] slabs a row tile) on a device of `compute_units` that allows
/// `max_invocations` per workgroup: where the row tiles number more than 2 and at most 4 per compute unit, and the
/// most row tiles a compute unit gets is no more in pairs than one at a time (2 ceil(row_tiles / 2 units) <=
/// ceil(row_tiles / units)). A product ends when the compute units with the most row tiles are done, and with one
/// row tile a workgroup 448 of them on 132 SMs take as long as 528.
///
/// Measured on an H200 (132 SMs; BENCHMARKS.md, "Two row tiles a workgroup"), one row tile a workgroup against
/// pairs, us at M = 1 / 4, split streams: 14336x4096 (448 row tiles) 64.2 / 93.6 -> 59.2 / 83.8, 16896x4096 (528)
/// 64.5 / 92.6 -> 60.0 / 84.1, 13312x4096 (416) 63.2 / 91.6 -> 59.0 / 83.3, 16384x4096 (512) 64.2 / 93.2 -> 59.6 /
/// 83.8, 14336x3072 (6 slabs a row tile) 51.6 / 74.0 -> 49.3 / 74.2; not split 14336x4096 94.0 / 119.6 -> 88.7 /
/// 109.5 (M = 2 and 3 gain too); on an H100, split 14336x4096 64.7 / 93.7 -> 60.4 / 84.3. Left alone: 14336x2048 (4
/// slabs a row tile), 42.3 / 55.2 -> 43.1 / 69.1 in pairs; 12672x4096 (396 row tiles, 3 a unit against 4 in pairs),
/// 50.2 / 73.6 -> 58.8 / 83.6; 4096x4096 (128), 40.4 / 62.6 -> 40.0 / 63.0.
pub fn row_tile_pairs(
    row_tiles: usize,
    slabs: u32,
    m: usize,
    split: bool,
    groups: usize,
    compute_units: Option<u32>,
    max_invocations: u32,
) -> bool {
    let Some(units) = compute_units else {
        return false;
    };
    let units = units as usize;
    groups == 1
        && m <= tile_pair_vectors(slabs, split) as usize
        && 64 * slabs <= max_invocations
        && row_tiles > 2 * units
        && row_tiles <= 4 * units
        && 2 * row_tiles.div_ceil(2 * units) <= row_tiles.div_ceil(units)
}

/// Most vectors a workgroup for which ec_gemv deals tasks out in runs ([`spread_slabs`]).
pub const SPREAD_VECTORS: usize = 4;

/// Slabs a workgroup with which ec_gemv deals a product's tasks (a row tile's segment each, in the order row tile by
/// row tile) out over its workgroups in runs (`Spec::spread`; up to [`SPREAD_VECTORS`] vectors), for `row_tiles` row
/// tiles of `segments` segments that the row-tile form gives `slabs` slabs a row tile (two row tiles a workgroup where
/// `pairs`), on a device of `compute_units` that allows `max_invocations` a workgroup: the tasks over the compute
/// units, rounded up, but at least `segments` (so a row tile lies across two workgroups at most) and at most a
/// workgroup's most slabs; only where that leaves fewer slabs on the busiest compute unit than the row-tile form, whose
/// workgroups hold whole row tiles. None where the device does not say how many compute units it has.
///
/// A product's time follows the most warps a compute unit holds: 14336x4096 (448 row tiles of 8 segments) in pairs
/// puts 32 on 92 of an H200's 132 SMs and 16 on the rest, where 4096x14336 (the same 3584 tasks, 28 a row tile)
/// puts at most 28 on one and runs 12% faster. Measured on an H200 at one vector, split streams of one coded bit,
/// as `--experiments` files with no compute units known (BENCHMARKS.md, "Tasks dealt out in runs"): 14336x4096 in
/// 128 workgroups of 28 slabs, row tiles across two workgroups added as here, 40.9 us against 48.9 for the kernel
/// in one row tile a workgroup and 46.5 for the crate's row-tile pairs; 4096x14336 41.3 against 40.9; at four
/// vectors 73.0 against 71.2 in pairs. With each slab holding its trip's x ([`slab_x`]), measured on an H100 as
/// `--experiments` files (one bit coded, two processes), 14336x4096 at M = 2 / 4: 51.3 / 62.3 and 51.0 / 62.1 us in
/// pairs, 46.5 / 53.5 and 46.5 / 53.8 dealt out; so products of up to [`SPREAD_VECTORS`] vectors are dealt out.
pub fn spread_slabs(
    row_tiles: usize,
    segments: usize,
    slabs: u32,
    pairs: bool,
    compute_units: Option<u32>,
    max_invocations: u32,
) -> Option<u32> {
    let units = (compute_units? as usize).max(1);
    let tasks = row_tiles * segments;
    let spread = tasks.div_ceil(units).max(segments);
    let most = (max_invocations / 32).min(MAX_GEMV_SLABS as u32) as usize;
    let (per, workgroups) =
        if pairs { (2 * slabs as usize, row_tiles.div_ceil(2)) } else { (slabs as usize, row_tiles) };
    let busiest = per * workgroups.div_ceil(units);
    (tasks > 0 && spread <= most && spread < busiest).then_some(spread as u32)
}

/// The ec_gemv specialization for `m` vectors of `stream` on `ctx`'s device, and the rows of workgroups that
/// share out the vectors ([`vector_groups`]; each row takes `spec.m` of them).
pub fn ec_gemv_spec(ctx: &GpuContext, stream: &GpuStream, m: usize) -> (Spec, usize) {
    let l = stream.layout;
    let units = ctx.compute_units();
    let max_invocations = ctx.limits().max_compute_invocations_per_workgroup;
    let slabs = gemv_slabs(l.segments(), max_invocations);
    let groups = vector_groups(l.row_tiles(), slabs, m, units);
    let pairs = row_tile_pairs(l.row_tiles(), slabs, m / groups, stream.split(), groups, units, max_invocations);
    let spread = if groups == 1 && m <= SPREAD_VECTORS {
        spread_slabs(l.row_tiles(), l.segments(), slabs, pairs, units, max_invocations)
    } else {
        None
    };
    let wg_slabs = spread.unwrap_or(slabs * (1 + pairs as u32));
    let spec = Spec {
        split: stream.split(),
        grouped: groups > 1,
        tile_pairs: pairs && spread.is_none(),
        spread: spread.is_some(),
        ..Spec::new(ctx.lane_mode(), l.bits(), stream.precision, (m / groups) as u32, 32 * wg_slabs)
    };
    let workgroups = ec_gemv_workgroups(&spec, &l) * groups;
    let limit = u64::from(ctx.limits().max_compute_workgroup_storage_size);
    let fits = |s: &Spec| workgroup_bytes(Kernel::EcGemv, s) <= limit;
    let staged = Spec { stage_x: stage_x(&spec, workgroups, l.cols(), units), ..spec };
    let spec = if fits(&staged) { staged } else { spec };
    let spec = Spec { digits: integer_dot(&spec, ctx.integer_dot()), ..spec };
    if !spec.stage_x && groups == 1 && (m == 1 || shared_digit_scales(stream.group_size)) {
        let widest = widest_block_cols(ctx, stream, m);
        let device = BlockDevice {
            compute_units: units,
            max_invocations,
            widest,
            fast: ctx.integer_dot(),
            tail_skips: tail_skips(ctx.lane_mode()),
        };
        let blocks = task_blocks(&l, m, stream.split(), &device);
        if let Some(b) = blocks {
            let blocked = Spec {
                workgroup: 32 * (b.tiles * b.per) as u32,
                tile_pairs: false,
                spread: false,
                digits: true,
                block_cols: b.cols,
                seam_tree: b.parts > 2,
                ..spec
            };
            if fits(&blocked) {
                return (blocked, groups);
            }
        }
    }
    let slabbed = Spec { slab_x: slab_x(&spec, ctx.features().contains(wgpu::Features::SUBGROUP_BARRIER)), ..spec };
    let spec = if fits(&slabbed) { slabbed } else { spec };
    (Spec { early_x: !spec.slab_x && early_x(&spec, workgroups, units), ..spec }, groups)
}

/// Columns of each vector that ec_gemv's blocks ([`task_blocks`]) may stage: a part's columns rounded up to one of
/// these (a specialization each).
pub const BLOCK_COLS: [u32; 4] = [1024, 2048, 4096, 8192];

/// Shortest segment, in columns, at which [`task_blocks`] takes blocks for three or four vectors: with shorter
/// segments a slab's few steps do not pay for staging every vector's digits. Measured on an H200 (4096x4096 at
/// 128-column segments, 4096 tiles, 132 SMs; BENCHMARKS.md, "Shorter segments for 4096x4096"): blocks of 2 row tiles
/// by 16 segments took 20.4 and 22.4-22.5 us at three and four vectors against 19.9-20.0 and 20.6-20.8 for the
/// products without digits, and 17.6-17.7 against 18.6-18.7 at two.
pub const BLOCK_MIN_SEGMENT: usize = 256;

/// Most columns of all the vectors together that [`task_blocks`] stages: 32 KiB of digits.
pub const BLOCK_X_COLS: u32 = 8192;

/// The blocks of [`task_blocks`], a slab each of their row tiles' segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskBlocks {
    /// Columns of each vector staged (`Spec::block_cols`).
    pub cols: u32,
    /// Parts of a row: 1 to [`MAX_BLOCK_PARTS`].
    pub parts: usize,
    /// Segments a part (the last part may have fewer).
    pub per: usize,
    /// Row tiles a block.
    pub tiles: usize,
}

/// Most parts of a row that [`task_blocks`] shares a row tile among, which meet in a tree of seam words: 8 hold a
/// 14336-column row in parts of 1792 or 2048 columns, what four vectors' digits take.
pub const MAX_BLOCK_PARTS: usize = 8;

/// The parts of a row of `segments` segments of `segment` columns, and the segments a part, where each part's columns
/// must fit in `cols`, as ec_gemv.wgsl reckons them under BLOCKS: as few parts as hold the row, the segments shared out
/// evenly (the last part may have fewer); None where one segment does not fit, or where the row would take more than
/// [`MAX_BLOCK_PARTS`].
pub fn block_parts(segments: usize, segment: usize, cols: u32) -> Option<(usize, usize)> {
    let most = cols as usize / segment.max(1);
    if most == 0 {
        return None;
    }
    let parts = segments.div_ceil(most).max(1);
    (parts <= MAX_BLOCK_PARTS).then_some((parts, segments.div_ceil(parts)))
}

/// The most columns of each of `m` vectors that ec_gemv's blocks of `stream` may stage on `ctx`'s device: of
/// [`BLOCK_COLS`] within [`BLOCK_X_COLS`], the widest whose workgroup memory ([`workgroup_bytes`]) fits the device in
/// a workgroup of the most slabs; 0 where none does.
pub fn widest_block_cols(ctx: &GpuContext, stream: &GpuStream, m: usize) -> u32 {
    widest_cols(ctx.limits(), ctx.lane_mode(), stream, m)
}

/// [`widest_block_cols`] on a device of `limits` with lanes that cooperate as `lanes`.
fn widest_cols(limits: &wgpu::Limits, lanes: LaneMode, stream: &GpuStream, m: usize) -> u32 {
    let most = (limits.max_compute_invocations_per_workgroup / 32).min(MAX_GEMV_SLABS as u32);
    let base = Spec::new(lanes, stream.layout.bits(), stream.precision, m as u32, 32 * most);
    let limit = u64::from(limits.max_compute_workgroup_storage_size);
    let fits = |cols: u32| {
        let spec = Spec { split: stream.split(), digits: true, block_cols: cols, ..base };
        m as u32 * cols <= BLOCK_X_COLS && workgroup_bytes(Kernel::EcGemv, &spec) <= limit
    };
    BLOCK_COLS.into_iter().filter(|&cols| fits(cols)).max().unwrap_or(0)
}

/// Whether [`task_blocks`] may share a row of layout `l` among more than two parts, where it stages at most `widest`
/// columns a vector ([`widest_block_cols`]): only where two parts of `widest` columns would not hold the row, so that
/// rows that two parts can hold keep one seam word a row and vector ([`seam_bytes`]).
pub fn seam_tree(l: &TileLayout, widest: u32) -> bool {
    widest > 0 && block_parts(l.segments(), l.segment(), widest).is_none_or(|(parts, _)| parts > 2)
}

/// Whether ec_gemv's slabs past the last row tile under blocks of more than two parts ([`task_blocks`], `SEAM_TREE`)
/// skip their steps on lanes that cooperate as `lanes`: with full subgroups, whose steps hold no workgroup barrier.
pub fn tail_skips(lanes: LaneMode) -> bool {
    lanes == LaneMode::SubgroupWide
}

/// What [`task_blocks`] takes of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// Its compute units; None where it does not say (no blocks then).
    pub compute_units: Option<u32>,
    /// Invocations a workgroup it allows.
    pub max_invocations: u32,
    /// Columns of each vector its workgroup memory holds as digits ([`widest_block_cols`]).
    pub widest: u32,
    /// Whether it runs 8-bit dot products as one instruction (no blocks otherwise).
    pub fast: bool,
    /// Whether its slabs past the last row tile skip their steps ([`tail_skips`]).
    pub tail_skips: bool,
}

/// Workgroups of blocks of `tiles` row tiles of layout `l` in `parts` parts of a row: one a block.
fn block_workgroups(l: &TileLayout, parts: usize, tiles: usize) -> usize {
    l.row_tiles().div_ceil(tiles) * parts
}

/// How ec_gemv deals out the tasks (a row tile's segment each) of a product of `m` vectors of a stream of layout
/// `l` (`split` or not) in blocks (`Spec::block_cols`), on `device` ([`BlockDevice`]): blocks of row tiles by the
/// segments of a part of the row ([`block_parts`]), one workgroup a block, each staging its part's columns of every
/// vector as 8-bit digits (as [`integer_dot`] does for a whole vector; [`ec_gemv_spec`] takes blocks for several
/// vectors only where [`shared_digit_scales`] holds); a row tile's parts meet in the seam words, in a tree of them
/// past two parts (`Spec::seam_tree`), which only rows that two parts of the device's widest columns cannot hold take
/// ([`seam_tree`]). Of the column counts in [`BLOCK_COLS`] up to the widest, the one whose blocks put the fewest
/// slabs' steps on the busiest compute unit ([`block_busiest`]; of those, the fewest parts), the row tiles a block
/// the parts of all row tiles over the compute units, rounded up; none below [`DIGITS_MIN_SLABS`] slabs a workgroup
/// or above a workgroup's most. Only for split streams, up to [`SPREAD_VECTORS`] vectors, on devices that say how
/// many compute units they have and run 8-bit dot products as one instruction.
///
/// Where x is read a loop trip at a time (`slab_x`), the digits did not pay: each slab turning its trip's x into digits
/// cost more than the dot products saved (BENCHMARKS.md, "x as 8-bit digits"); a whole vector staged as digits fits
/// only where a row has at most 4096 columns (`stage_x`), and four vectors' digits of 4096 columns are past an NVIDIA
/// workgroup's 48 KiB. Measured on an H200 (132 SMs, split streams of one coded bit, `--experiments` copies, two
/// processes; BENCHMARKS.md, "Blocks of row tiles by segments"), us against the crate's kernel at M = 1 / 2 / 3 / 4:
/// 14336x4096 in 128 blocks of 7 row tiles by 4 segments (2048 columns staged) 33.0 / 34.8 / 39.3 / 47.6 against 31.3 /
/// 44.5 / 49.4 / 51.4 (one vector keeps the whole vector staged); in 112 blocks of 4 by 8 (one part, 4096 columns)
/// 32.0 / 37.6 at M = 1 / 2; in 112 blocks of 8 by 4 35.0 / 38.0 / 45.2 / 53.0. 4096x14336 at M = 1 in 128 blocks of 2
/// row tiles by 14 segments (7168 columns) 31.2 against 35.9 (dense f16 33.7). The crate's kernel with this rule, on
/// the same H200: 14336x4096 31.1-31.3 / 37.2 / 41.5 / 47.8-48.0 (one vector staged whole), 4096x14336 at one vector
/// 31.6-31.7 (dense f16 33.3-33.4). Two vectors' digits of 4096x14336's half rows (7168 columns each) are past 32 KiB;
/// in quarters (128 blocks of 4 row tiles by 7 segments, 4096 columns staged) they took 37.5-37.7 us against 44.3-44.5
/// with x read a trip at a time (three processes each, BENCHMARKS.md, "Rows in more than two parts"). Three and four
/// vectors' parts of 2048 columns are 7 a row in 28 segments of 512, in 133 blocks of 7 row tiles ([`block_busiest`]
/// with `tail_skips`), and 8 a row in 32 segments of 448, in 128 blocks of 8: at four vectors 48.2-48.4 and
/// 44.5-45.0 us, against 50.1-50.4 dealt out in runs (BENCHMARKS.md, "Rows in a power of two of segments").
pub fn task_blocks(l: &TileLayout, m: usize, split: bool, device: &BlockDevice) -> Option<TaskBlocks> {
    let BlockDevice { compute_units, max_invocations, widest, fast, tail_skips } = *device;
    let units = (compute_units? as usize).max(1);
    if !(split && fast && (1..=SPREAD_VECTORS).contains(&m)) || l.row_tiles() == 0 {
        return None;
    }
    if m > 2 && l.segment() < BLOCK_MIN_SEGMENT {
        return None;
    }
    let most = (max_invocations / 32).min(MAX_GEMV_SLABS as u32) as usize;
    let tree = seam_tree(l, widest);
    BLOCK_COLS
        .iter()
        .filter(|&&cols| m as u32 * cols <= BLOCK_X_COLS && cols <= widest)
        .filter_map(|&cols| {
            let (parts, per) = block_parts(l.segments(), l.segment(), cols).filter(|&(p, _)| p <= 2 || tree)?;
            let tiles = (l.row_tiles() * parts).div_ceil(units);
            let slabs = tiles * per;
            let busiest = block_busiest(l, parts, tiles, units, tail_skips)?;
            let fits = (DIGITS_MIN_SLABS as usize..=most).contains(&slabs);
            fits.then_some((TaskBlocks { cols, parts, per, tiles }, busiest * per))
        })
        .min_by_key(|&(b, busiest)| (busiest, b.parts))
        .map(|(b, _)| b)
}

/// The most row tiles whose steps one compute unit of `units` runs under blocks of `tiles` row tiles of layout `l`
/// in `parts` parts of a row, one workgroup a compute unit at a time: `tiles` where the workgroups fit on the units.
/// Where they do not, rows of more than two parts whose slabs past the last row tile skip their steps
/// ([`tail_skips`]) may let the last row of blocks (fewer row tiles) take units a second time, as long as no more
/// workgroups than that row's are left over: twice its row tiles, or `tiles`. None otherwise. Measured on an H200
/// (4096x14336 in 28 segments of 512, four vectors, 7 parts of 4 segments; BENCHMARKS.md, "Rows in a power of two of
/// segments"): 133 workgroups of 7 row tiles, the last row of blocks 2, took 53.4-54.1 us, as did 112 of 8 (53.4);
/// with the tree's meetings of every vector at once, 48.2-48.4 against 50.1-50.2 for the products dealt out in runs.
fn block_busiest(l: &TileLayout, parts: usize, tiles: usize, units: usize, tail_skips: bool) -> Option<usize> {
    let workgroups = block_workgroups(l, parts, tiles);
    let tail = l.row_tiles() % tiles;
    if workgroups <= units {
        Some(tiles)
    } else if tail_skips && parts > 2 && tail > 0 && l.row_tiles() > tiles && workgroups - units <= parts {
        Some(tiles.max(2 * tail))
    } else {
        None
    }
}

/// Whether ec_gemv's digits of several vectors ([`task_blocks`]) may share one scale over each group of
/// `group_size` columns: 32, 64 or 128. Each vector's dot products are then summed as integers over the group and
/// turned into a float once, where one vector's are turned into a float every loop trip; sum(q X) over a group stays
/// within 32 bits with x rounded to 23, 22 or 21 significant bits at the group's largest magnitude (ec_gemv.wgsl,
/// `stage_digits`), and a group's lanes fit one subgroup of 32 for the shuffles that find its largest magnitude and its
/// sum. Products of several vectors whose groups are larger or not a power of two take no blocks. Measured on an H200
/// (14336x4096 in groups of 64, split streams of one coded bit, us, against the same blocks adding a float product a
/// loop trip in the same processes; BENCHMARKS.md, "Digits of a group summed as integers"): four vectors 45.9-46.3
/// against 47.3-47.6, two and three 35.4-35.6 and 40.6 against 35.5-35.7 and 40.7; one vector, which keeps a scale a
/// loop trip, unchanged.
pub fn shared_digit_scales(group_size: usize) -> bool {
    group_size.is_power_of_two() && (32..=128).contains(&group_size)
}

/// Fewest slabs a workgroup for which [`integer_dot`] applies.
pub const DIGITS_MIN_SLABS: u32 = 24;

/// Whether ec_gemv, specialized as `spec` otherwise, stages x as 8-bit digits and takes its products as dot products
/// of packed 8-bit integers (`Spec::digits`): where it stages x ([`stage_x`]) in workgroups of at least
/// [`DIGITS_MIN_SLABS`] slabs, on a device that runs those dot products as one instruction (`fast`,
/// [`GpuContext::integer_dot`]). Each product then takes four weights an instruction, where otherwise each weight
/// takes a shift, a bit operation, a multiply-add and an add, against x rounded to 23 significant bits at the largest
/// magnitude of each loop trip's columns (ec_gemv.wgsl, `stage_digits`); the workgroup pays for turning x into digits
/// before its first product.
///
/// Measured on an H200 (132 SMs) at one vector, split streams of one coded bit, against the same kernel with x staged
/// as f32 (an `--experiments` copy of it in the same process), us: 14336x4096 (28 slabs a workgroup) 35.8 -> 31.9;
/// with fewer slabs, where each warp's chain of steps waits more and the staging delays every one of them, 14336x2048
/// (14) 25.9 -> 24.9, 8192x4096 (16) 27.0 -> 27.4, 4096x4096 (8) 22.4 -> 23.4 and at 256-column segments (16) 16.4 ->
/// 16.9, 2048x4096 (8) 21.7 -> 22.8 (BENCHMARKS.md, "x as 8-bit digits").
pub fn integer_dot(spec: &Spec, fast: bool) -> bool {
    fast && spec.stage_x && spec.slabs() >= DIGITS_MIN_SLABS
}

/// Whether ec_gemv, specialized as `spec` otherwise, has each slab hold its loop trip's x in workgroup memory
/// (`Spec::slab_x`): where it reads x in 16-byte pieces (split streams, and other streams of 4 bits or fewer at several
/// vectors) and not staged whole ([`stage_x`]), where the slab's lanes can wait for each other: with workgroup
/// barriers, or where a slab is one subgroup (`LaneMode::SubgroupWide`) with `subgroup_barrier` (the device has
/// `Features::SUBGROUP_BARRIER`). The caller checks the workgroup memory ([`slab_x_bytes`]) against the device's limit.
/// A slab's lanes then load a trip's M KW 16-byte pieces of x once between them, at most two a lane, where each lane
/// loaded all of them, and the products read them from workgroup memory; on an NVIDIA GPU each load of x carries the
/// driver's bounds check (robust buffer access). Measured on an H100 against x read from global memory (one bit coded,
/// as `--experiments` files, two processes), us at M = 1 / 2 / 4: 4096x14336 42.3 / 51.7 / 69.1 -> 37.9 / 44.3 / 51.9;
/// 4096x4096 (one vector staged whole) 31.2 / 32.7 -> 24.5 / 29.4 at M = 2 / 4; 14336x4096 54.9 / 67.4 -> 50.7 / 62.0
/// at M = 2 / 4; split streams of two coded bits at M = 4: 14336x4096 81.6 -> 75.6, 4096x14336 76.4 -> 68.0, 4096x4096
/// 52.1 -> 39.6; 4-bit streams that are not split at M = 2 / 4 / 8: 14336x4096 82.8 / 103.4 / 138.8 -> 81.2 / 92.6 /
/// 134.1, 4096x14336 91.0 / 95.7 / 123.0 -> 79.9 / 90.6 / 100.9, 4096x4096 55.4 / 59.1 / 74.2 -> 52.0 / 56.3 / 61.5
/// (BENCHMARKS.md, "A loop trip's x held by its slab").
pub fn slab_x(spec: &Spec, subgroup_barrier: bool) -> bool {
    spec.reads_x_pieces() && !spec.stage_x && (spec.lanes != LaneMode::SubgroupWide || subgroup_barrier)
}

/// Workgroup memory of ec_gemv's [`slab_x`] buffers under `spec`: two of a loop trip's x (M KW 16-byte pieces) a
/// slab.
pub fn slab_x_bytes(spec: &Spec) -> u64 {
    2 * spec.slabs() as u64 * (spec.m * spec.weights_per_step()) as u64 * 16
}

/// Bytes of one stored weight row from which q_gemv takes 8 rows by 128 lanes per workgroup (up to 4 vectors):
/// every lane then has at least one 16-byte piece of every row. Measured on an H200 against 4 rows by 64 lanes:
/// 14336x4096 4-bit (2048-byte rows) M = 4 82.1 against 91.1 us, M = 1 back to back 21.7 against 23.3, one M = 1
/// product the same; SmolLM2's 576x1536 (768-byte rows) M = 4 16.6 against 11.8 us, so narrower rows keep 4 by 64.
pub const Q_GEMV_WIDE_ROW_BYTES: usize = 2048;

/// Invocations per workgroup of the row kernels for `m` vectors per workgroup and weight rows of `row_bytes`
/// bytes as stored: 64, but 256 for gemv_f16 at `m` = 1 and 128 for q_gemv at `m` <= 4 on rows of at least
/// [`Q_GEMV_WIDE_ROW_BYTES`].
pub fn row_workgroup(kernel: Kernel, m: u32, row_bytes: usize) -> u32 {
    match kernel {
        Kernel::GemvF16 if m == 1 => 256,
        Kernel::QGemv if m <= 4 && row_bytes >= Q_GEMV_WIDE_ROW_BYTES => 128,
        _ => 64,
    }
}

/// Rows per workgroup pass of a row kernel built under `spec` (the `NR` it is specialized with): q_gemv 8 with
/// 128 lanes, else 4; gemv_f16 2 at `m` = 1, else 4; gemv_f32 1. Each invocation keeps a vec4 of partial sums
/// (a component per row) per quad of up to 4 rows per vector, and every x value it loads serves that many rows.
pub fn rows_per_group(kernel: Kernel, spec: &Spec) -> u32 {
    match kernel {
        Kernel::QGemv if spec.workgroup >= 128 => 8,
        Kernel::QGemv => 4,
        Kernel::GemvF16 if spec.m == 1 => 2,
        Kernel::GemvF16 => 4,
        _ => 1,
    }
}
/// Most vectors one workgroup of ec_gemv or q_gemv keeps accumulators for; more vectors run in blocks.
pub const MAX_VECTORS_PER_PASS: usize = 8;

/// Binding kinds of a layout: `u` uniform, `r` read-only storage, `w` read-write storage.
fn layout_entries(kinds: &str) -> Vec<wgpu::BindGroupLayoutEntry> {
    kinds
        .chars()
        .enumerate()
        .map(|(i, c)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match c {
                    'u' => wgpu::BufferBindingType::Uniform,
                    'r' => wgpu::BufferBindingType::Storage { read_only: true },
                    _ => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect()
}

/// The binding kinds of each group of `kernel`, as in its WGSL file and preambles.
pub(crate) fn group_kinds(kernel: Kernel) -> &'static [&'static str] {
    match kernel {
        // Binding 7 of the tile kernels: a split stream's low words (another of the stream's buffers stands in,
        // unread, for a stream that is not split).
        Kernel::RansDecode => &["urrrrwwr"],
        // Binding 8 of ec_gemv: the seam words of `Spec::spread` (`ec_gemv_weights`).
        Kernel::EcGemv => &["urrrrrrrw", "rw"],
        // x_lanes.wgsl runs on q_gemv's groups; binding 4 of group 1 is the vectors in lane order.
        Kernel::QGemv | Kernel::XLanes => &["urrr", "rwurw"],
        Kernel::GemvF32 | Kernel::GemvF16 => &["ur", "rwur"],
        Kernel::ScaleRows => &["urrww"],
    }
}

/// The bind group layouts of `kernel`, one per group.
pub(crate) fn bind_group_layouts(device: &wgpu::Device, kernel: Kernel) -> Vec<wgpu::BindGroupLayout> {
    group_kinds(kernel)
        .iter()
        .map(|kinds| {
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(kernel.file()),
                entries: &layout_entries(kinds),
            })
        })
        .collect()
}

/// A bind group of `buffers` (whole buffers, in binding order) for group `group` of `kernel`.
pub(crate) fn bind_group(ctx: &GpuContext, kernel: Kernel, group: usize, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
    whole_buffers(ctx, kernel.file(), &ctx.layouts(kernel)[group], buffers)
}

/// A bind group in `layout` of `buffers`, whole, in binding order.
pub(crate) fn whole_buffers(
    ctx: &GpuContext,
    label: &str,
    layout: &wgpu::BindGroupLayout,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
        .collect();
    ctx.device().create_bind_group(&wgpu::BindGroupDescriptor { label: Some(label), layout, entries: &entries })
}

/// Workgroup memory in bytes of `kernel` under `spec`: what the `var<workgroup>` declarations of its WGSL file
/// and preambles add up to (a test holds the two equal), for sizing a decode table's precision against a
/// device's limit before encoding; pipelines are checked against the limit from their source itself.
pub fn workgroup_bytes(kernel: Kernel, spec: &Spec) -> u64 {
    let wg = spec.workgroup as u64;
    let table = 4u64 << spec.precision;
    let lanes = stream_lane_bytes(spec);
    match kernel {
        // A split stream's output staging: `split_stage` pieces of 16 bytes a lane.
        Kernel::RansDecode if spec.split => split_stage_bytes(spec, split_stage(spec)),
        Kernel::RansDecode => table + lanes,
        Kernel::EcGemv => {
            let staged =
                if spec.stage_x { 4 * STAGED_X_COLS as u64 } else { 4 * spec.m as u64 * spec.block_cols as u64 };
            table + lanes + 4 * wg + staged + if spec.slab_x { slab_x_bytes(spec) } else { 0 }
        }
        Kernel::GemvF32 => 4 * wg,
        Kernel::XLanes | Kernel::ScaleRows => 0,
        // rows.wgsl's sums, a quad of up to 4 rows at a time.
        Kernel::QGemv | Kernel::GemvF16 => 4 * wg * rows_per_group(kernel, spec).min(4) as u64,
    }
}

/// Workgroup memory of lanes.wgsl's word ranks under `spec`.
fn stream_lane_bytes(spec: &Spec) -> u64 {
    match spec.lanes {
        LaneMode::Portable => 3 * spec.slabs() as u64 * 4,
        LaneMode::SubgroupNarrow => 2 * (spec.workgroup as u64 / 4) * 4,
        LaneMode::SubgroupWide => 0,
    }
}

/// Workgroup memory every device the crate targets allows (Apple GPUs' 32 KiB).
pub const PORTABLE_WORKGROUP_BYTES: u64 = 32 << 10;

/// 16-byte pieces each lane of rans_decode stages for a split stream under `spec` (its `STAGE`): 4, or 2 where 4
/// would take the workgroup past [`PORTABLE_WORKGROUP_BYTES`] (a 16 KiB table at P = 12, or 16 slabs).
pub fn split_stage(spec: &Spec) -> u32 {
    if split_stage_bytes(spec, 4) <= PORTABLE_WORKGROUP_BYTES {
        4
    } else {
        2
    }
}

/// Workgroup memory of rans_decode for a split stream under `spec` with `stage` pieces a lane: the decode table,
/// the lane mode's own, and the staged pieces.
fn split_stage_bytes(spec: &Spec, stage: u32) -> u64 {
    (4u64 << spec.precision) + stream_lane_bytes(spec) + 16 * stage as u64 * spec.workgroup as u64
}

/// Workgroups along x that give every row of a row kernel one workgroup pass: one per row block of
/// [`rows_per_group`] rows (one row for gemv_f32), for a pipeline built under `spec`.
pub fn row_blocks(kernel: Kernel, spec: &Spec, rows: usize) -> usize {
    rows.div_ceil(rows_per_group(kernel, spec) as usize)
}

/// Workgroups for `units` units of work along one grid dimension: every unit gets one, up to the device's
/// per-dimension limit, past which the kernels' grid-stride loops take over.
fn grid(ctx: &GpuContext, units: usize) -> u32 {
    units.min(ctx.limits().max_compute_workgroups_per_dimension as usize).max(1) as u32
}

/// An encoded stream on the device: what the tile kernels read.
pub struct GpuStream {
    layout: TileLayout,
    group_size: usize,
    precision: u32,
    /// `StreamParams` of wgsl/lanes.wgsl.
    params: wgpu::Buffer,
    words: wgpu::Buffer,
    tile_offsets: wgpu::Buffer,
    states: wgpu::Buffer,
    decode_table: wgpu::Buffer,
    /// A split stream's low words (docs/FORMAT.md, section 2.1).
    low: Option<wgpu::Buffer>,
}

impl GpuStream {
    /// Uploads the stream of `tensor`: its 16-bit words two to a `u32`, tile offsets, states, decode table and,
    /// for a split tensor, its low words.
    pub fn upload(ctx: &GpuContext, tensor: &EcTensor) -> Result<Self> {
        let layout = *tensor.layout();
        check_gpu_shape(tensor)?;
        let s = tensor.stream();
        // Whole u32s, then two zero u32s of padding: the register windows of lanes.wgsl clamp a window's index once
        // and so may cover the last two u32s of the buffer shifted.
        let mut words = s.words.clone();
        words.resize(words.len().next_multiple_of(2) + 4, 0);
        // Padded to 16 bytes: the tile kernels read the table as vec4<u32>.
        let mut decode_table = tensor.table().decode_table();
        decode_table.resize(decode_table.len().next_multiple_of(4), 0);
        let params = [
            layout.rows() as u32,
            layout.cols() as u32,
            layout.segment() as u32,
            layout.segments() as u32,
            layout.row_tiles() as u32,
            layout.tiles() as u32,
            tensor.group_size() as u32,
            (layout.cols() * tensor.bits() as usize / 32) as u32,
        ];
        let none = wgpu::BufferUsages::empty();
        let low = match tensor.low() {
            Some(low) => Some(ctx.storage_init("split low words", bytemuck::cast_slice(low), none)?),
            None => None,
        };
        Ok(Self {
            layout,
            group_size: tensor.group_size(),
            precision: tensor.table().precision(),
            params: ctx.uniform("ecq stream params", &params)?,
            words: ctx.storage_init("stream words", bytemuck::cast_slice(&words), none)?,
            tile_offsets: ctx.storage_init("tile offsets", bytemuck::cast_slice(&s.tile_offsets), none)?,
            states: ctx.storage_init("tile states", bytemuck::cast_slice(&s.states), none)?,
            decode_table: ctx.storage_init("decode table", bytemuck::cast_slice(&decode_table), none)?,
            low,
        })
    }

    /// The tile layout of the coded symbols.
    pub fn layout(&self) -> &TileLayout {
        &self.layout
    }

    /// Bits per weight of the decoded symbols: the layout's, or 4 for a split stream.
    pub fn bits(&self) -> u32 {
        if self.split() {
            crate::rans::SPLIT_BITS
        } else {
            self.layout.bits()
        }
    }

    /// Whether the stream is split (its low bits stored as they are).
    pub fn split(&self) -> bool {
        self.low.is_some()
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> u64 {
        let low = self.low.as_ref().map_or(0, |b| b.size());
        self.words.size() + self.tile_offsets.size() + self.states.size() + self.decode_table.size() + low
    }

    /// Bytes of the packed symbols this stream decodes to.
    pub fn packed_bytes(&self) -> u64 {
        (self.layout.rows() * self.layout.cols() * self.bits() as usize / 8) as u64
    }

    /// Binding 7 of the tile kernels: the low words, or a buffer that stands in for them unread.
    fn low_binding(&self) -> &wgpu::Buffer {
        self.low.as_ref().unwrap_or(&self.states)
    }
}

/// What the GPU paths need of a tensor beyond [`EcTensor`]'s own invariants: packed rows and segments that
/// start on whole `u32` words, groups of whole 32-symbol chunks, and sizes that fit 32-bit indices.
pub fn check_gpu_shape(tensor: &EcTensor) -> Result<()> {
    let l = tensor.layout();
    if tensor.group_size() % 32 != 0 {
        return Err(Error::param(
            "group_size",
            format!("the GPU kernels need a multiple of 32, got {}; use the CPU path", tensor.group_size()),
        ));
    }
    mlx_words_per_row(l.cols(), tensor.bits())?;
    if l.rows() * l.cols() >= 1 << 32 || tensor.stream().words.len() >= 1 << 32 {
        return Err(Error::param("shape", "more than 2^32 weights or words; split the tensor along its rows"));
    }
    Ok(())
}

/// The order of the groups in a [`GpuScales`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleOrder {
    /// Row-major, `rows x cols / group_size`, as the tensor holds them: what q_gemv and the Metal kernel read.
    Rows,
    /// Tile order, what ec_gemv.wgsl reads: by row tile, then segment, then row of the row tile, then group of the
    /// segment ([`tile_scale_index`]), so the 32 rows of a tile have their segment's groups side by side. A slab
    /// (one tile) then reads its scales as one contiguous run at its first group, and its later groups from the
    /// same lines, where the row-major order spreads each of them over 32 rows' lines. Measured on an H100 against
    /// row-major scales (one bit coded, the two binaries alternated twice): M = 1 42.8 -> 38.9 us on 14336x4096,
    /// 24.1 -> 23.1 on 4096x4096, 42.2 -> 42.0 on 4096x14336; M = 4 73.2 -> 67.6, 42.4 -> 33.0, 70.6 -> 68.2
    /// (BENCHMARKS.md, "Scales in tile order").
    Tiles,
}

/// Where group `group` of row `row` lies in the tile order of [`ScaleOrder::Tiles`] for layout `l`, with
/// `per_segment` groups to a segment: row tile, segment, row of the tile, group of the segment. Rows past the
/// last and groups past the last segment's end are padding.
pub fn tile_scale_index(l: &TileLayout, per_segment: usize, row: usize, group: usize) -> usize {
    ((row / 32 * l.segments() + group / per_segment) * 32 + row % 32) * per_segment + group % per_segment
}

/// Per-group scales and biases on the device, as `f32`, in one of two orders ([`ScaleOrder`]).
pub struct GpuScales {
    scales: wgpu::Buffer,
    biases: wgpu::Buffer,
    /// Scales a row-major copy holds: rows times groups a row.
    len: u64,
    /// In tile order (and only there): the uniform of scale_rows.wgsl, which takes them back to rows
    /// ([`Self::to_rows`]): rows, groups a row, segments a row, groups a segment.
    rows_params: Option<wgpu::Buffer>,
}

impl GpuScales {
    /// Uploads the scales and biases of `tensor`, row-major ([`ScaleOrder::Rows`]), for q_gemv and the Metal
    /// kernel.
    pub fn upload(ctx: &GpuContext, tensor: &EcTensor) -> Result<Self> {
        Self::upload_as(ctx, tensor.scales(), tensor.biases(), tensor.scales().len(), None)
    }

    /// Uploads the scales and biases of `tensor` in tile order ([`ScaleOrder::Tiles`]), for ec_gemv.wgsl
    /// ([`ec_gemv_weights`]).
    pub fn upload_tiles(ctx: &GpuContext, tensor: &EcTensor) -> Result<Self> {
        let l = tensor.layout();
        let group_size = tensor.group_size().max(1);
        let (rows, groups, segments, per_segment) =
            (l.rows(), l.cols() / group_size, l.segments(), l.segment() / group_size);
        let len = l.row_tiles() * 32 * segments * per_segment;
        let (mut scales, mut biases) = (vec![0f32; len], vec![0f32; len]);
        for row in 0..rows {
            for group in 0..groups {
                let i = tile_scale_index(l, per_segment, row, group);
                scales[i] = tensor.scales()[row * groups + group];
                biases[i] = tensor.biases()[row * groups + group];
            }
        }
        let params = ctx.uniform("ecq scale_rows params", &[rows, groups, segments, per_segment].map(|v| v as u32))?;
        Self::upload_as(ctx, &scales, &biases, rows * groups, Some(params))
    }

    fn upload_as(
        ctx: &GpuContext,
        scales: &[f32],
        biases: &[f32],
        len: usize,
        rows_params: Option<wgpu::Buffer>,
    ) -> Result<Self> {
        let none = wgpu::BufferUsages::empty();
        Ok(Self {
            scales: ctx.storage_init("scales", bytemuck::cast_slice(scales), none)?,
            biases: ctx.storage_init("biases", bytemuck::cast_slice(biases), none)?,
            len: len as u64,
            rows_params,
        })
    }

    /// The order of the groups.
    pub fn order(&self) -> ScaleOrder {
        if self.rows_params.is_some() {
            ScaleOrder::Tiles
        } else {
            ScaleOrder::Rows
        }
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> u64 {
        self.scales.size() + self.biases.size() + self.rows_params.as_ref().map_or(0, |p| p.size())
    }

    /// The same scales and biases row-major ([`ScaleOrder::Rows`]), for q_gemv: these buffers where they are
    /// row-major already, else new ones that scale_rows.wgsl, recorded into `pass`, fills from the tile order.
    pub fn to_rows(&self, ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>) -> Result<GpuScales> {
        let n = self.len;
        let Some(params) = &self.rows_params else {
            // Row-major already.
            return Ok(GpuScales {
                scales: self.scales.clone(),
                biases: self.biases.clone(),
                len: n,
                rows_params: None,
            });
        };
        let rows = GpuScales {
            scales: ctx.storage("scales", 4 * n, wgpu::BufferUsages::empty())?,
            biases: ctx.storage("biases", 4 * n, wgpu::BufferUsages::empty())?,
            len: n,
            rows_params: None,
        };
        if n == 0 {
            return Ok(rows);
        }
        let spec = Spec::new(ctx.lane_mode(), 0, 0, 1, SCALE_ROWS_WORKGROUP);
        pass.set_pipeline(&ctx.pipeline(Kernel::ScaleRows, spec)?);
        let group =
            bind_group(ctx, Kernel::ScaleRows, 0, &[params, &self.scales, &self.biases, &rows.scales, &rows.biases]);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(grid(ctx, n.div_ceil(u64::from(SCALE_ROWS_WORKGROUP)) as usize), 1, 1);
        Ok(rows)
    }
}

/// Invocations per workgroup of scale_rows.wgsl.
pub const SCALE_ROWS_WORKGROUP: u32 = 256;

/// MLX-packed symbols on the device: each row a little-endian bit stream in `u32` words.
pub struct GpuPacked {
    rows: usize,
    cols: usize,
    bits: u32,
    /// `PackedParams` of q_gemv.wgsl.
    params: wgpu::Buffer,
    packed: wgpu::Buffer,
}

impl GpuPacked {
    /// Allocates room for the symbols `stream` decodes to (filled by [`rans_decode`]).
    pub fn for_stream(ctx: &GpuContext, stream: &GpuStream) -> Result<Self> {
        let l = stream.layout;
        let bits = stream.bits();
        let params =
            [l.rows() as u32, l.cols() as u32, stream.group_size as u32, (l.cols() * bits as usize / 32) as u32];
        Ok(Self {
            rows: l.rows(),
            cols: l.cols(),
            bits,
            params: ctx.uniform("ecq packed params", &params)?,
            // Padded to 16 bytes: q_gemv reads the words as vec4<u32>.
            packed: ctx.storage(
                "packed symbols",
                stream.packed_bytes().next_multiple_of(16),
                wgpu::BufferUsages::COPY_SRC,
            )?,
        })
    }

    /// The packed words' buffer (`rows * cols * bits / 32` words).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.packed
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> u64 {
        self.packed.size()
    }

    /// Copies the packed words back to the host (for checks).
    pub fn read(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        let bytes = (self.rows * self.cols * self.bits as usize / 8) as u64;
        let data = ctx.read_back(&self.packed, bytes)?;
        Ok(bytemuck::pod_collect_to_vec(&data))
    }
}

/// Records the tile decode of `stream` into `out` (which [`GpuPacked::for_stream`] sized). Tiles that fail the
/// end-state or word-count check are counted in `status[0]`, the lowest in `status[1]` (the caller sets
/// `status` to `[0, u32::MAX]` first).
///
/// Grid: `ceil(tiles / slabs)` workgroups of 32 lanes a slab ([`decode_workgroup`]: 8 slabs, or 16 for a large
/// split stream), capped at the dimension limit; the kernel loops over the rest.
pub fn rans_decode(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    stream: &GpuStream,
    out: &GpuPacked,
    status: &wgpu::Buffer,
) -> Result<()> {
    let spec = rans_decode_spec(ctx, stream);
    let pipeline = ctx.pipeline(Kernel::RansDecode, spec)?;
    rans_decode_with(ctx, pass, stream, out, status, &pipeline, spec.slabs() as usize)
}

/// The spec [`rans_decode`] builds its pipeline with for `stream` on `ctx`.
pub fn rans_decode_spec(ctx: &GpuContext, stream: &GpuStream) -> Spec {
    let l = stream.layout;
    let spec =
        Spec { split: stream.split(), ..Spec::new(ctx.lane_mode(), l.bits(), stream.precision, 1, TILE_WORKGROUP) };
    Spec { workgroup: decode_workgroup(&spec, l.tiles(), ctx.limits().max_compute_invocations_per_workgroup), ..spec }
}

/// Invocations per rans_decode workgroup for `tiles` tiles under `spec` (whose own workgroup is ignored) on a
/// device that allows `max_invocations`: [`SPLIT_TILE_WORKGROUP`] for a split stream of at least
/// [`SPLIT_WIDE_TILES`] tiles where the device allows it and its workgroup memory stays within
/// [`PORTABLE_WORKGROUP_BYTES`], else [`TILE_WORKGROUP`].
pub fn decode_workgroup(spec: &Spec, tiles: usize, max_invocations: u32) -> u32 {
    let wide = Spec { workgroup: SPLIT_TILE_WORKGROUP, ..*spec };
    let fits = workgroup_bytes(Kernel::RansDecode, &wide) <= PORTABLE_WORKGROUP_BYTES;
    if spec.split && tiles >= SPLIT_WIDE_TILES && max_invocations >= SPLIT_TILE_WORKGROUP && fits {
        SPLIT_TILE_WORKGROUP
    } else {
        TILE_WORKGROUP
    }
}

/// A pipeline of `kernel` under `spec` built, uncached, from its WGSL source passed through `edit`: for
/// benchmarks that time variants of a kernel with one part changed or left out (what an edited kernel writes
/// is whatever the edit makes it). It binds the kernel's usual bind groups and is built as the crate's own
/// kernels are (no loop counters, bounds checks on), so every loop of the edited source must end by itself.
pub fn edited_pipeline(
    ctx: &GpuContext,
    kernel: Kernel,
    spec: Spec,
    edit: impl Fn(String) -> String,
) -> Result<wgpu::ComputePipeline> {
    build_edited(ctx, kernel, spec, edit, true)
}

/// [`edited_pipeline`] without naga's bounds checks, for timing what they cost.
///
/// # Safety
/// Every index the edited source computes, from any data it is run on, must lie within its array: nothing
/// clamps them.
pub unsafe fn edited_pipeline_without_bounds_checks(
    ctx: &GpuContext,
    kernel: Kernel,
    spec: Spec,
    edit: impl Fn(String) -> String,
) -> Result<wgpu::ComputePipeline> {
    build_edited(ctx, kernel, spec, edit, false)
}

fn build_edited(
    ctx: &GpuContext,
    kernel: Kernel,
    spec: Spec,
    edit: impl Fn(String) -> String,
    bounds_checks: bool,
) -> Result<wgpu::ComputePipeline> {
    let source = edit(super::shaders::source(kernel, &spec));
    ctx.build_pipeline(kernel, "edited kernel", source, bounds_checks)
        .map_err(|e| Error::Gpu(format!("building an edited {} failed: {e}", kernel.file())))
}

/// A pipeline of `kernel` under `spec` from SPIR-V words compiled from the WGSL `source` some other way than wgpu's
/// own (e.g. by naga, its instructions then rewritten), through the driver's passthrough path: for benchmarks that
/// time what a driver makes of other SPIR-V for the same kernel. The device must have been opened with
/// `PASSTHROUGH_SHADERS` ([`GpuContext::with_features`]); a source that declares more workgroup memory than the device
/// allows is refused, as for every pipeline.
///
/// # Safety
/// `words` must be a valid SPIR-V module compiled from `source`, with a compute entry point `main` of
/// `spec.workgroup` invocations that binds what `kernel`'s bind groups hold, and every index it computes, from any
/// data it is run on, must lie within its array: wgpu checks none of it.
pub unsafe fn spirv_pipeline(
    ctx: &GpuContext,
    kernel: Kernel,
    spec: Spec,
    source: &str,
    words: &[u32],
) -> Result<wgpu::ComputePipeline> {
    // SAFETY: the caller's obligation, stated above.
    unsafe { ctx.build_spirv_pipeline(kernel, "spirv kernel", source, words, spec.workgroup) }
        .map_err(|e| Error::Gpu(format!("building a SPIR-V {} failed: {e}", kernel.file())))
}

/// [`rans_decode`] with a given pipeline (its own, or one from [`edited_pipeline`]) that decodes
/// `tiles_per_group` tiles per workgroup (its own: 8).
pub fn rans_decode_with(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    stream: &GpuStream,
    out: &GpuPacked,
    status: &wgpu::Buffer,
    pipeline: &wgpu::ComputePipeline,
    tiles_per_group: usize,
) -> Result<()> {
    let l = stream.layout;
    if out.rows != l.rows() || out.cols != l.cols() || out.bits != stream.bits() {
        return Err(Error::param("out", "packed buffer was sized for another stream"));
    }
    if l.tiles() == 0 {
        return Ok(());
    }
    let group = bind_group(
        ctx,
        Kernel::RansDecode,
        0,
        &[
            &stream.params,
            &stream.words,
            &stream.tile_offsets,
            &stream.states,
            &stream.decode_table,
            &out.packed,
            status,
            stream.low_binding(),
        ],
    );
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &group, &[]);
    pass.dispatch_workgroups(grid(ctx, l.tiles().div_ceil(tiles_per_group.max(1))), 1, 1);
    Ok(())
}

/// Decodes `stream` into a new packed buffer and waits, checking every tile.
pub fn decode_to_packed(ctx: &GpuContext, stream: &GpuStream) -> Result<GpuPacked> {
    let out = GpuPacked::for_stream(ctx, stream)?;
    decode_into(ctx, stream, &out)?;
    Ok(out)
}

/// Decodes `stream` into `out` (from [`GpuPacked::for_stream`]) and waits; a tile that fails its end-state or
/// word-count check gives [`Error::CorruptStream`] naming the lowest such tile.
pub fn decode_into(ctx: &GpuContext, stream: &GpuStream, out: &GpuPacked) -> Result<()> {
    let status =
        ctx.storage_init("decode status", bytemuck::cast_slice(&[0u32, u32::MAX]), wgpu::BufferUsages::COPY_SRC)?;
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    rans_decode(ctx, &mut encoder.begin_compute_pass(&Default::default()), stream, out, &status)?;
    ctx.submit_and_wait(encoder)?;
    let status: Vec<u32> = bytemuck::pod_collect_to_vec(&ctx.read_back(&status, 8)?);
    if status[0] != 0 {
        return Err(Error::CorruptStream {
            tile: status[1] as usize,
            reason: format!("{} tile check(s) failed on the GPU (end states or word counts)", status[0]),
        });
    }
    Ok(())
}

/// Bytes of the seam words that [`ec_gemv_weights`] holds for `stream` on `ctx`'s device: one u32 a row of every row
/// tile for each of [`SPREAD_VECTORS`] vectors (for [`spread_slabs`] and [`task_blocks`]), times the meetings of a
/// row's parts under the blocks with the most parts that [`task_blocks`] could take for its layout on the device,
/// with any lane mode a context of the device may take (one less than the parts; one where no blocks have more than
/// two, [`seam_tree`]).
pub fn seam_bytes(ctx: &GpuContext, stream: &GpuStream) -> u64 {
    let l = &stream.layout;
    let lanes = [LaneMode::Portable, LaneMode::SubgroupWide, LaneMode::SubgroupNarrow];
    let widest = lanes.into_iter().flat_map(|lane| {
        (1..=SPREAD_VECTORS).map(move |m| widest_cols(ctx.limits(), lane, stream, m)).filter(|&w| seam_tree(l, w))
    });
    let parts = widest.flat_map(|widest| {
        let cols = BLOCK_COLS.into_iter().filter(move |&cols| cols <= widest);
        cols.filter_map(|cols| block_parts(l.segments(), l.segment(), cols))
    });
    let meetings = parts.map(|(p, _)| p).max().unwrap_or(1).max(2) - 1;
    4 * (SPREAD_VECTORS * l.row_tiles() * 32 * meetings).max(1) as u64
}

/// The group-0 bind group of ec_gemv for one weight, whose scales must be in tile order
/// ([`GpuScales::upload_tiles`]): with the seam words that tasks dealt out in runs or in blocks need
/// ([`spread_slabs`], [`task_blocks`]), all bits set ([`seam_bytes`]). They are there whether or not a context deals this
/// stream's tasks out, so that any context on the device can record its products.
pub fn ec_gemv_weights(ctx: &GpuContext, stream: &GpuStream, scales: &GpuScales) -> Result<wgpu::BindGroup> {
    if scales.order() != ScaleOrder::Tiles {
        return Err(Error::param(
            "scales",
            "ec_gemv reads scales in tile order: upload them with GpuScales::upload_tiles",
        ));
    }
    let seams =
        ctx.storage_init("ecq seams", &vec![0xff; seam_bytes(ctx, stream) as usize], wgpu::BufferUsages::empty())?;
    Ok(bind_group(
        ctx,
        Kernel::EcGemv,
        0,
        &[
            &stream.params,
            &stream.words,
            &stream.tile_offsets,
            &stream.states,
            &stream.decode_table,
            &scales.scales,
            &scales.biases,
            stream.low_binding(),
            &seams,
        ],
    ))
}

/// Records the fused GEMV of `m` (1..=8) vectors: `weights` from [`ec_gemv_weights`], `io` a group-1 bind
/// group of `x` (`m x cols` f32) and `y` (`m x rows` f32) from [`io_bind_group`].
///
/// Grid: one workgroup per row tile of 32 rows, or per pair of them ([`row_tile_pairs`]), capped at the dimension
/// limit (the kernel loops over the rest), by [`vector_groups`] rows, each taking its share of the vectors. A row
/// tile has [`gemv_slabs`] slabs of 32 lanes (about one per segment, up to 32); slab `s` decodes segments `s`,
/// `s + slabs`, ... Where the tasks are dealt out in runs ([`spread_slabs`]) or blocks ([`task_blocks`]), one
/// workgroup a run or block ([`ec_gemv_workgroups`]). The specialization is [`ec_gemv_spec`]'s.
pub fn ec_gemv(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    stream: &GpuStream,
    weights: &wgpu::BindGroup,
    io: &wgpu::BindGroup,
    m: usize,
) -> Result<()> {
    if !(1..=MAX_VECTORS_PER_PASS).contains(&m) {
        return Err(Error::param("m", format!("ec_gemv takes 1..={MAX_VECTORS_PER_PASS} vectors, got {m}")));
    }
    let l = stream.layout;
    let (spec, groups) = ec_gemv_spec(ctx, stream, m);
    let pipeline = ctx.pipeline(Kernel::EcGemv, spec)?;
    if l.rows() == 0 {
        return Ok(());
    }
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, weights, &[]);
    pass.set_bind_group(1, io, &[]);
    pass.dispatch_workgroups(grid(ctx, ec_gemv_workgroups(&spec, &l)), groups as u32, 1);
    Ok(())
}

/// Workgroups in one row of an ec_gemv grid under `spec` for a stream of layout `l`: one a row tile, or a pair, or
/// with `spread` one a run of `spec.slabs()` tasks, or with `block_cols` one a block ([`task_blocks`]: its row tiles
/// by one part's segments).
pub fn ec_gemv_workgroups(spec: &Spec, l: &TileLayout) -> usize {
    if spec.block_cols > 0 {
        // `block_parts` is Some for every spec that `task_blocks` gives.
        let (parts, per) = block_parts(l.segments(), l.segment(), spec.block_cols).unwrap_or((1, l.segments()));
        block_workgroups(l, parts, (spec.slabs() as usize / per.max(1)).max(1))
    } else if spec.spread {
        (l.row_tiles() * l.segments()).div_ceil(spec.slabs() as usize)
    } else if spec.tile_pairs {
        l.row_tiles().div_ceil(2)
    } else {
        l.row_tiles()
    }
}

/// The group-0 bind group of q_gemv for one weight.
pub fn q_gemv_weights(ctx: &GpuContext, packed: &GpuPacked, scales: &GpuScales) -> Result<wgpu::BindGroup> {
    if scales.order() != ScaleOrder::Rows {
        return Err(Error::param("scales", "q_gemv reads scales row-major: GpuScales::upload, or to_rows"));
    }
    Ok(bind_group(ctx, Kernel::QGemv, 0, &[&packed.params, &packed.packed, &scales.scales, &scales.biases]))
}

/// A group-1 bind group of `x`, `y` and, for the row kernels, the call's uniform from [`call_params`] and `x`
/// again as 16-byte vectors (its whole 16-byte multiples; the kernels read that view only where every vector
/// starts on 16 bytes); for q_gemv also `xl`, the room for the vectors in lane order where [`lane_x`] says
/// q_gemv reads them so (from [`lane_x_room`]; elsewhere None, and `y` stands in, unread).
pub fn io_bind_group(
    ctx: &GpuContext,
    kernel: Kernel,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    call: Option<&wgpu::Buffer>,
    xl: Option<&wgpu::Buffer>,
) -> wgpu::BindGroup {
    let Some(c) = call else {
        return bind_group(ctx, kernel, 1, &[x, y]);
    };
    // A vector view needs at least 16 bytes; a smaller x is never read through it, so any buffer will do.
    let small;
    let (x4, size) = if x.size() >= 16 {
        (x, x.size() / 16 * 16)
    } else {
        small = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("ecq unused x view"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        (&small, 16)
    };
    let x4_binding = wgpu::BufferBinding { buffer: x4, offset: 0, size: wgpu::BufferSize::new(size) };
    let mut entries = vec![
        wgpu::BindGroupEntry { binding: 0, resource: x.as_entire_binding() },
        wgpu::BindGroupEntry { binding: 1, resource: y.as_entire_binding() },
        wgpu::BindGroupEntry { binding: 2, resource: c.as_entire_binding() },
        wgpu::BindGroupEntry { binding: 3, resource: wgpu::BindingResource::Buffer(x4_binding) },
    ];
    if kernel == Kernel::QGemv {
        entries.push(wgpu::BindGroupEntry { binding: 4, resource: xl.unwrap_or(y).as_entire_binding() });
    }
    ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(kernel.file()),
        layout: &ctx.layouts(kernel)[1],
        entries: &entries,
    })
}

/// Products of at least this many weights times vectors read x in lane order (with 3 vectors or more).
pub const LANE_X_MIN_WORK: usize = 1 << 26;

/// Whether q_gemv of `m` vectors on a `rows` x `cols` weight of `bits`-bit symbols reads x in lane order
/// (`XLANES`, on its word path; then the io group needs room for them, [`io_bind_group`]'s `xl`, and [`q_gemv`]
/// runs x_lanes.wgsl first): with at least 3 vectors and more than [`LANE_X_MIN_WORK`] weights times
/// vectors. Reading x in place, each of a warp's x loads touches 32 lines; in lane order, consecutive 16-byte
/// pieces, at the price of one more dispatch (x_lanes.wgsl) that q_gemv waits for. Measured on an H200, back to
/// back, against reading in place (BENCHMARKS.md, "x in lane order"): 3 vectors 38.7 against 43.8 us
/// (14336x4096), 34.7 against 46.9 (4096x14336), 19.0 against 19.3 (4096x4096); 8 vectors 78.8 against 97.5,
/// 67.3 against 82.9, 28.6 against 32.5; but 2 vectors on 4096x4096 13.5 against 11.1 and 4 on 4096x4096 18.7
/// against 18.2, where the wait costs more than the loads save, so those keep x in place.
pub fn lane_x(bits: u32, rows: usize, cols: usize, m: usize) -> bool {
    m >= 3
        && rows.saturating_mul(cols).saturating_mul(m) > LANE_X_MIN_WORK
        && bits > 0
        && 32 % bits == 0
        && mlx_words_per_row(cols, bits).is_ok_and(|w| w % 4 == 0)
}

/// Room for `m` vectors of `cols` in lane order, for [`io_bind_group`]'s `xl`.
pub fn lane_x_room(ctx: &GpuContext, m: usize, cols: usize) -> Result<wgpu::Buffer> {
    ctx.storage("ecq x in lane order", (m * cols * 4).max(16) as u64, wgpu::BufferUsages::empty())
}

/// The uniform `CallParams` of the row kernels for `m` vectors.
pub fn call_params(ctx: &GpuContext, m: usize) -> Result<wgpu::Buffer> {
    ctx.uniform("ecq call params", &[m as u32, 0, 0, 0])
}

/// Vectors per workgroup of `kernel` for `m` vectors (the grid's y covers the blocks of that many): the dense
/// kernels all of them up to 8, else blocks of 8; q_gemv up to 3 in one block, more in blocks of 2. q_gemv's
/// accumulators for many vectors cost it more than reading the weights once per block: measured on an H200 (one
/// dispatch timed by its pass, one block against blocks of 2), 4 vectors 77.2 -> 62.0 us and 8 vectors 274.6 ->
/// 107.3 on 14336x4096, 66.0 -> 52.8 and 214.1 -> 92.4 on 4096x14336, 27.7 -> 21.5 and 72.4 -> 35.7 on 4096x4096;
/// 3 vectors as one block of 2 and one of 1 were slower on 14336x4096 (52.4 -> 62.0) and faster on the other two
/// (56.2 -> 52.5, 25.0 -> 21.5), so 3 stay one block. (5 to 7 vectors were not measured.)
pub fn vectors_per_pass(kernel: Kernel, m: usize) -> u32 {
    let most = match kernel {
        Kernel::QGemv if m <= 3 => 3,
        Kernel::QGemv => 2,
        _ => MAX_VECTORS_PER_PASS,
    };
    m.clamp(1, most) as u32
}

/// Records the quantized GEMV (or matmul) of `m` vectors on packed symbols: `weights` from
/// [`q_gemv_weights`], `io` from [`io_bind_group`] with the uniform of [`call_params`] for the same `m` and, where
/// [`lane_x`] holds, room for the vectors in lane order, which x_lanes.wgsl fills first (one more
/// dispatch in the same pass; wgpu orders the two).
///
/// Grid: x = one workgroup per row block ([`row_blocks`]: 8 rows by 128 lanes on rows of at least
/// [`Q_GEMV_WIDE_ROW_BYTES`], else 4 rows by 64; capped, the kernel loops over the rest), y = one block of up
/// to 3 vectors, or `ceil(m / 2)` blocks of 2 for more (see [`vectors_per_pass`]).
pub fn q_gemv(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    packed: &GpuPacked,
    weights: &wgpu::BindGroup,
    io: &wgpu::BindGroup,
    m: usize,
) -> Result<()> {
    let row_bytes = mlx_words_per_row(packed.cols, packed.bits)? * 4;
    let in_lane_order = lane_x(packed.bits, packed.rows, packed.cols, m);
    if in_lane_order {
        let workgroup = row_workgroup(Kernel::QGemv, vectors_per_pass(Kernel::QGemv, m), row_bytes);
        x_lanes(ctx, pass, (packed.bits, packed.cols, workgroup), weights, io, m)?;
    }
    row_kernel(ctx, pass, (Kernel::QGemv, in_lane_order), packed.bits, (packed.rows, row_bytes), weights, io, m)
}

/// Records the dense GEMV (gemv_f32 or gemv_f16 by `dtype`) of `m` vectors: `weights` the group-0 bind group
/// of the dense weight (as [`crate::gpu::DenseGemv`] builds it), `io` from [`io_bind_group`] with the uniform of
/// [`call_params`].
///
/// Grid: x over row blocks of [`rows_per_group`] rows ([`row_workgroup`] lanes each: gemv_f16 2 rows by 256
/// lanes at `m` = 1, else 4 by 64; gemv_f32 one row by 64), y over blocks of up to 8 vectors.
pub fn gemv_dense(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    dtype: super::DenseDtype,
    (rows, cols): (usize, usize),
    weights: &wgpu::BindGroup,
    io: &wgpu::BindGroup,
    m: usize,
) -> Result<()> {
    let row_bytes = cols * if dtype == super::DenseDtype::F16 { 2 } else { 4 };
    row_kernel(ctx, pass, (dense_kernel(dtype), false), 0, (rows, row_bytes), weights, io, m)
}

/// The kernel of a dense dtype.
pub(crate) fn dense_kernel(dtype: super::DenseDtype) -> Kernel {
    match dtype {
        super::DenseDtype::F32 => Kernel::GemvF32,
        super::DenseDtype::F16 => Kernel::GemvF16,
    }
}

/// Records x_lanes.wgsl for `m` vectors of `cols` on q_gemv's bind groups: the vectors in the lane order of a
/// q_gemv pipeline for symbols of `bits` with `workgroup` lanes, into `io`'s room for them.
pub fn x_lanes(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    (bits, cols, workgroup): (u32, usize, u32),
    weights: &wgpu::BindGroup,
    io: &wgpu::BindGroup,
    m: usize,
) -> Result<()> {
    let spec = Spec::new(ctx.lane_mode(), bits, 0, 1, workgroup);
    pass.set_pipeline(&ctx.pipeline(Kernel::XLanes, spec)?);
    pass.set_bind_group(0, weights, &[]);
    pass.set_bind_group(1, io, &[]);
    pass.dispatch_workgroups(grid(ctx, (m * cols / 4).div_ceil(workgroup as usize)), 1, 1);
    Ok(())
}

/// Records a row kernel (q_gemv, gemv_f32, gemv_f16) over `rows` weight rows of `row_bytes` bytes each: grid x
/// over rows, y over blocks of vectors.
#[allow(clippy::too_many_arguments)]
fn row_kernel(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    (kernel, lane_x): (Kernel, bool),
    bits: u32,
    (rows, row_bytes): (usize, usize),
    weights: &wgpu::BindGroup,
    io: &wgpu::BindGroup,
    m: usize,
) -> Result<()> {
    if m == 0 || rows == 0 {
        return Ok(());
    }
    let per_pass = vectors_per_pass(kernel, m);
    let workgroup = row_workgroup(kernel, per_pass, row_bytes);
    let spec = Spec { lane_x, ..Spec::new(ctx.lane_mode(), bits, 0, per_pass, workgroup) };
    let pipeline = ctx.pipeline(kernel, spec)?;
    let blocks = m.div_ceil(per_pass as usize);
    if blocks > ctx.limits().max_compute_workgroups_per_dimension as usize {
        return Err(Error::param("m", format!("{m} vectors need {blocks} workgroup rows, above the device limit")));
    }
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, weights, &[]);
    pass.set_bind_group(1, io, &[]);
    pass.dispatch_workgroups(grid(ctx, row_blocks(kernel, &spec, rows)), blocks as u32, 1);
    Ok(())
}

// Buffers the Metal path (super::metal) binds in its own layout.
impl GpuStream {
    /// `words`, `tile_offsets`, `states`, `decode_table` (buffers 0 to 3 of msl/ec_gemv.metal) and `low` (buffer 6;
    /// another stream buffer stands in, unread, for a stream that is not split).
    pub(crate) fn msl_buffers(&self) -> [&wgpu::Buffer; 5] {
        [&self.words, &self.tile_offsets, &self.states, &self.decode_table, self.low_binding()]
    }
}

impl GpuScales {
    /// `scales`, `biases`: buffers 4 and 5 of msl/ec_gemv.metal.
    pub(crate) fn msl_buffers(&self) -> [&wgpu::Buffer; 2] {
        [&self.scales, &self.biases]
    }
}
