// Tile decode: rANS tiles -> MLX-packed symbols (each row a little-endian bit stream in u32 words).
//
// Specialization (prepended by the host): BITS, KW = 8 / BITS weights per joint symbol, P (table precision),
// SLABS tiles per workgroup, WG = 32 * SLABS invocations. Preamble: lanes.wgsl (the stream bindings 0 to 4, the
// decode table, the word positions).
// Grid: workgroups stride over groups of SLABS consecutive tiles; slab s of a workgroup decodes tile
// base + s, lane r decodes row r of that tile and writes that row's packed words itself, four at a time (one
// 16-byte store) where the tile's words start on 16 bytes in every row, else one by one. (Measured on an H200:
// 16-byte stores, which write a quarter as many scattered lines as 4-byte ones, and 8 tiles per workgroup
// instead of 4 took 14336x4096 from 192 to 142 us; either alone, 178 and 230 us.) With SPLIT (a split stream:
// BITS = 2 coded, or 1 with SPLIT3; 4-bit weights written, binding 7 the low words; lanes.wgsl) the slab writes its
// rows through workgroup memory instead (`stage`).

// Output: packed symbols, rows * words_per_row u32 words, four to a vec4 (the buffer is padded to 16 bytes).
@group(0) @binding(5) var<storage, read_write> packed: array<vec4<u32>>;
// [0]: number of tiles that failed the end-state or word-count check; [1]: lowest such tile (host sets ~0).
@group(0) @binding(6) var<storage, read_write> status: array<atomic<u32>>;

const STEP_BITS: u32 = KW * BITS;
//#if SPLIT
// A split stream's output goes through workgroup memory: each lane stages STAGE 16-byte pieces of its row (8 steps
// each; the host sets STAGE to 4, or 2 where 4 would not fit 32 KiB with the table), then the slab writes its 32
// rows' pieces, STAGE lanes on each row's contiguous bytes, instead of every lane storing 16 bytes of its own row
// (32 rows a store). Measured on an H200 (P = 11, STAGE = 4), decode-only `stack_k576 x4` 95.6 us against 126.6
// with each lane's own 16-byte stores and 130.5 through the word queue below; 14336x4096 63.6 against 86.1 and
// 88.3. 8 pieces a lane (32 KiB a workgroup) took 141.9 us with 4 slabs a workgroup and 144.0 with 8; 4 pieces
// with 4 slabs, 95.2 but 81.4 on 14336x4096. (With nothing stored at all, 62.5 us.)
var<workgroup> stage: array<vec4<u32>, WG * STAGE>;

// The low words of the two blocks of 16 columns from column `col` (a multiple of 32) of this lane's row.
fn low_pair(row_tile: u32, col: u32) -> vec2<u32> {
    return vec2<u32>(low_word(row_tile, col), low_word(row_tile, col + 16u));
}
//#endif

// This lane's decoder: its state, and its tile's cursor and end (in 16-bit words).
var<private> dec_x: u32;
var<private> dec_pos: u32;
var<private> dec_end: u32;
// Finished packed words not yet stored, oldest in out_q.x .. newest in out_q[out_n - 1], the first at packed word
// out_at (q is never indexed by a variable, so it stays in registers).
var<private> out_q: vec4<u32>;
var<private> out_n: u32;
var<private> out_at: u32;

// One decode step on every lane, kept where `live`: returns the joint symbol at the state, moves the state on
// and, where it fell below 2^16, reads the tile's next word into it. Call from uniform control flow, with
// `words_advance` after every 2 steps (4-bit pairs and others) or every 4 (split streams).
fn decode_step(live: bool) -> u32 {
    // x = f * (x >> P) + (x mod 2^P) - cum, read off the table entry at slot x mod 2^P. Computed on every lane and
    // kept by `select`, so the per-step dependency chain has no branch to reconverge from.
    let x = dec_x;
    let e = table[x & (TABLE - 1u)];
    let y = select(x, decode_state(x, e), live);
    let need = live & (y < 65536u);
    let rank = word_rank(need);
    // A word past the tile's end is wanted only on a corrupt stream, which then leaves the cursor past the end
    // (reported after the loop); the read is clamped to the tile's last word.
    let word = next_word(dec_pos + rank.x, need, max(dec_end, 1u) - 1u);
    dec_x = select(y, (y << 16u) | word, need);
    dec_pos += rank.y;
    return e & 0xffu;
}

