// Fused GEMV: decode rANS tiles, dequantize and multiply, y[v][n] = sum_k W[n][k] x[v][k], for M vectors.
//
// Specialization (prepended by the host): BITS, KW = 8 / BITS, P, M (vectors, 1..=8), SLABS, WG = 32 * SLABS;
// GROUPED where the grid's second dimension shares out the vectors (below); STAGE_X, with XS_COLS, where a split
// stream's one vector is held in workgroup memory (below); EARLY_X where a loop trip's x is read before its steps
// (4-bit steps with QUADS, or a split stream; not GROUPED; below); TILE_PAIRS where each workgroup takes two row
// tiles at a time (below); SPREAD where a product of up to 4 vectors deals its (row tile, segment) tasks out over the
// workgroups in runs of SLABS (below); SLAB_X where each slab holds a loop trip's x in workgroup memory, loaded a
// trip ahead (with SPLIT or QUADS; below); DIGITS, with STAGE_X or BLOCKS, where x is staged as 8-bit digits for
// integer dot products (below); BLOCKS, with DIGITS and XS_COLS, where a split stream's product of up to 4 vectors deals
// out blocks of row tiles by segments, each workgroup staging its segments' columns of x (below); SEAMS with SPREAD or
// BLOCKS, where a row tile may lie across workgroups; SEAM_TREE, with SEAM_VECTORS, where BLOCKS share a row tile among
// more than two workgroups (below).
// Preamble: lanes.wgsl (the stream bindings 0 to 4, the decode table, the word positions).
// Grid: workgroups stride over row tiles, or over pairs of them with TILE_PAIRS (the grid's first dimension); the
// second splits the vectors, row g of workgroups taking vectors g M .. g M + M of the product (so each of those row
// tiles is decoded once per row of workgroups). Within one row tile, slab s of its S slabs (SLABS, or SLABS / 2 with
// TILE_PAIRS) decodes segments s, s + S, ...; lane r
// keeps M accumulators for row r. Per group it accumulates sum(q * x) and sum(x) and applies the group's scale
// and bias once: sum_k (s q_k + b) x_k = s * sum(q x) + b * sum(x); or, with QUADS, sum((q + b / s) x) alone and
// then s * sum((q + b / s) x) (see `bias_ratio`). The slabs' partial sums are then added in workgroup memory.
// With SPLIT (a split stream, BITS = 2 coded of 4-bit weights; lanes.wgsl) every 4 steps code one block of 16
// columns, merged with its low word (binding 7) into 16 4-bit weights before they are multiplied; without QUADS
// each weight is taken as 1 + q / 16 (`unit_f32`) and the fold takes 16 s (sum((1 + q / 16) x) - sum(x)) + b sum(x).
// With SPLIT3 as well (BITS = 1 coded, KW = 8) the 4 steps code a block of 32 columns, merged with its three low
// words into 32 weights.

// Per-group scales and biases in tile order (`kernels::ScaleOrder::Tiles`): by row tile, then segment, then row of the
// row tile, then group of the segment, so a slab's lanes find their segment's groups side by side.
@group(0) @binding(5) var<storage, read> scales: array<f32>;
@group(0) @binding(6) var<storage, read> biases: array<f32>;
// Input vectors, row-major M x cols. Where a step takes an even number of weights (4 bits or fewer) the host sets
// PAIRS for one vector, QUADS for more: x is read a pair of columns at a time, or four (one 16-byte load per vector
// serves two steps of 4-bit weights), since a step's first column is then even. With `symbol_f32`, measured on an
// H200 against one column at a time and each symbol shifted down first (4-bit, P = 11, outputs identical): M = 4
// 157.4 -> 151.4 us on 14336x4096, 73.0 -> 67.2 on 4096x4096, 147.3 -> 141.0 on 4096x14336; M = 1 within 1%.
// A split stream (SPLIT) reads x 16 bytes at a time at one vector too: measured on an H200 (P = 11, M = 1, outputs
// identical) against pairs, 68.2 against 73.2 us on 14336x4096, 41.7 against 42.3 on 4096x4096, 62.0 against 64.8
// on 4096x14336.
// A split stream reads x as blocks of KW 16-byte pieces, a loop trip's 4 KW columns (`x_block`): a trip's pieces
// are one block index and constant offsets into it, which the driver folds into its loads' addresses. Read as single
// pieces, each load took its own index arithmetic. Measured on an H100 (one bit coded, the two kernels in one process,
// twice): the staged loop trip 361 -> 341 instructions, M = 1 on 14336x4096 38.2 / 38.6 -> 37.3 / 37.3 us; where x is
// read from global memory the driver's bounds check of each load stays (robust buffer access), M = 4 unchanged (67.4
// / 67.5 -> 67.2 / 67.2), which SLAB_X (below) takes off. Streams that are not split keep single pieces (as blocks,
// 4096x14336 at M = 4 took 101.2 us against 96.3 on an H100).
//#if SPLIT
@group(1) @binding(0) var<storage, read> x: array<array<vec4<f32>, KW>>;

// Piece k (columns 4 k .. 4 k + 4 of the vectors laid end to end) of x.
fn x_piece(k: u32) -> vec4<f32> {
    return x[k / KW][k % KW];
}
//#else
//#if QUADS
@group(1) @binding(0) var<storage, read> x: array<vec4<f32>>;

