// Shared by rans_decode.wgsl and ec_gemv.wgsl: the stream's bindings (group 0, bindings 0 to 4), the decode
// table in workgroup memory, and where each lane of a tile finds its next word.
//
// A workgroup holds SLABS slabs of 32 lanes; slab s decodes one tile, lane r of the slab is row r of that tile.
// After each decode step, the lanes that need a word (state < 2^16) take consecutive words of the tile's stream
// in ascending lane order, so lane r reads word `pos + (number of lanes below r that need one)` and the tile's
// cursor advances by the number of lanes that needed one.
//
// Three ways to count, picked when the pipeline is built (the stream format is the same for all):
// - portable (no SUBGROUP): each slab ORs its need bits into a word of workgroup memory, one barrier per step.
// - SUBGROUP, not NARROW (subgroups of 32 or more lanes, full): a ballot holds the whole slab; no barrier.
// - SUBGROUP and NARROW (subgroups of 4, 8 or 16 lanes): a ballot counts within the subgroup, and the
//   subgroups of one slab exchange their counts through workgroup memory, one barrier per step.
// Every path calls workgroupBarrier the same number of times on every invocation: callers must call
// `word_rank` from uniform control flow, once per step on every lane, live or not.

struct StreamParams {
    rows: u32,
    cols: u32,
    segment: u32,
    segments: u32,
    row_tiles: u32,
    tiles: u32,
    group_size: u32,
    words_per_row: u32,   // packed u32 words per output row, cols * BITS / 32
}

@group(0) @binding(0) var<uniform> params: StreamParams;
// The tiles' 16-bit words, two to a u32 (little-endian), all tiles back to back.
@group(0) @binding(1) var<storage, read> words: array<u32>;
// Start of each tile in `words` (in 16-bit words), tiles + 1 entries.
@group(0) @binding(2) var<storage, read> tile_offsets: array<u32>;
// 32 initial states per tile.
@group(0) @binding(3) var<storage, read> states: array<u32>;
// Decode table, 2^P entries: symbol | (freq - 1) << 8 | (slot - cum) << 20; four to a vec4 (the buffer is
// padded to 16 bytes). `load_table` holds it in workgroup memory as `table_entry` rewrites it.
@group(0) @binding(4) var<storage, read> decode_table: array<vec4<u32>>;
//#if SPLIT
// A split stream (SPLIT; docs/FORMAT.md, section 2.1) codes the high 2 bits of 4-bit weights, four a step (BITS = 2,
// KW = 4), in interleaved order within each block of 16 columns; `low` holds each block's low 2 bits, one u32 per
// row and block, by row tile, then block, then row within the tile (a slab's lanes read 128 consecutive bytes).
// With SPLIT3 as well, the other form (below).
@group(0) @binding(7) var<storage, read> low: array<u32>;

// A block's two packed 4-bit words (columns 0..8, 8..16) from its coded symbols packed 16 to a u32 (four steps'
// joint symbols, the first lowest) and its low word.
fn merge_block(hi: u32, lo: u32) -> vec2<u32> {
    return vec2<u32>(((hi & 0x33333333u) << 2u) | (lo & 0x33333333u), (hi & 0xccccccccu) | ((lo >> 2u) & 0x33333333u));
}

// The low word of row `lane_row` of row tile `row_tile` at the block of column `col` (a multiple of 16), clamped
// into the array.
fn low_word(row_tile: u32, col: u32) -> u32 {
    let blocks = params.cols / 16u;
    let i = (min(row_tile, params.row_tiles - 1u) * blocks + min(col / 16u, blocks - 1u)) * 32u + lane_row;
    return low[i];
}
//#if SPLIT3
// With SPLIT3 (docs/FORMAT.md, section 2.2: BITS = 1 coded, KW = 8) the stream codes q3 ^ q2 of each 4-bit weight,
// eight a step, in the order of each block of 32 columns where position p is column 8 (p % 4) + p / 4; `low` holds
// three words per row and block (q3, q1 and q0 of the block, by row tile, then block, then word, then row).

