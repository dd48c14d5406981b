// Tile decode: rANS tiles -> MLX-packed symbols (each row a little-endian bit stream in u32 words).
//
// Specialization (prepended by the host): BITS, KW = 8 / BITS weights per joint symbol, P (table precision),
// SLABS tiles per workgroup, WG = 32 * SLABS invocations. Preamble: lanes.wgsl (the stream bindings 0 to 4, the
// decode table, the word positions).
// Grid: workgroups stride over groups of SLABS consecutive tiles; slab s of a workgroup decodes tile
// base + s, lane r decodes row r of that tile and writes that row's packed words itself, four at a time (one
// 16-byte store) where the tile's words start on 16 bytes in every row, else one by one. (Measured on an H200:
// 16-byte stores, which write a quarter as many scattered lines as 4-byte ones, and 8 tiles per workgroup
// instead of 4 took 14336x4096 from 192 to 142 us; either alone, 178 and 230 us.)

// Output: packed symbols, rows * words_per_row u32 words, four to a vec4 (the buffer is padded to 16 bytes).
@group(0) @binding(5) var<storage, read_write> packed: array<vec4<u32>>;
// [0]: number of tiles that failed the end-state or word-count check; [1]: lowest such tile (host sets ~0).
@group(0) @binding(6) var<storage, read_write> status: array<atomic<u32>>;

const STEP_BITS: u32 = KW * BITS;

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

        var x = states[t * 32u + lane_row];
        var pos = tile_offsets[t];
        let end = tile_offsets[t + 1u];
        var out = row * params.words_per_row + col0 * BITS / 32u;
        // Every row's words of this tile start on 16 bytes: whole groups of 4 go out as one vec4.
        let aligned = (params.words_per_row % 4u == 0u) & ((col0 * BITS / 32u) % 4u == 0u);
        var acc = 0u;
        var nbits = 0u;
        // Finished words not yet stored, oldest in q.x .. newest in q[queued - 1], the first at packed word `out`.
        var q = vec4<u32>(0u);
        var queued = 0u;
        words_begin(pos);
        // Set when a lane needs a word past its tile's end; reported once, after the loop. (`&` and `|` rather
        // than `&&` and `||` in the loop: naga turns the short-circuit forms into branches.)
        var overrun = false;
        for (var step = 0u; step < max_steps; step++) {
            let live = lane_live & (step < steps);
            // x = f * (x >> P) + (x mod 2^P) - cum, read off the table entry at slot x mod 2^P. Computed on every
            // lane and kept by `select`, so the per-step dependency chain has no branch to reconverge from.
            let e = table[x & (TABLE - 1u)];
            let sym = e & 0xffu;
            x = select(x, (((e >> 8u) & 0xfffu) + 1u) * (x >> P) + (e >> 20u), live);
            // Append the joint symbol's KW * BITS bits to the row's bit stream (every lane of a tile is at the same
            // step, so `nbits`, `queued` and `out` are the same on all of them, and the branches are uniform).
            acc |= sym << nbits;
            nbits += STEP_BITS;
            if (nbits >= 32u) {
                // Shifted in from the top, so after 4 words q is (oldest .. newest). Past the end of a shorter last
                // segment nothing more is queued (q is never indexed by a variable, so it stays in registers).
                let keep = step < steps;
                q = select(q, vec4<u32>(q.yzw, acc), keep);
                queued += select(0u, 1u, keep);
                if (queued == 4u) {
                    if (lane_live & aligned) {
                        packed[out >> 2u] = q;
                    } else if (lane_live) {
                        store_words(q, out, 4u);
                    }
                    out += 4u;
                    queued = 0u;
                }
                nbits -= 32u;
                acc = select(0u, sym >> (STEP_BITS - nbits), nbits > 0u);
            }
            let need = live & (x < 65536u);
            let rank = word_rank(need);
            let i = pos + rank.x;
            let word = next_word(min(i, max(end, 1u) - 1u), need);
            x = select(x, (x << 16u) | word, need);
            overrun = overrun | (need & (i >= end));
            pos += rank.y;
            words_advance(pos);
        }
        // The last 1 to 3 words of each row (a segment of a multiple of 4 words leaves none), the last `queued`
        // components of q, moved to the front.
        if (lane_live & (queued > 0u)) {
            store_words(select(select(q.yzwx, q.zwxy, queued == 2u), q.wxyz, queued == 1u), out, queued);
        }
        if (overrun) {
            report_bad_tile(t);
        }
        // A correct tile ends with every active state back at 2^16 and all of its words consumed.
        if (lane_live && x != 65536u) {
            report_bad_tile(t);
        }
        if (valid && lane_row == 0u && pos != end) {
            report_bad_tile(t);
        }
    }
}