// Queues a finished packed word of this lane's row if `keep`, and stores the queue once it holds 4: as one
// 16-byte store where `aligned`, else word by word; nothing where not `store` (a lane past the last row).
// Shifted in from the top, so after 4 words the queue is (oldest .. newest). Every lane of a tile queues at the
// same steps, so the branch is uniform.
fn queue_word(word: u32, keep: bool, store: bool, aligned: bool) {
    out_q = select(out_q, vec4<u32>(out_q.yzw, word), keep);
    out_n += select(0u, 1u, keep);
    if (out_n == 4u) {
        if (store & aligned) {
            packed[out_at >> 2u] = out_q;
        } else if (store) {
            store_words(out_q, out_at, 4u);
        }
        out_at += 4u;
        out_n = 0u;
    }
}

// Stores the first `n` of the words `q` (packed words out .. out + n) one by one.
fn store_words(q: vec4<u32>, out: u32, n: u32) {
    for (var i = 0u; i < n; i++) {
        packed[(out + i) >> 2u][(out + i) & 3u] = q[i];
    }
}

fn report_bad_tile(tile: u32) {
    atomicAdd(&status[0], 1u);
    atomicMin(&status[1], tile);
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
    load_table(lid);
    workgroupBarrier();

    let max_steps = params.segment / KW;
    for (var base = wid.x * SLABS; base < params.tiles; base += nwg.x * SLABS) {
        let tile = base + lane_slab;
        let valid = tile < params.tiles;
        let t = min(tile, params.tiles - 1u);
        let row_tile = t / params.segments;
        let seg = t % params.segments;
        let row0 = row_tile * 32u;
        let col0 = seg * params.segment;
        let steps = min(params.segment, params.cols - col0) / KW;
        let row = row0 + lane_row;
        let lane_live = valid && row < params.rows;

        dec_x = states[t * 32u + lane_row];
        dec_pos = tile_offsets[t];
        dec_end = tile_offsets[t + 1u];
        out_at = row * params.words_per_row + col0 * BITS / 32u;
        out_q = vec4<u32>(0u);
        out_n = 0u;
        // Every row's words of this tile start on 16 bytes: whole groups of 4 go out as one vec4.
        let aligned = (params.words_per_row % 4u == 0u) & ((col0 * BITS / 32u) % 4u == 0u);
        words_begin(dec_pos);
//#if SPLIT
        // 8 steps code two blocks of 16 columns: merged with their low words, 4 packed words, one staged piece (a
        // split stream's segments and groups are multiples of 32 columns, so a trip is live or not as a whole and
        // `max_steps` is a multiple of 8). After every STAGE pieces, and after the last, the slab writes the staged
        // pieces out: piece `ch` of row `r` of the round goes to packed vec4 `out0 + r * row_vec4s + first + ch`.
        // The trip count is the same on every slab, so the barriers are in uniform control flow. The windows move
        // on after every 4 steps (a step takes at most 16 u32s, so 4 take at most one window): measured on an H200
        // (P = 11, symbols equal) against every 2, `stack_k576 x4` 94.7 against 96.2 us, 14336x4096 62.7 against
        // 64.0, 4096x14336 72.9 against 73.5. Loading the low words a trip ahead (below): `stack_k576 x4` 91.6
        // against 94.8 us, 14336x4096 61.7 against 62.6 (the driver's code then holds 48 registers, the most that
        // leaves 5 workgroups an SM; with the low words read as zero, wrong on purpose, 83.4 against 94.4).
//#if SPLIT3
        let chunks = steps / 4u;
//#else
        let chunks = steps / 8u;
//#endif
        let row_vec4s = params.words_per_row / 4u;
        let out0 = (row0 * params.words_per_row + col0 / 8u) / 4u;
        // Each trip's two low words are loaded a trip ahead, so their loads are not waited on at the merge (the
        // last trip loads words it does not use, clamped into the array by `low_word`).
//#if SPLIT3
        // SPLIT3 (BITS = 1 coded, KW = 8): 4 steps code one block of 32 columns, merged with its three low words
        // into one staged piece; the same rounds as below, a piece every 4 steps.
        var lo_next = low_words3(row_tile, col0);
        for (var step0 = 0u; step0 < max_steps; step0 += 4u) {
            let live = lane_live & (step0 < steps);
            let lo = lo_next;
            lo_next = low_words3(row_tile, col0 + (step0 + 4u) * KW);
            var hi = 0u;
            for (var k = 0u; k < 4u; k++) {
                hi |= decode_step(live) << (8u * k);
            }
            words_advance(dec_pos);
            let c = (step0 / 4u) % STAGE;
            stage[(lane_slab * 32u + lane_row) * STAGE + c] = merge_block3(hi, lo);
            if ((c == STAGE - 1u) | (step0 + 4u >= max_steps)) {
                workgroupBarrier();
                let first = step0 / 4u - c;
//#else
        var lo_next = low_pair(row_tile, col0);
        for (var step0 = 0u; step0 < max_steps; step0 += 8u) {
            let live = lane_live & (step0 < steps);
            let lo = lo_next;
            let col_next = col0 + (step0 + 8u) * KW;
            lo_next = low_pair(row_tile, col_next);
            var w = vec2<u32>(0u);
            for (var k = 0u; k < 8u; k++) {
                let sym = decode_step(live);
                if (k < 4u) {
                    w.x |= sym << (8u * k);
                } else {
                    w.y |= sym << (8u * (k - 4u));
                }
                if (k % 4u == 3u) {
                    words_advance(dec_pos);
                }
            }
            let c = (step0 / 8u) % STAGE;
            stage[(lane_slab * 32u + lane_row) * STAGE + c] = vec4<u32>(merge_block(w.x, lo.x), merge_block(w.y, lo.y));
            if ((c == STAGE - 1u) | (step0 + 8u >= max_steps)) {
                workgroupBarrier();
                let first = step0 / 8u - c;
//#endif
                for (var k = 0u; k < STAGE; k++) {
                    let i = k * 32u + lane_row;
                    let r = i / STAGE;
                    let ch = i % STAGE;
                    if (valid & (row0 + r < params.rows) & (first + ch < chunks) & (ch <= c)) {
                        packed[out0 + r * row_vec4s + first + ch] = stage[(lane_slab * 32u + r) * STAGE + ch];
                    }
                }
                workgroupBarrier();
            }
        }
//#else
        // (`&` and `|` rather than `&&` and `||` in the loops: naga turns the short-circuit forms into branches.)
        // The loops take 4 steps a trip, tested for liveness once, and the windows move on after every 2 steps.
        // Measured on an H200 (P = 11) against a test and a move after every step: 4096x4096 45.9 against 47.1
        // us, 14336x4096 98.1 against 101.9, real `stack_k576` 57.0 against 60.8, `stack_k1536 x4` 53.2 against
        // 56.5, `stack_k576 x4` 144.4 against 146.4; moving them after every 4 steps was slower where few tiles
        // run (4096x4096 50.6 against 47.0). `steps` is a multiple of 4 (`max_steps` too): a segment and the
        // columns after it hold whole groups, whose size is a multiple of 32, and 32 / KW >= 4. So a trip is live
        // or not as a whole.
        if (STEP_BITS == 8u) {
            // A joint symbol is one byte (BITS divides 8): every 4 steps make one packed word, each byte placed by a
            // constant shift (the segment, a multiple of the group size and so of 32 columns, is a multiple of 4
            // steps). Measured on an H200 against the general loop below: 14336x4096 decode 131.3 -> 122.5 us,
            // real `stack_k576 x4` 166.4 -> 150.4.
            for (var step0 = 0u; step0 < max_steps; step0 += 4u) {
                let live = lane_live & (step0 < steps);
                var word = 0u;
                for (var k = 0u; k < 4u; k++) {
                    word |= decode_step(live) << (8u * k);
                    if (k % 2u == 1u) {
                        words_advance(dec_pos);
                    }
                }
                // Past the end of a shorter last segment nothing more is queued.
                queue_word(word, step0 < steps, lane_live, aligned);
            }
        } else {
            // Append each joint symbol's STEP_BITS bits to the row's bit stream (every lane of a tile is at the same
            // step, so `nbits` is the same on all of them, and the branch is uniform).
            var acc = 0u;
            var nbits = 0u;
            for (var step0 = 0u; step0 < max_steps; step0 += 4u) {
                let live = lane_live & (step0 < steps);
                for (var k = 0u; k < 4u; k++) {
                    let sym = decode_step(live);
                    acc |= sym << nbits;
                    nbits += STEP_BITS;
                    if (nbits >= 32u) {
                        queue_word(acc, step0 < steps, lane_live, aligned);
                        nbits -= 32u;
                        acc = select(0u, sym >> (STEP_BITS - nbits), nbits > 0u);
                    }
                    if (k % 2u == 1u) {
                        words_advance(dec_pos);
                    }
                }
            }
        }
//#endif
        // The last 1 to 3 words of each row (a segment of a multiple of 4 words leaves none), the last `queued`
        // components of q, moved to the front.
        if (lane_live & (out_n > 0u)) {
            let q = out_q;
            store_words(select(select(q.yzwx, q.zwxy, out_n == 2u), q.wxyz, out_n == 1u), out_at, out_n);
        }
        // A correct tile ends with every active state back at 2^16 and all of its words consumed (a lane that
        // wanted a word past the end left the cursor past it).
        if (lane_live && dec_x != 65536u) {
            report_bad_tile(t);
        }
        if (valid && lane_row == 0u && dec_pos != dec_end) {
            report_bad_tile(t);
        }
    }
}