fn x_piece(k: u32) -> vec4<f32> {
    return x[k];
}
//#else
//#if PAIRS
@group(1) @binding(0) var<storage, read> x: array<vec2<f32>>;
//#else
@group(1) @binding(0) var<storage, read> x: array<f32>;
//#endif
//#endif
//#endif
// Output, row-major M x rows.
@group(1) @binding(1) var<storage, read_write> y: array<f32>;
//#if STAGE_X
// With STAGE_X (a split stream, M = 1, cols <= XS_COLS) the workgroup copies x into workgroup memory once, with the
// decode table, and the products read it from there: where every workgroup has a compute unit to itself, its few
// warps wait on each x load (L1 or L2) after a block's four steps, and workgroup memory answers sooner
// (`kernels::stage_x`).
//#if DIGITS
//#else
var<workgroup> xs: array<array<vec4<f32>, KW>, XS_COLS / (4u * KW)>;
//#endif
//#endif
//#if DIGITS
// With DIGITS (`kernels::integer_dot`, with STAGE_X or BLOCKS) each vector's staged columns, XS_COLS from column
// `xs_col0` on, are held as integers a block of 4 KW columns (a loop trip's) at a time, so that the products take four
// weights an instruction (`dot4I8Packed`): the values times 2^E rounded, each X = d0 + 2^8 d1 + 2^16 d2 with signed
// 8-bit digits (d0, d1 in -128..127, d2 in -64..64). At one vector 2^E puts the block's largest magnitude in [2^21,
// 2^22): sum(q X) over the block is exact in 32 bits (|sum| <= 32 15 2^22 < 2^31), and 2^-E sum(q X) is sum(q x) with
// each x rounded to 23 significant bits at the block's largest. With several vectors the blocks of a scale group
// (`params.group_size` = 32 2^GB columns, GB <= 2: the host stages digits for several vectors only there) share one
// 2^E, which puts the group's largest magnitude in [2^(21 - GB), 2^(22 - GB)), so that sum(q X) over the whole group is
// exact in 32 bits (|sum| <= 32 2^GB 15 2^(22 - GB) < 2^31): each vector's dot products are summed as integers over the
// group and turned into a float once, at its fold, with x rounded to 23 - GB significant bits at the group's largest. A
// block's digits are 6 NW words (NW words of 8 columns each): word (2 d + h) NW + k holds digit d of columns 8 k + h, 8
// k + 2 + h, 8 k + 4 + h, 8 k + 6 + h (byte by byte), the columns that the low (h = 0) or high (h = 1) nibbles of
// packed word k hold at bytes 0 to 3; then 2^-E and the sum(x) of the block (or, with several vectors, of its group) as
// f32 bits. Blocks of 32 columns (SPLIT3) take 7 of their 8 vec4s, of 16 all 4. Vector v's blocks are `xs[v]`: indexed
// by the vector (a constant once the driver unrolls the loop over them) and the block apart, the bounds check and the
// address of a trip's block are reckoned once for all vectors, where one index v XS_BLOCKS + j took a clamp and a
// multiply for each (the driver's code for 4 vectors on an H200: a loop trip 419 -> 407 instructions).
const NW: u32 = KW / 2u;
const XS_BLOCKS: u32 = XS_COLS / (4u * KW);
var<workgroup> xs: array<array<array<vec4<u32>, KW>, XS_BLOCKS>, M>;
// The first staged column.
var<private> xs_col0: u32;

// Stages x as above, columns `col0` .. col0 + XS_COLS of each vector (those below cols; col0 and the count of columns
// staged are whole groups): a lane for each pair (k, h) of a block, which writes its three words, and the lane of (0,
// 0) the step and the sum. Where subgroups are 32 lanes or more the 2 NW lanes of the block, or with several vectors of
// the group's blocks (side by side in one subgroup, at most 32), find its largest magnitude and its sum together
// through shuffles, from their own columns; otherwise each reads the whole block or group. The scale's exponent is
// clamped so that 2^E and 2^-E are normal floats: a block whose largest magnitude is below 2^-105 keeps fewer bits (its
// products are below f32's smallest normal anyway), and one holding an infinity or a NaN gets digits of no meaning but
// a sum that is not finite, which every row's product takes. `lin` is the lane's index in the workgroup (subgroup by
// subgroup). Call from uniform control flow.
fn stage_digits(lin: u32, col0: u32) {
    let blocks = min(XS_BLOCKS, (params.cols - col0) / (4u * KW));
    let tasks = M * blocks * (2u * NW);
    // Blocks sharing a scale, and GB.
    let span = select(1u, params.group_size / (4u * KW), M > 1u);
    let gb = select(0u, firstTrailingBit(params.group_size / 32u), M > 1u);
    // Whole rounds of the workgroup, so that every lane of a subgroup takes part in its shuffles.
    for (var base = 0u; base < tasks; base += WG) {
        let task = min(base + lin, tasks - 1u);
        let v = task / (2u * NW) / blocks;
        let j = task / (2u * NW) % blocks;
        let b = x_block(v, col0 + j * 4u * KW);
        // The first block of the ones sharing this block's scale.
        let first = b - j % span;
        let k = task % (2u * NW) / 2u;
        let h = task % 2u;
        // Columns 8 k + h, 8 k + 2 + h, 8 k + 4 + h, 8 k + 6 + h: components h and 2 + h of pieces 2 k and 2 k + 1.
        let lo = x[b][2u * k];
        let hi = x[b][2u * k + 1u];
        let own = select(vec4<f32>(lo.x, lo.z, hi.x, hi.z), vec4<f32>(lo.y, lo.w, hi.y, hi.w), h == 1u);
//#if SUBGROUP
//#if NARROW
        let big_sum = blocks_big_sum(first, span);
//#else
        var big = max(max(abs(own.x), abs(own.y)), max(abs(own.z), abs(own.w)));
        var sum = (own.x + own.y) + (own.z + own.w);
        for (var o = 1u; o < 2u * NW; o <<= 1u) {
            big = max(big, subgroupShuffleXor(big, o));
            sum += subgroupShuffleXor(sum, o);
        }
        // The group's other blocks, in a loop of their own: one loop to 2 NW span lanes made one vector slower
        // (measured on an H200, us, its `--experiments` copy against the kernel before in the same processes:
        // 14336x4096 31.3-31.6 against 30.9-31.1, 4096x14336 32.2-32.5 against 31.5-31.6).
        if (M > 1u) {
            for (var o = 2u * NW; o < 2u * NW * span; o <<= 1u) {
                big = max(big, subgroupShuffleXor(big, o));
                sum += subgroupShuffleXor(sum, o);
            }
        }
        let big_sum = vec2<f32>(big, sum);
//#endif
//#else
        let big_sum = blocks_big_sum(first, span);
//#endif
        let e = clamp((bitcast<u32>(big_sum.x) >> 23u) & 0xffu, 22u, 255u);
        // 2^(148 - GB - e): for |x| < 2^(e - 126), |x 2^(148 - GB - e)| < 2^(22 - GB).
        let q = bitcast<vec4<u32>>(vec4<i32>(round(own * bitcast<f32>((275u - gb - e) << 23u))));
        // The low bytes of X, floor((X + 2^7) / 2^8) and floor((X + 2^7 + 2^15) / 2^16): the digits' bytes, one
        // column a byte.
        let shift = vec4<u32>(0u, 8u, 16u, 24u);
        let d0 = (q & vec4<u32>(0xffu)) << shift;
        let d1 = (((q + vec4<u32>(0x80u)) >> vec4<u32>(8u)) & vec4<u32>(0xffu)) << shift;
        let d2 = (((q + vec4<u32>(0x8080u)) >> vec4<u32>(16u)) & vec4<u32>(0xffu)) << shift;
        let w = vec3<u32>(
            (d0.x | d0.y) | (d0.z | d0.w),
            (d1.x | d1.y) | (d1.z | d1.w),
            (d2.x | d2.y) | (d2.z | d2.w),
        );
        if (base + lin < tasks) {
            for (var d = 0u; d < 3u; d++) {
                let i = (2u * d + h) * NW + k;
                xs[v][j][i / 4u][i % 4u] = w[d];
            }
            if (task % (2u * NW) == 0u) {
                let i = 6u * NW;
                // 2^(e + GB - 148).
                xs[v][j][i / 4u][i % 4u] = (e + gb - 21u) << 23u;
                xs[v][j][(i + 1u) / 4u][(i + 1u) % 4u] = bitcast<u32>(big_sum.y);
            }
        }
    }
}