// A block's four packed 4-bit words (columns 8 k .. 8 k + 8 in component k) from its coded bits packed 32 to a u32
// (four steps' joint symbols, the first lowest) and its three low words: q2 = c ^ q3 goes where each of the first
// three words holds a bit of the fourth.
fn merge_block3(hi: u32, s: vec3<u32>) -> vec4<u32> {
    let q2 = (vec3<u32>(hi << 2u, hi << 1u, hi) ^ (s >> vec3<u32>(1u))) & vec3<u32>(0x44444444u);
    let w = (s & vec3<u32>(0xbbbbbbbbu)) | q2;
    let last = ((s.x << 1u) & 0x88888888u) | (((hi >> 1u) ^ s.x) & 0x44444444u) | ((s.y >> 1u) & 0x22222222u)
        | ((s.z >> 2u) & 0x11111111u);
    return vec4<u32>(w, last);
}

// The three low words of row `lane_row` of row tile `row_tile` at the block of column `col` (a multiple of 32),
// clamped into the array.
fn low_words3(row_tile: u32, col: u32) -> vec3<u32> {
    let blocks = params.cols / 32u;
    let i = ((min(row_tile, params.row_tiles - 1u) * blocks + min(col / 32u, blocks - 1u)) * 3u) * 32u + lane_row;
    return vec3<u32>(low[i], low[i + 32u], low[i + 64u]);
}
//#endif
//#endif

const TABLE: u32 = 1u << P;
var<workgroup> table: array<u32, TABLE>;

// Copies the decode table into workgroup memory; the caller's workgroupBarrier follows.
fn load_table(lid: u32) {
    // 16 bytes at a time (4x fewer loads, each lane with more in flight: measured on an H200, fused 1536x576
    // 85.2 -> 77.5 us, where a workgroup is one slab and loads the whole table alone).
    for (var i = lid; i < (TABLE + 3u) / 4u; i += WG) {
        let e = decode_table[i];
        table[4u * i] = table_entry(e.x);
        if (TABLE > 1u) {
            table[4u * i + 1u] = table_entry(e.y);
        }
        if (TABLE > 2u) {
            table[4u * i + 2u] = table_entry(e.z);
            table[4u * i + 3u] = table_entry(e.w);
        }
    }
}

// Where P <= 11 every frequency fits in 12 bits (at most 2^11): the workgroup then holds the frequency itself on
// top of each table entry (`table_entry`, `decode_state`).
const FREQ_ON_TOP: bool = P <= 11u;

// Entry `e` of the decode table as the workgroup holds it. Where FREQ_ON_TOP the entry becomes symbol | (slot - cum)
// << 8 | freq << 20, so that `decode_state` needs no mask and no add after the table lookup (the symbol stays in the
// low 8 bits).
// Measured on an H200 against the kernel before (P = 11, the two binaries alternated, two runs each on split
// streams): split fused M = 1 66.6-66.9 against 68.1-68.2 us on 14336x4096, 56.6-56.8 against 57.7-57.9 on
// 4096x14336, 36.9 against 37.2-37.3 on 4096x4096; split decode-only of SmolLM2's `stack_k576 x4` 76.9-77.0
// against 78.3; not split, fused M = 1 93.6 against 98.0 on 14336x4096 (BENCHMARKS.md, "Decode table entries").
fn table_entry(e: u32) -> u32 {
    if (FREQ_ON_TOP) {
        return (e & 0xffu) | ((e >> 20u) << 8u) | ((((e >> 8u) & 0xfffu) + 1u) << 20u);
    }
    return e;
}