// The largest magnitude and the sum of blocks `b` .. b + n of x, read whole.
fn blocks_big_sum(b: u32, n: u32) -> vec2<f32> {
    var big = 0.0;
    var sum = 0.0;
    for (var i = b; i < b + n; i++) {
        for (var p = 0u; p < KW; p++) {
            let v = x[i][p];
            big = max(big, max(max(abs(v.x), abs(v.y)), max(abs(v.z), abs(v.w))));
            sum += (v.x + v.y) + (v.z + v.w);
        }
    }
    return vec2<f32>(big, sum);
}

// sum(q X) over staged block `j` of vector `v` for its NW packed words of 4-bit weights `w` (word k columns 8 k .. 8 k
// + 8): each digit's dot products, the highest first, shifted into place. The digits are read 16 bytes at a time.
fn digit_dot(w: vec4<u32>, v: u32, j: u32) -> i32 {
    var dg: array<vec4<u32>, 6>;
    for (var p = 0u; p < 6u * NW / 4u; p++) {
        dg[p] = xs[v][j][p];
    }
    var t = 0i;
    for (var d = 0u; d < 3u; d++) {
        t = t << 8u;
        for (var k = 0u; k < NW; k++) {
            let lo = (2u * (2u - d)) * NW + k;
            let hi = lo + NW;
            t += dot4I8Packed(w[k] & 0x0f0f0f0fu, dg[lo / 4u][lo % 4u]);
            t += dot4I8Packed((w[k] >> 4u) & 0x0f0f0f0fu, dg[hi / 4u][hi % 4u]);
        }
    }
    return t;
}

// The step 2^-E and the sum of x of staged block `j` of vector `v` (with several vectors, of its group).
fn digit_step_sum(v: u32, j: u32) -> vec2<f32> {
    return bitcast<vec2<f32>>(xs[v][j][6u * NW / 4u].xy);
}
//#endif
//#if SLAB_X
// With SLAB_X (SPLIT or QUADS, not STAGE_X; `kernels::slab_x`) each slab holds the current loop trip's x, the KW pieces
// of each of its M vectors (XT), in one of its two buffers of `xt`: at the start of a trip its lanes store the pieces
// they loaded during the trip before (lane i piece i, and i + 32 where XT > 32), wait for each other, and load the next
// trip's. Read from global memory, each of the trip's KW M loads carries the driver's bounds check (robust buffer
// access) and waits on L1; here the slab makes XL of them a lane, and its products read workgroup memory at constant
// offsets. Two buffers, so a trip's stores never meet the trip before's reads: the wait of trip t + 1 comes after
// every lane's reads of trip t - 1's buffer, which trip t + 1 overwrites. Measured on an H100 (one bit coded, the two
// kernels in one process, twice), us at M = 1 / 2 / 4: 4096x14336 42.3 / 51.7 / 69.1 -> 37.9 / 44.3 / 51.9; at M = 2
// / 4 (one vector is staged whole) 4096x4096 31.2 / 32.7 -> 24.5 / 29.4 and 14336x4096 54.9 / 67.4 -> 50.7 / 62.0; not
// split (QUADS), M = 2 / 4 / 8, 4096x14336 91.0 / 95.7 / 123.0 -> 79.9 / 90.6 / 100.9.
const XT: u32 = M * KW;
const XL: u32 = (XT + 31u) / 32u;
var<workgroup> xt: array<array<vec4<f32>, XT>, 2u * SLABS>;
// This lane's pieces of the next trip's x, and which of its slab's buffers the current trip uses.
var<private> xt_next: array<vec4<f32>, XL>;
var<private> xt_odd: u32;

// Loads this lane's pieces of the trip at column `col` (a multiple of 4 KW) of vectors vb .. vb + M.
fn slab_x_load(vb: u32, col: u32) {
    for (var k = 0u; k < XL; k++) {
        let i = min(lane_row + 32u * k, XT - 1u);
//#if SPLIT
        xt_next[k] = x[x_block(vb + i / KW, col)][i % KW];
//#else
        xt_next[k] = x[(vb + i / KW) * (params.cols / 4u) + col / 4u + i % KW];
//#endif
    }
}

// Stores this lane's loaded pieces into the slab's other buffer and waits for the slab's lanes; returns that
// buffer's index in `xt`. Call from uniform control flow, once a trip on every lane.
fn slab_x_store() -> u32 {
    xt_odd ^= 1u;
    let b = lane_slab * 2u + xt_odd;
    for (var k = 0u; k < XL; k++) {
        let i = lane_row + 32u * k;
        if (i < XT) {
            xt[b][i] = xt_next[k];
        }
    }
    // A slab is one subgroup, or part of one, where subgroups are 32 lanes or more; otherwise it spans several.
//#if SUBGROUP
//#if NARROW
    workgroupBarrier();
//#else
    subgroupBarrier();
//#endif
//#else
    workgroupBarrier();
//#endif
    return b;
}
//#endif

// One partial sum per lane of the workgroup, reused for each vector.
var<workgroup> partial: array<f32, WG>;

//#if SEAMS
// With SPREAD (up to 4 vectors, `kernels::spread_slabs`) workgroup w takes tasks w SLABS .. w SLABS + SLABS of the row
// tiles' segments, in order (task = row tile * segments + segment), so each workgroup holds about as many slabs as the
// device has for it and a row tile may lie across two workgroups (SLABS is at least the segments of a row). Each
// workgroup adds the slabs of each of its row tiles; a row tile it holds whole goes straight to y, the two parts of one
// it shares meet in `seams`, one u32 per row of the row tile and vector (vector-major), which holds SEAM_EMPTY between
// products (the host fills it so, and the second part leaves it so). Only atomic operations on that one word pass the
// first part's sum to the second, so no ordering between workgroups is needed; a + b = b + a, so y does not depend on
// which part comes first. BLOCKS (below) shares a row tile among the workgroups of its parts through the same words
// and, past two parts (SEAM_TREE), more of them (`seams_add`).
@group(0) @binding(8) var<storage, read_write> seams: array<atomic<u32>>;

const SEAM_EMPTY: u32 = 0xffffffffu;

// Adds `sum`, this workgroup's part of row `out` of y, to the other part through seam word `i`: the first part to
// arrive leaves its sum there, the second writes the whole to y and empties the word.
fn seam_add(i: u32, sum: f32, out: u32) {
    // A NaN sum with the empty word's bits is stored as another NaN.
    let bits = select(bitcast<u32>(sum), 0x7fc00000u, bitcast<u32>(sum) == SEAM_EMPTY);
    loop {
        let r = atomicCompareExchangeWeak(&seams[i], SEAM_EMPTY, bits);
        if (r.exchanged) {
            return;
        }
        // A weak exchange may fail with the word still empty: then it is tried again.
        if (r.old_value != SEAM_EMPTY) {
            y[out] = bitcast<f32>(r.old_value) + sum;
            atomicStore(&seams[i], SEAM_EMPTY);
            return;
        }
    }
}
//#if SEAM_TREE