// The decode step's new state D(x) = freq * (x >> P) + slot - cum, for slot x mod 2^P and its entry `e` as
// `table_entry` leaves it. Where FREQ_ON_TOP, e >> 8 = freq * 2^12 + slot - cum, so D(x) = freq * ((x >> P) - 2^12) +
// (e >> 8) in wrapping u32 arithmetic: the subtraction does not wait on the table, and the entry needs no mask.
fn decode_state(x: u32, e: u32) -> u32 {
    if (FREQ_ON_TOP) {
        return (e >> 20u) * ((x >> P) - 4096u) + (e >> 8u);
    }
    return (((e >> 8u) & 0xfffu) + 1u) * (x >> P) + (e >> 20u);
}

// Lane identity, set once by the entry point through `lanes_init`.
var<private> lane_slab: u32;
var<private> lane_row: u32;
// Steps taken so far: picks which workgroup buffer a step uses.
var<private> rank_step: u32;

//#if SUBGROUP
var<private> sg_lane: u32;
// Per-lane constants of the wide path, set once: the ballot bits of the lanes below this one, the ballot word
// holding this lane, the slab's first lane in the subgroup, and this lane's far-window offset.
var<private> lt_mask: u32;
var<private> ballot_word: u32;
var<private> slab_lane0: u32;
var<private> far_off: u32;
var<private> sg_width: u32;
var<private> sg_index: u32;
//#if NARROW
// Per-subgroup word counts of the current step, double buffered: [step & 1][subgroup].
var<workgroup> sg_counts: array<u32, 2u * (WG / 4u)>;
//#endif
//#else
// Per-slab need bits of the current step, triple buffered: [slab][step % 3].
var<workgroup> rank_bits: array<atomic<u32>, 3u * SLABS>;
//#endif

//#if SUBGROUP
// Lanes are numbered by subgroup so that ballot bit order is row order.
fn lanes_init(sid: u32, sgs: u32, sgid: u32) {
    sg_lane = sid;
    sg_width = sgs;
    sg_index = sgid;
    let linear = sgid * sgs + sid;
    lane_slab = linear / 32u;
    lane_row = linear % 32u;
    rank_step = 0u;
    lt_mask = (1u << (sid % 32u)) - 1u;
    ballot_word = sid / 32u;
    // A 64-lane subgroup holds two slabs; each shuffles within its own.
    slab_lane0 = sid - lane_row;
    far_off = 128u + 2u * lane_row;
}
//#else
fn lanes_init(lid: u32) {
    lane_slab = lid / 32u;
    lane_row = lid % 32u;
    rank_step = 0u;
    if (lid < 3u * SLABS) {
        atomicStore(&rank_bits[lid], 0u);
    }
    workgroupBarrier();
}
//#endif

// Returns (words taken by lanes below this one in its slab, words taken by the whole slab) for this step.
fn word_rank(need: bool) -> vec2<u32> {
    let step = rank_step;
    rank_step = step + 1u;
//#if SUBGROUP
//#if NARROW
    let ballot = subgroupBallot(need).x;
    let below = countOneBits(ballot & ((1u << sg_lane) - 1u));
    let buf = (step & 1u) * (WG / 4u);
    if (sg_lane == 0u) {
        sg_counts[buf + sg_index] = countOneBits(ballot);
    }
    workgroupBarrier();
    let per_slab = 32u / sg_width;
    let first = sg_index - sg_index % per_slab;
    var before = 0u;
    var total = 0u;
    for (var i = 0u; i < per_slab; i++) {
        let c = sg_counts[buf + first + i];
        total += c;
        if (first + i < sg_index) {
            before += c;
        }
    }
    return vec2<u32>(before + below, total);
//#else
    let ballot = subgroupBallot(need);
    let bits = ballot[ballot_word];
    let below = countOneBits(bits & lt_mask);
    return vec2<u32>(below, countOneBits(bits));
//#endif
//#else
    let slot = lane_slab * 3u + step % 3u;
    if (need) {
        atomicOr(&rank_bits[slot], 1u << lane_row);
    }
    workgroupBarrier();
    let bits = atomicLoad(&rank_bits[slot]);
    // The buffer used two steps from now was last read one step ago, before this step's barrier.
    if (lane_row == 0u) {
        atomicStore(&rank_bits[lane_slab * 3u + (step + 2u) % 3u], 0u);
    }
    return vec2<u32>(countOneBits(bits & ((1u << lane_row) - 1u)), countOneBits(bits));
//#endif
}