// Meets the other part of a pair through seam word `i` with `sum`, this part's: the first of the two to arrive leaves
// its sum there and gets `met` false; the second empties the word and gets the pair's sum. `seam_add` does the same
// for two parts and stays a function of its own, as the parts' count does its own form above: kernels of one or two
// parts given this function and the general count ran 1-2 us slower on an H200 (14336x4096 at two to four vectors,
// 4096x14336 at one; BENCHMARKS.md, "Rows in more than two parts"), so those kernels keep the code they had.
struct Meeting {
    met: bool,
    sum: f32,
}

fn seam_meet(i: u32, sum: f32) -> Meeting {
    // A NaN sum with the empty word's bits is stored as another NaN.
    let bits = select(bitcast<u32>(sum), 0x7fc00000u, bitcast<u32>(sum) == SEAM_EMPTY);
    var meeting = Meeting(false, 0.0);
    loop {
        let r = atomicCompareExchangeWeak(&seams[i], SEAM_EMPTY, bits);
        if (r.exchanged) {
            break;
        }
        // A weak exchange may fail with the word still empty: then it is tried again.
        if (r.old_value != SEAM_EMPTY) {
            atomicStore(&seams[i], SEAM_EMPTY);
            meeting = Meeting(true, bitcast<f32>(r.old_value) + sum);
            break;
        }
    }
    return meeting;
}

// With SEAM_TREE (BLOCKS of more than two parts, up to 8: `kernels::MAX_BLOCK_PARTS`) a row tile's `parts` parts meet
// in pairs, in a tree fixed by their order: part p meets part p ^ 1 in a seam word, and the second of each pair to
// arrive goes on with the pair's sum to the next level, where pair p / 2 meets pair p / 2 ^ 1; a part or pair with no
// partner at a level (the last of an odd count) goes on alone. The last to arrive writes the whole to y. Each meeting
// adds two sums whose order does not matter (a + b = b + a), and which sums meet is fixed, so y does not depend on the
// order in which the parts arrive. A row's meetings are numbered level after level (the first level's pairs, then the
// next's), and meeting k's word is k SEAM_VECTORS row_tiles 32 words past the first's, which is the row's word under
// `seam_add` (SEAM_VECTORS: `kernels::SPREAD_VECTORS`, the most vectors).
fn seams_add(i: u32, part: u32, parts: u32, sum: f32, out: u32) {
    let stride = SEAM_VECTORS * params.row_tiles * 32u;
    var s = sum;
    var node = part;
    var width = parts;
    // The first meeting word of the current level.
    var level = 0u;
    while (width > 1u) {
        if ((node ^ 1u) < width) {
            let m = seam_meet(i + (level + node / 2u) * stride, s);
            if (!m.met) {
                return;
            }
            s = m.sum;
        }
        level += width / 2u;
        node /= 2u;
        width = (width + 1u) / 2u;
    }
    y[out] = s;
}
//#endif
//#endif

//#if TILE_PAIRS
// With TILE_PAIRS: the slabs on each row tile of a workgroup's pair.
const TILE_SLABS: u32 = SLABS / 2u;
//#endif

// Field i of `w`, `width` bits each, as f32, built from bits where it lies (2^(23 - i width) + q, the field in the
// mantissa's low bits, minus its offset) instead of an integer conversion, which runs at a fraction of the FMA rate
// on some GPUs, and without shifting it down first. The field must end at or below bit 23 (past it, it would
// reach the exponent).
fn field_f32(w: u32, i: u32, width: u32) -> f32 {
    let magic = (150u - i * width) << 23u;
    return bitcast<f32>((w & (((1u << width) - 1u) << (i * width))) | magic) - bitcast<f32>(magic);
}

// Symbol i of the joint symbol in table entry `e` (its low 8 bits) as f32.
fn symbol_f32(e: u32, i: u32) -> f32 {
    return field_f32(e, i, BITS);
}

//#if SPLIT
//#if QUADS
//#else
// The mask of `unit_f32`, set once from the parameters so the compiler cannot see it as a constant: it then keeps one
// shift and one three-input bit operation a weight (AND with the mask, OR with 1.0's bits as the immediate), as
// q_gemv's `quad` does.
var<private> unit_mask: u32;

// 1 + q / 16 for the 4-bit field q at bits 4 n .. 4 n + 4 of `w`: q shifted to the top of the mantissa of 1.0 (exact),
// so a weight takes one shift and one bit operation and no subtraction (`field_f32` needs a second bit operation and
// a subtraction). The fold takes 16 times the sums: sum(q x) = 16 (sum((1 + q / 16) x) - sum(x)). The price is
// precision, as for q_gemv's `unit4`: the sums run about 3 times the magnitude of sum(q x) / 16, and so does their
// rounding error: the gemv example's split error against float64 at M = 1 went from 6.8e-6 to 1.6e-5 (|y| up to 9).
// Measured on an H200 against the kernel before (P = 11, M = 1, the two binaries alternated twice): 64.1 and 63.8
// against 67.0 and 66.8 us on 14336x4096, 53.7 and 53.8 against 56.6 and 56.5 on 4096x14336; within 1% where x is
// staged or the product small (4096x4096 37.1 against 36.8-36.9, 576x1536 34.4-34.5 against 34.2). With several
// vectors (QUADS, b / s added to 1 + q / 16) it was slower on four of five shapes (M = 4 on 4096x4096 52.6 against
// 49.9 us), so QUADS keeps `field_f32`.
fn unit_f32(w: u32, n: u32) -> f32 {
    let p = 4u * n;
    let placed = select(w >> (p - 19u), w << (19u - p), p < 19u);
    return bitcast<f32>((placed & unit_mask) | 0x3f800000u);
}
//#endif
//#endif

//#if QUADS
// With several vectors, sum(x) per vector costs an add per weight per vector; b / s added to each symbol costs one
// per weight, whatever the number of vectors: s (q + b / s) = s q + b. That holds where b / s is finite (q + b / s
// is rounded to f32 once per symbol; `gemv`'s fused error against float64 at M = 8 went from 6.8e-6 to 1.7e-6 on an
// H200); a group where it is not (s = 0, or so small that b / s overflows) adds 0 to its symbols and b times its
// columns' sum of x at its fold (`group_sum`), as the other form does. Measured on an H200 (4-bit, P = 11, M = 4)
// against x read in pairs with sum(x): 122.7 against 140.8 us on 14336x4096, 113.2 against 136.8 on 4096x14336, 70.6
// against 70.2 on 4096x4096, 54.8 against 56.7 on 576x1536; the 16-byte loads with sum(x) kept: 127.7, 119.9, 77.0,
// 53.0. At M = 1 either was slower than the pairs (100.2 against 98.0 us with b / s on 14336x4096, 101.6 with the
// 16-byte loads). At M = 8 against the kernel before (pairs, sum(x), two steps a trip): 161.8 against 215.1 us on
// 14336x4096, 156.8 against 192.0 on 4096x14336, but 124.2 against 97.2 on 4096x4096, where the driver spills
// registers and waits on each load.
//
// (b / s, 1) for a group's scale `s` and bias `b` where |b / s| <= 1e30, else (0, 0). Decided on s and b
// themselves, not on an infinite or NaN quotient, which a compiler may assume never occurs.
fn bias_ratio(s: f32, b: f32) -> vec2<f32> {
    let finite = (s != 0.0) & (abs(b) <= abs(s) * 1e30);
    return select(vec2<f32>(0.0), vec2<f32>(b / s, 1.0), finite);
}