// Word `i` of the tile streams: 16-bit words stored two to a u32, little-endian.
fn stream_word(i: u32) -> u32 {
    return (words[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

// The words a step needs. With full subgroups of 32 or more lanes (SUBGROUP, not NARROW) each slab keeps a window
// of its tile's stream in registers, two u32s (four words) per lane: `win_cur` holds u32s win_base + 2 lane_row
// and the next, `win_nxt` the 64 after the current 64, so a step's word comes from a shuffle instead of a global
// load on the per-step dependency chain. A step takes at most 32 words (16 u32s), so 4 steps take at most 64 u32s:
// with the cursor in the first window when 4 steps begin, every word they need lies in the two windows, and the
// windows move on (by at most one) only after every 4 steps. `win_far` holds the 64 after `win_nxt`; it is loaded
// again at each of those points (from L1 unless the windows just moved) and used only at the next, so moving the
// windows on is a few selects with no branch and no wait on a load. Elsewhere each lane reads its word from
// global memory.
//#if SUBGROUP
//#if NARROW
//#else
var<private> win_base: u32;
var<private> win_cur: vec2<u32>;
var<private> win_nxt: vec2<u32>;
var<private> win_far: vec2<u32>;

// u32s u and u + 1 of the words, the index clamped once: the host pads the words with two zero u32s, so a
// clamped window only ever covers padding.
fn window_at(u: u32) -> vec2<u32> {
    let c = min(u, max(arrayLength(&words), 2u) - 2u);
    return vec2<u32>(words[c], words[c + 1u]);
}
//#endif
//#endif

// Starts a tile whose words begin at `pos`. Call from uniform control flow.
fn words_begin(pos: u32) {
//#if SUBGROUP
//#if NARROW
//#else
    win_base = pos >> 1u;
    win_cur = window_at(win_base + 2u * lane_row);
    win_nxt = window_at(win_base + 64u + 2u * lane_row);
    win_far = window_at(win_base + 128u + 2u * lane_row);
//#endif
//#endif
}

// Word `i` for a lane that `need`s one (`i` then lies within 32 words of the slab's cursor); any value for the
// others. The global-memory paths read word min(i, last) (the caller's clamp, so a corrupt stream cannot read
// past the words); the register window reads no memory and needs none. Call from uniform control flow, on
// every lane.
fn next_word(i: u32, need: bool, last: u32) -> u32 {
//#if SUBGROUP
//#if NARROW
    return select(0u, stream_word(min(i, last)), need);
//#else
    // Any offset is a lane of the slab, so lanes that need no word shuffle harmlessly (their result is dropped).
    let off = (i >> 1u) - win_base;
    let src = slab_lane0 + ((off & 63u) >> 1u);
    let cur = vec2<u32>(subgroupShuffle(win_cur.x, src), subgroupShuffle(win_cur.y, src));
    let nxt = vec2<u32>(subgroupShuffle(win_nxt.x, src), subgroupShuffle(win_nxt.y, src));
    let pair = select(nxt, cur, off < 64u);
    return (select(pair.x, pair.y, (off & 1u) == 1u) >> ((i & 1u) * 16u)) & 0xffffu;
//#endif
//#else
    return select(0u, stream_word(min(i, last)), need);
//#endif
}

// Moves the windows on once the slab's cursor `pos` has left the first. Call from uniform control flow after every
// 4 steps (or fewer: after any number from 1 to 4).
fn words_advance(pos: u32) {
//#if SUBGROUP
//#if NARROW
//#else
    let move_on = (pos >> 1u) - win_base >= 64u;
    win_base = select(win_base, win_base + 64u, move_on);
    win_cur = select(win_cur, win_nxt, move_on);
    win_nxt = select(win_nxt, win_far, move_on);
    win_far = window_at(win_base + far_off);
//#endif
//#endif
}