// sum(x) of vector v over the group starting at column `c` (a multiple of 32).
fn group_sum(v: u32, c: u32) -> f32 {
    var sum = 0.0;
    for (var i = 0u; i < params.group_size / 4u; i++) {
        sum += dot(x_piece(v * (params.cols / 4u) + c / 4u + i), vec4<f32>(1.0));
    }
    return sum;
}
//#endif

// With SPLIT, the block of x (KW 16-byte pieces) that holds columns col .. col + 4 KW of vector v, for `col` a multiple
// of 4 KW (a loop trip's first column; the host keeps cols a multiple of 32).
fn x_block(v: u32, col: u32) -> u32 {
    return (v * params.cols + col) / (4u * KW);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
//#if SUBGROUP
    @builtin(subgroup_invocation_id) sid: u32,
    @builtin(subgroup_size) sgs: u32,
    @builtin(subgroup_id) sgid: u32,
//#endif
) {
//#if SUBGROUP
    lanes_init(sid, sgs, sgid);
//#else
    lanes_init(lid);
//#endif
//#if BLOCKS
    // With BLOCKS (a split stream's product of up to 4 vectors, `kernels::task_blocks`) the row tiles' segments are
    // dealt out in blocks of SLABS / per row tiles by `per` segments, a slab each, in `parts` parts of the row: as few
    // as hold each part's segments' columns in XS_COLS, the segments shared out evenly, the last part taking what is
    // left (`kernels::block_parts`). Workgroup w takes part w % parts of row tiles (w / parts) SLABS / per onwards, and
    // stages that part's columns of every vector as digits, so each slab reads its trip's x from workgroup memory; a
    // row tile's parts meet in the seam words (`seam_add`, `seams_add`).
//#if SEAM_TREE
    let parts = (params.segments + XS_COLS / params.segment - 1u) / (XS_COLS / params.segment);
//#else
    // One part or two: the same count, in the form these kernels had before SEAM_TREE (`seam_meet`).
    let parts = select(2u, 1u, params.segments * params.segment <= XS_COLS);
//#endif
    let per = (params.segments + parts - 1u) / parts;
    let part = wid.x % parts;
    let block_seg = part * per + lane_slab % per;
    let block_tile = wid.x / parts * (SLABS / per) + lane_slab / per;
    xs_col0 = part * per * params.segment;
//#endif
    load_table(lid);
//#if DIGITS
    stage_digits(lane_slab * 32u + lane_row, xs_col0);
//#else
//#if STAGE_X
    for (var i = lid; i < min(params.cols, XS_COLS) / 4u; i += WG) {
        xs[i / KW][i % KW] = x[i / KW][i % KW];
    }
//#endif
//#endif
    workgroupBarrier();

//#if SPLIT
//#if QUADS
//#else
    // Zero: the host keeps rows below 2^27 (`check_gpu_shape`).
    unit_mask = (15u << 19u) | (params.rows >> 31u);
//#endif
//#endif
    let max_steps = params.segment / KW;
    let steps_per_group = params.group_size / KW;
    let groups_per_segment = params.segment / params.group_size;
//#if TILE_PAIRS
    // With TILE_PAIRS a workgroup takes two row tiles at a time, TILE_SLABS slabs each: slab s works on row tile
    // 2 w + s / TILE_SLABS of workgroup w's pair (`kernels::row_tile_pairs`).
    let rounds = (params.segments + TILE_SLABS - 1u) / TILE_SLABS;
    let slab_in_tile = lane_slab % TILE_SLABS;
//#else
//#if SPREAD
    // With SPREAD each slab takes one task a trip of the loop over row tiles.
    let rounds = 1u;
    let tasks = params.row_tiles * params.segments;
//#else
//#if BLOCKS
    let rounds = 1u;
//#else
    let rounds = (params.segments + SLABS - 1u) / SLABS;
//#endif
//#endif
//#endif
//#if GROUPED
    // This workgroup's first vector. (The lines that read it are kept apart from those of a kernel that is not
    // GROUPED, which stay as they were: the driver's code for a kernel moves by up to 20% with small changes to its
    // source, measured on an H200.)
    let v0 = wid.y * M;
//#endif
//#if TILE_PAIRS
    for (var pair = wid.x; 2u * pair < params.row_tiles; pair += nwg.x) {
        // Past the last row tile where their count is odd: no row of it is active, and its reads stay in the last.
        let tile_row = 2u * pair + lane_slab / TILE_SLABS;
        let row_tile = min(tile_row, params.row_tiles - 1u);
        let row = tile_row * 32u + lane_row;
//#else
//#if SPREAD
    // Every slab makes the same trips (the steps' ballots and barriers need uniform control flow); a slab past the
    // last task repeats it and writes nothing.
    let trips = (tasks + nwg.x * SLABS - 1u) / (nwg.x * SLABS);
    for (var trip = 0u; trip < trips; trip++) {
        let task_raw = (trip * nwg.x + wid.x) * SLABS + lane_slab;
        let task = min(task_raw, tasks - 1u);
        let row_tile = task / params.segments;
        let row = row_tile * 32u + lane_row;
//#else
//#if BLOCKS
    // One block a workgroup: the host's grid covers them all. Past the last row tile no row is active, and the reads
    // stay in the last.
    {
        let row_tile = min(block_tile, params.row_tiles - 1u);
        let row = block_tile * 32u + lane_row;
//#if SEAM_TREE
//#if SUBGROUP
//#if NARROW
//#else
        // Slabs past the last row tile skip their steps, which hold no barrier with full subgroups, so that the last
        // row of blocks (fewer row tiles than SLABS / per) ends early and frees its compute units
        // (`kernels::task_blocks`). A subgroup of 64 lanes holds two slabs: it skips where both are past. Measured on
        // an H200 (4096x14336 in 28 segments of 512, 7 parts, 133 workgroups of 7 row tiles on 132 SMs, the tree's
        // meetings then one vector after another; us at three / four vectors): 48.8-49.2 / 53.4-54.1 against
        // 72.0-72.7 / 81.5-81.7 for the same kernel without the skip.
        let max_steps = select(max_steps, 0u, subgroupAll(block_tile >= params.row_tiles));
//#endif
//#endif
//#endif
//#else
    for (var row_tile = wid.x; row_tile < params.row_tiles; row_tile += nwg.x) {
        let row = row_tile * 32u + lane_row;
//#endif
//#endif
//#endif
//#if SPREAD
        let row_active = row < params.rows && task_raw < tasks;
//#else
        let row_active = row < params.rows;
//#endif
        var acc: array<f32, M>;
        for (var v = 0u; v < M; v++) {
            acc[v] = 0.0;
        }
        for (var round = 0u; round < rounds; round++) {
//#if TILE_PAIRS
            let seg = round * TILE_SLABS + slab_in_tile;
//#else
//#if SPREAD
            let seg = task % params.segments;
//#else
//#if BLOCKS
            let seg = block_seg;
//#else
            let seg = round * SLABS + lane_slab;
//#endif
//#endif
//#endif
            let valid = seg < params.segments;
            let t = row_tile * params.segments + min(seg, params.segments - 1u);
            let col0 = min(seg, params.segments - 1u) * params.segment;
            let steps = min(params.segment, params.cols - col0) / KW;
            let lane_live = valid && row_active;
            var x_state = states[t * 32u + lane_row];
            var pos = tile_offsets[t];
            var qx: array<f32, M>;
            for (var v = 0u; v < M; v++) {
                qx[v] = 0.0;
            }
//#if DIGITS
            // With several vectors, each one's sum(q X) over the group (`stage_digits`).
            var qi: array<i32, M>;
            for (var v = 0u; v < M; v++) {
                qi[v] = 0i;
            }
//#endif
//#if QUADS
            // The current 16-byte piece of x per vector.
            var xq: array<vec4<f32>, M>;
//#else
            var sx: array<f32, M>;
            for (var v = 0u; v < M; v++) {
                sx[v] = 0.0;
            }
//#if SPLIT
            var xq: array<vec4<f32>, M>;
//#endif
//#endif
            // The scale and bias of the group being summed, loaded a whole group ahead of their use; a segment
            // starts on a group boundary and holds whole groups, and in tile order this row's groups of the segment
            // lie side by side (padded to a whole segment's at the end of a row).
            var g = (t * 32u + lane_row) * groups_per_segment;
            let g_last = g + groups_per_segment - 1u;
            var s = scales[g];
            var b = biases[g];
//#if QUADS
            var ratio = bias_ratio(s, b);
//#endif
            words_begin(pos);
            let end = tile_offsets[t + 1u];
//#if SPLIT3
//#if EARLY_X
//#else
            // SPLIT3 without EARLY_X: the next block's three low words, loaded a loop trip ahead of their merge, so
            // the trip's merge does not wait on them (the segment's last trip loads words it does not use, clamped
            // into the array by `low_words3`), as rans_decode does. Measured on an H100 (one bit coded, the two
            // binaries alternated twice, us): M = 1 4096x14336 46.8 / 46.5 -> 42.2 / 42.5, 4096x4096 24.7 / 24.8 ->
            // 24.1 / 24.1, 14336x4096 (row-tile pairs) 47.9 / 48.0 -> 47.8 / 47.8; M = 4 4096x4096 (two rows of
            // workgroups) 46.7 / 46.7 -> 42.4 / 42.5, 14336x4096 73.3 / 73.3 -> 73.4 / 73.4; with EARLY_X
            // (4096x14336 at M = 4) slower, 70.8 / 70.9 -> 74.6 / 74.5, so EARLY_X loads them at the merge.
            var low_next = low_words3(row_tile, col0);
//#endif
//#endif
            // A group's steps, then its scale and bias applied once and the next group's fetched (a segment holds
            // whole groups; every lane of a slab is at the same step, so the fold's branch is uniform). Measured on
            // an H200 against one loop over the steps with the group's end tested in it: 151.6 -> 143.8 us on
            // 14336x4096, 64.4 -> 62.6 on 4096x4096, 68.9 -> 64.1 on 1536x576 (M = 1, outputs identical). The
            // steps go four at a time (a group has a multiple of 4: its size is a multiple of 32, and so is the
            // segment's), which the driver unrolls: a loop trip's register copies, the liveness test, the column
            // clamp and moving the word windows on come once per four steps. Measured on an H200 (4-bit, P = 11,
            // M = 1, outputs identical) against two steps a trip with those per step: 115.5 -> 98.0 us on
            // 14336x4096, 54.6 -> 49.5 on 4096x4096, 105.4 -> 89.0 on 4096x14336, 58.2 -> 53.5 on 1536x576; the
            // windows moved on after every two steps instead, 103.1, 52.3, 92.9.
//#if SLAB_X
            // The first trip's x (SLAB_X).
//#if GROUPED
            let vb = v0;
//#else
            let vb = 0u;
//#endif
            slab_x_load(vb, min(col0, params.cols - 4u * KW));
//#endif
            for (var group_step = 0u; group_step < max_steps; group_step += steps_per_group) {
                for (var k = 0u; k < steps_per_group; k += 4u) {
                    let live = lane_live & (group_step + k < steps);
                    let col4 = min(col0 + (group_step + k) * KW, params.cols - 4u * KW);
//#if SLAB_X
                    // This trip's x into the slab's buffer, and the next trip's loaded (past the segment's last trip,
                    // clamped columns whose pieces go unused).
                    let xtb = slab_x_store();
                    slab_x_load(vb, min(col0 + (group_step + k + 4u) * KW, params.cols - 4u * KW));
//#endif
//#if SPLIT
                    // A split stream's 4 steps code one block of 16 columns; their joint symbols, the first lowest.
                    var hi = 0u;
//#if EARLY_X
                    // With EARLY_X the block's x (4 16-byte pieces a vector) is loaded before its steps, so the loads
                    // are in flight while the steps run (`kernels::early_x`).
//#if SPLIT3
                    // (SPLIT3: the block's 32 columns, 8 pieces a vector.)
                    var xe: array<vec4<f32>, 8 * M>;
                    for (var v = 0u; v < M; v++) {
                        for (var p = 0u; p < 8u; p++) {
                            xe[v * 8u + p] = x[x_block(v, col4)][p];
                        }
                    }
//#else
                    var xe: array<vec4<f32>, 4 * M>;
                    for (var v = 0u; v < M; v++) {
                        for (var p = 0u; p < 4u; p++) {
                            xe[v * 4u + p] = x[x_block(v, col4)][p];
                        }
                    }
//#endif
//#endif
//#else
//#if EARLY_X
                    // With EARLY_X (KW = 2: the trip's 8 columns, two 16-byte pieces a vector) the trip's x is loaded
                    // before its steps, so the loads are in flight while the steps run (`kernels::early_x`).
                    var xa: array<vec4<f32>, M>;
                    var xb: array<vec4<f32>, M>;
                    for (var v = 0u; v < M; v++) {
                        xa[v] = x[v * (params.cols / 4u) + col4 / 4u];
                        xb[v] = x[v * (params.cols / 4u) + col4 / 4u + 1u];
                    }
//#endif
//#endif
                    for (var h = 0u; h < 4u; h++) {
                        // The decode step on every lane, the state kept by `select` (no branch on the per-step chain:
                        // measured on an H200, 184.9 -> 174.9 us on 14336x4096 and 88.2 -> 77.0 us on 4096x4096 against
                        // the branch). What a lane that is not live adds to qx and sx is never folded into acc: its
                        // steps come after the last group of its segment, or its fold is masked below.
                        let e = table[x_state & (TABLE - 1u)];
                        x_state = select(x_state, decode_state(x_state, e), live);
//#if SPLIT
                        hi |= (e & 0xffu) << (8u * h);
//#else
//#if QUADS
                        for (var i = 0u; i < KW; i += 2u) {
                            let q0 = symbol_f32(e, i) + ratio.x;
                            let q1 = symbol_f32(e, i + 1u) + ratio.x;
                            // Columns col4 + j, and col4 is a multiple of 8: x's 16-byte pieces start at j % 4 = 0.
                            let j = h * KW + i;
                            for (var v = 0u; v < M; v++) {
                                if (j % 4u == 0u) {
//#if SLAB_X
                                    xq[v] = xt[xtb][v * KW + j / 4u];
//#else
//#if EARLY_X
                                    xq[v] = select(xa[v], xb[v], j >= 4u);
//#else
//#if GROUPED
                                    xq[v] = x[(v0 + v) * (params.cols / 4u) + col4 / 4u + j / 4u];
//#else
                                    xq[v] = x[v * (params.cols / 4u) + col4 / 4u + j / 4u];
//#endif
//#endif
//#endif
                                }
                                let xv = select(xq[v].xy, xq[v].zw, j % 4u == 2u);
                                qx[v] += q0 * xv.x;
                                qx[v] += q1 * xv.y;
                            }
                        }
//#else
                        let col = col4 + h * KW;
//#if PAIRS
                        for (var i = 0u; i < KW; i += 2u) {
                            let q0 = symbol_f32(e, i);
                            let q1 = symbol_f32(e, i + 1u);
                            for (var v = 0u; v < M; v++) {
//#if GROUPED
                                let xv = x[((v0 + v) * params.cols + col + i) / 2u];
//#else
                                let xv = x[(v * params.cols + col + i) / 2u];
//#endif
                                qx[v] += q0 * xv.x;
                                qx[v] += q1 * xv.y;
                                sx[v] += xv.x;
                                sx[v] += xv.y;
                            }
                        }
//#else
                        for (var i = 0u; i < KW; i++) {
                            let q = symbol_f32(e, i);
                            for (var v = 0u; v < M; v++) {
//#if GROUPED
                                let xv = x[(v0 + v) * params.cols + col + i];
//#else
                                let xv = x[v * params.cols + col + i];
//#endif
                                qx[v] += q * xv;
                                sx[v] += xv;
                            }
                        }
//#endif
//#endif
//#endif
                        let need = live & (x_state < 65536u);
                        let rank = word_rank(need);
                        // Clamped (on the paths that read memory) so a corrupt stream cannot read past the words;
                        // rans_decode reports it.
                        let word = next_word(pos + rank.x, need, end);
                        x_state = select(x_state, (x_state << 16u) | word, need);
                        pos += rank.y;
                    }
//#if SPLIT
//#if SPLIT3
                    // SPLIT3: the block merged with its three low words, columns col4 .. col4 + 32 as 4-bit weights,
                    // two at a time.
//#if EARLY_X
                    let block = merge_block3(hi, low_words3(row_tile, col4));
//#else
                    let block = merge_block3(hi, low_next);
                    low_next = low_words3(row_tile, col4 + 32u);
//#endif
//#else
                    // The block merged with its low word: columns col4 .. col4 + 16 as 4-bit weights, two at a time.
                    let block = merge_block(hi, low_word(row_tile, col4));
//#endif
//#if DIGITS
                    // With DIGITS, the block against each vector's staged digits, four weights an instruction. One
                    // vector takes its block's step and sum after its products; several sum their products over the
                    // group as integers, and the fold takes the group's step and sum. Measured on an H200
                    // (`kernels::task_blocks` on 14336x4096 in groups of 64, us, against the kernel before, which read
                    // every vector's step and sum before each block's products and added a float product a block, as
                    // an `--experiments` copy in the same processes): four vectors 45.9-46.3 against 47.3-47.6 (four
                    // processes), two and three 35.4-35.6 and 40.6 against 35.5-35.7 and 40.7 (two processes, the
                    // group's shuffles then in one loop). Group sums at one vector too ran 31.0-31.3 against 30.9-31.1
                    // on 14336x4096 and 32.1-32.4 against 31.5-31.6 on 4096x14336, so one vector keeps its float sums.
                    let xi = (col4 - xs_col0) / (4u * KW);
                    for (var v = 0u; v < M; v++) {
//#if SPLIT3
                        let t = digit_dot(block, v, xi);
//#else
                        let t = digit_dot(vec4<u32>(block, 0u, 0u), v, xi);
//#endif
                        if (M == 1u) {
                            let step_sum = digit_step_sum(v, xi);
                            qx[v] += f32(t) * step_sum.x;
                            sx[v] += step_sum.y;
                        } else {
                            qi[v] += t;
                        }
                    }
//#else
                    for (var j = 0u; j < 4u * KW; j += 2u) {
//#if QUADS
                        // Four 4-bit weights at a time from the low 16 bits, as `field_f32` needs.
//#if SPLIT3
                        let w = block[j / 8u] >> (16u * ((j / 4u) % 2u));
//#else
                        let w = select(block.x, block.y, j >= 8u) >> (16u * ((j / 4u) % 2u));
//#endif
                        let q0 = field_f32(w, j % 4u, 4u);
                        let q1 = field_f32(w, j % 4u + 1u, 4u);
//#else
                        // Two weights as 1 + q / 16 (`unit_f32`); the fold takes 16 times their sums.
//#if SPLIT3
                        let w = block[j / 8u];
//#else
                        let w = select(block.x, block.y, j >= 8u);
//#endif
                        let q0 = unit_f32(w, j % 8u);
                        let q1 = unit_f32(w, j % 8u + 1u);
//#endif
                        for (var v = 0u; v < M; v++) {
                            if (j % 4u == 0u) {
//#if SLAB_X
                                xq[v] = xt[xtb][v * KW + j / 4u];
//#else
//#if GROUPED
                                xq[v] = x[x_block(v0 + v, col4)][j / 4u];
//#else
//#if STAGE_X
                                xq[v] = xs[col4 / (4u * KW)][j / 4u];
//#else
//#if EARLY_X
//#if SPLIT3
                                xq[v] = xe[v * 8u + j / 4u];
//#else
                                xq[v] = xe[v * 4u + j / 4u];
//#endif
//#else
                                xq[v] = x[x_block(v, col4)][j / 4u];
//#endif
//#endif
//#endif
//#endif
                            }
                            let xv = select(xq[v].xy, xq[v].zw, j % 4u == 2u);
//#if QUADS
                            qx[v] += (q0 + ratio.x) * xv.x;
                            qx[v] += (q1 + ratio.x) * xv.y;
//#else
                            qx[v] += q0 * xv.x;
                            qx[v] += q1 * xv.y;
                            sx[v] += xv.x;
                            sx[v] += xv.y;
//#endif
                        }
                    }
//#endif
//#endif
                    words_advance(pos);
                }
                if (group_step < steps) {
//#if QUADS
                    let group_col = min(col0 + group_step * KW, params.cols - params.group_size);
                    // The sums of x, where the group needs them, in one branch for all the vectors. Measured on an H100
                    // against a branch per vector (products identical), us at M = 4 / 8: split 4096x14336 84.1 / 133.2
                    // -> 81.7 / 107.7, not split 105.8 / 141.2 -> 103.7 / 127.6; 14336x4096 split 84.4 / 148.1 -> 83.8
                    // / 140.4; M = 2 the same.
                    var sums: array<f32, M>;
                    if (lane_live & (ratio.y == 0.0)) {
                        for (var v = 0u; v < M; v++) {
//#if GROUPED
                            sums[v] = group_sum(v0 + v, group_col);
//#else
                            sums[v] = group_sum(v, group_col);
//#endif
                        }
                    }
                    for (var v = 0u; v < M; v++) {
                        acc[v] += select(0.0, s * qx[v] + b * sums[v], lane_live);
                        qx[v] = 0.0;
                    }
//#else
                    for (var v = 0u; v < M; v++) {
//#if DIGITS
                        // qx holds sum(q x) itself; with several vectors qi holds sum(q X) and the group's first block
                        // its step and sum.
                        if (M > 1u) {
                            let step_sum = digit_step_sum(v, (col0 + group_step * KW - xs_col0) / (4u * KW));
                            qx[v] = step_sum.x * f32(qi[v]);
                            sx[v] = step_sum.y;
                            qi[v] = 0i;
                        }
                        acc[v] += select(0.0, s * qx[v] + b * sx[v], lane_live);
//#else
//#if SPLIT
                        // sum((1 + q / 16) x) = sum(x) + sum(q x) / 16 (`unit_f32`).
                        acc[v] += select(0.0, (16.0 * s) * (qx[v] - sx[v]) + b * sx[v], lane_live);
//#else
                        acc[v] += select(0.0, s * qx[v] + b * sx[v], lane_live);
//#endif
//#endif
                        qx[v] = 0.0;
                        sx[v] = 0.0;
                    }
//#endif
                    g = min(g + 1u, g_last);
                    s = scales[g];
                    b = biases[g];
//#if QUADS
                    ratio = bias_ratio(s, b);
//#endif
                }
            }
        }
//#if SEAMS
//#if SEAM_TREE
        // With SEAM_TREE every lane's sums of all vectors go to workgroup memory at once, in `xs` (whose digits are
        // spent once every slab has passed the barrier; M XS_COLS words, and XS_COLS is at least 1024, a workgroup's
        // most lanes), and then each lane takes one (row tile, vector, row) of the block: it adds that row's slabs of
        // this part, in the order the first slab would, and takes the sum through the seam tree (`seams_add`). So
        // every vector's meetings are in flight together, with two barriers in all. Measured on an H200 (4096x14336,
        // us at two / three / four vectors) against one vector after another, two barriers and the tree's exchanges
        // each: 4 parts of 7 segments of 512 (two vectors) 35.9-36.1 against 37.4-37.6; 7 parts of 4, 46.3-46.5 /
        // 48.2-48.4 against 48.8-49.2 / 53.4-54.1; 8 parts of 4 segments of 448, 40.5-40.7 / 44.5-44.8 against 44.1 /
        // 49.8, where writing each part's sums to y with no meeting at all (a wrong product, timed) took 39.2 / 43.7.
        // The kernels of one or two parts keep their own form (below), which was not timed in this one. Keeping every
        // vector's sums in registers and handing them to the seam functions (an array or a vec4) instead made the
        // driver keep the kernel's arrays in local memory (80-98 local stores against 3-4), and 14336x4096 (two
        // parts) took 240-265 / 335-351 us against 40.3-40.7 / 45.7-46.1.
        workgroupBarrier();
        for (var v = 0u; v < M; v++) {
            let k = lane_slab * 32u + lane_row;
            xs[v][k / (4u * KW)][k / 4u % KW][k % 4u] = bitcast<u32>(acc[v]);
        }
        workgroupBarrier();
        let block_tiles = SLABS / per;
        let n = min(per, params.segments - part * per);
        for (var task = lid; task < block_tiles * M * 32u; task += WG) {
            let r = task % 32u;
            let v = task / 32u % M;
            let first = task / (32u * M) * per;
            let tile = wid.x / parts * block_tiles + task / (32u * M);
            if (tile * 32u + r < params.rows) {
                var sum = 0.0;
                for (var s = 0u; s < n; s++) {
                    let k = (first + s) * 32u + r;
                    sum += bitcast<f32>(xs[v][k / (4u * KW)][k / 4u % KW][k % 4u]);
                }
                seams_add((v * params.row_tiles + tile) * 32u + r, part, parts, sum, v * params.rows + tile * 32u + r);
            }
        }
    }
}
//#else
        // The slabs of each row tile in this workgroup added by the first of them, one vector at a time; the row
        // tile's sum goes to y, or, where the row tile lies across two workgroups, through its seam.
//#if BLOCKS
        let lead = lane_slab % per == 0u;
        let n = min(per, params.segments - block_seg);
//#else
        let seg0 = task % params.segments;
        let lead = lane_slab == 0u || seg0 == 0u;
        let n = min(params.segments - seg0, SLABS - lane_slab);
//#endif
        for (var v = 0u; v < M; v++) {
            partial[lane_slab * 32u + lane_row] = acc[v];
            workgroupBarrier();
            if (lead && row_active) {
                var sum = 0.0;
                for (var s = 0u; s < n; s++) {
                    sum += partial[(lane_slab + s) * 32u + lane_row];
                }
                if (n == params.segments) {
                    y[v * params.rows + row] = sum;
                } else {
                    seam_add((v * params.row_tiles + row_tile) * 32u + lane_row, sum, v * params.rows + row);
                }
            }
            workgroupBarrier();
        }
    }
}
//#endif
//#else
        // Add the slabs' partial sums of each row, one vector at a time.
        for (var v = 0u; v < M; v++) {
            partial[lane_slab * 32u + lane_row] = acc[v];
            workgroupBarrier();
//#if TILE_PAIRS
            if (slab_in_tile == 0u && row_active) {
                var sum = 0.0;
                for (var s = 0u; s < TILE_SLABS; s++) {
                    sum += partial[(lane_slab + s) * 32u + lane_row];
                }
//#else
            if (lane_slab == 0u && row_active) {
                var sum = 0.0;
                for (var s = 0u; s < SLABS; s++) {
                    sum += partial[s * 32u + lane_row];
                }
//#endif
//#if GROUPED
                y[(v0 + v) * params.rows + row] = sum;
//#else
                y[v * params.rows + row] = sum;
//#endif
            }
            workgroupBarrier();
        }
    }
}
//#endif
