// Quantized GEMV on MLX-packed symbols (the Cached path): y[v][n] = sum_k (s q[n][k] + b) x[v][k].
//
// Specialization (prepended by the host): BITS (1..=8), M (vectors per workgroup, 1..=8), WG (power of two, a
// multiple of 32), NR (rows per row block: 8 with 128 lanes, which the host picks for M <= 4 on rows of at least
// 2048 bytes, else 4; two quads of 4 rows or one). Preambles: packed.wgsl (the parameters, group 0 binding 0),
// row_io.wgsl (group 1), rows.wgsl.
// Grid: x strides over row blocks of NR rows (rows.wgsl), y = vector block: workgroup (i, j) computes vectors
// j*M .. j*M + M, so any number of vectors runs as a tiled matmul of M-vector blocks.
// Where BITS divides 32 and rows hold whole vec4s of packed words, a lane takes 16 bytes (4 words) of each of
// its NR rows at a time (NR loads in flight), consecutive lanes consecutive vec4s (coalesced); it loads the x
// values of those columns once for all NR rows. (Measured on an H200, 8 rows by 128 lanes against 4 rows by
// 64: at M = 1 back to back 21.7 against 23.3 us on 14336x4096, one product per run the same; at M = 4 82.1
// against 91.1 us.) Read in place, a lane's x for a vec4 of words is a line of its own (32 columns, 128 bytes
// at 4 bits), so each x load of a warp touches 32 lines; with several vectors (XLANES) the word path reads x
// from `xl`, where x_lanes.wgsl has put each step's x in lane order (consecutive lanes, consecutive vec4s).
// Otherwise a lane takes chunks of 32 symbols (BITS words), a quad of rows at a time. Either
// way it accumulates sum(f x) and sum(x) over each group's part, with f = 1 + q / 2^BITS (see `unit4`), and then
// adds s 2^BITS (sum(f x) - sum(x)) + b sum(x) = s sum(q x) + b sum(x); 32 symbols, and for BITS >= 4 a whole
// vec4, lie in one group (the group size is a multiple of 32).

// Packed symbols, rows * words_per_row u32 words, four to a vec4 (the buffer is padded to 16 bytes): each row
// a little-endian bit stream of BITS-bit symbols.
@group(0) @binding(1) var<storage, read> packed: array<vec4<u32>>;
// Per-group scales and biases, row-major rows x (cols / group_size).
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> biases: array<f32>;
//#if XLANES
// The vectors in lane order (x_lanes.wgsl, run just before on the same x): what the word path reads with several
// vectors. x4 holds them in their own order, which the other path reads.
@group(1) @binding(4) var<storage, read_write> xl: array<vec4<f32>>;
//#endif

const QMASK: u32 = (1u << BITS) - 1u;
// Symbols per packed word, where BITS divides 32; also the x vec4s of one vec4 of packed words.
const SPW: u32 = 32u / BITS;
const WORD_PATH: bool = 32u % BITS == 0u;

// Row quads per row block: 1 or 2.
const NQ: u32 = NR / 4u;

// Per vector: the sums of the block's first quad of rows (one row per component) and, where NQ = 2, of its
// second (acc2, qx2).
var<private> acc: array<vec4<f32>, M>;
var<private> acc2: array<vec4<f32>, M>;
// sum(f x) per row (component) and sum(x), per vector, over the current group's part.
var<private> qx: array<vec4<f32>, M>;
var<private> qx2: array<vec4<f32>, M>;
var<private> sx: array<f32, M>;
// Each vector's first vec4 in x4.
var<private> xb: array<u32, M>;
// QMASK << LO, set once from the call so the compiler cannot see it as a constant (see `quad`).
var<private> k_mask: u32;

// Where a symbol's lowest bit goes in `unit4`: its top bit lands on the f32 mantissa's top bit (22).
const LO: u32 = 23u - BITS;

// 1 + q / 2^BITS as f32 for symbols q < 2^BITS: q placed at the top of the mantissa of 1.0 (exact). One bit
// operation per symbol and no subtraction, where q itself (2^23 + q built from bits, minus 2^23) costs one more
// per symbol; the fold takes sum(x) off again: sum(q x) = 2^BITS (sum(f x) - sum(x)). Measured on an H200,
// 14336x4096 4-bit: 35.1 -> 33.5 us. The price is precision: sum(f x) runs about 3 times the magnitude of
// sum(q x) / 2^BITS for 4-bit symbols, so its rounding error is about 3 times as large against the product.
fn unit4(q: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>((q << vec4<u32>(LO)) | vec4<u32>(0x3f800000u));
}

// Symbols 4 t .. 4 t + 4 of a packed word (BITS divides 32) as in `unit4`: each shifted straight from its
// place in the word to bit LO and masked there. What the H200's driver made of it (its machine code): with the
// mask a constant, it rewrote each symbol into a shift right, a shift left, an AND and an OR; with the mask
// taken from `k_mask`, which it cannot fold, it keeps one shift and one three-input bit operation (AND, then OR
// with 1.0's bits as the operation's immediate). 1.0's bits are a literal: taken from a value as well, they cost
// a register copy for most symbols (vec4 loop at M = 1: 1194 instructions against 1026, though 61 registers
// against 93). Measured on an H200 against that in one run (M = 1, timed by the pass): back to back 20.0 -> 18.3
// us on 14336x4096 and 18.6 -> 17.7 on 4096x14336, one product per run 25.4 -> 23.9 on 4096x14336; M = 4 the
// same.
fn quad(word: u32, t: u32) -> vec4<f32> {
    let pos = (vec4<u32>(0u, 1u, 2u, 3u) + vec4<u32>(4u * t)) * BITS;
    let lo = vec4<u32>(LO);
    let up = vec4<u32>(word) << (lo - min(pos, lo));
    let down = vec4<u32>(word) >> (max(pos, lo) - lo);
    let placed = select(down, up, pos < lo);
    return bitcast<vec4<f32>>((placed & vec4<u32>(k_mask)) | vec4<u32>(0x3f800000u));
}

// a + dot(q, x) as a chain of multiply-adds (a dot product then an add took one instruction more per 4 symbols).
// With `quad`'s masks, measured on an H200 against the kernel before in one run (4-bit, M = 1): back to back
// 21.8 -> 19.9 us on 14336x4096 and 21.3 -> 18.4 on 4096x14336, one product per run 27.7 -> 25.2 and 28.0 -> 26.0.
// The chain rounds at the accumulator's size once per symbol rather than once per 4: the gemv example's Cached
// error against float64 went from 7.3e-6 to 1.2e-5 (M = 8, |y| up to 9), far inside the parity tolerance.
fn dot_acc(q: vec4<f32>, x: vec4<f32>, a: f32) -> f32 {
    return fma(q.w, x.w, fma(q.z, x.z, fma(q.y, x.y, fma(q.x, x.x, a))));
}

// Word `i` of the packed symbols.
fn packed_word(i: u32) -> u32 {
    return packed[i / 4u][i % 4u];
}

// The scales and the biases of group `g` of the 4 rows whose first groups are `gr`.
fn scales4(gr: vec4<u32>, g: u32) -> vec4<f32> {
    return vec4<f32>(scales[gr.x + g], scales[gr.y + g], scales[gr.z + g], scales[gr.w + g]);
}
fn biases4(gr: vec4<u32>, g: u32) -> vec4<f32> {
    return vec4<f32>(biases[gr.x + g], biases[gr.y + g], biases[gr.z + g], biases[gr.w + g]);
}

// acc += s sum(q x) + b sum(x) for every vector, sum(q x) from qx as in `unit4` (s, b: the first quad's scales
// and biases; s2, b2 the second's, for acc2 and qx2 where NQ = 2); qx, qx2 and sx restart.
fn fold(s: vec4<f32>, b: vec4<f32>, s2: vec4<f32>, b2: vec4<f32>) {
    for (var v = 0u; v < M; v++) {
        let sxv = vec4<f32>(sx[v]);
        acc[v] += (s * f32(1u << BITS)) * (qx[v] - sxv) + b * sxv;
        qx[v] = vec4<f32>(0.0);
        if (NQ == 2u) {
            acc2[v] += (s2 * f32(1u << BITS)) * (qx2[v] - sxv) + b2 * sxv;
            qx2[v] = vec4<f32>(0.0);
        }
        sx[v] = 0.0;
    }
}

// The first groups of the block's row quads (gr, gr2) and the scales and biases of their group `g`, folded (the
// second quad's loaded only where NQ = 2).
fn fold_group(gr: vec4<u32>, gr2: vec4<u32>, g: u32) {
    var s2 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    if (NQ == 2u) {
        s2 = scales4(gr2, g);
        b2 = biases4(gr2, g);
    }
    fold(scales4(gr, g), biases4(gr, g), s2, b2);
}

// Adds vec4 `c` (4 words from column c * 128 / BITS) of the block's rows (a0 .. a3 the first quad, a4 .. a7 the
// second where NQ = 2; first groups gr, gr2) to acc and acc2; for BITS >= 4 the vec4 lies in one group, whose
// scales and biases are s, b (and s2, b2).
fn vec_step(
    a0: vec4<u32>, a1: vec4<u32>, a2: vec4<u32>, a3: vec4<u32>,
    a4: vec4<u32>, a5: vec4<u32>, a6: vec4<u32>, a7: vec4<u32>,
    s: vec4<f32>, b: vec4<f32>, s2: vec4<f32>, b2: vec4<f32>, gr: vec4<u32>, gr2: vec4<u32>, c: u32,
) {
    let col = c * (128u / BITS);
//#if XLANES
    // This step's lanes and where their x values start in xl (x_lanes.wgsl).
    let c0 = c - rg_lane;
    let nl = min(rg_lanes, params.words_per_row / 4u - c0);
//#endif
    for (var j = 0u; j < 4u; j++) {
        let w0 = a0[j];
        let w1 = a1[j];
        let w2 = a2[j];
        let w3 = a3[j];
        let w4 = a4[j];
        let w5 = a5[j];
        let w6 = a6[j];
        let w7 = a7[j];
        for (var t = 0u; t < SPW / 4u; t++) {
            let c4 = (col + j * SPW) / 4u + t;
            let q0 = quad(w0, t);
            let q1 = quad(w1, t);
            let q2 = quad(w2, t);
            let q3 = quad(w3, t);
            // Unused (and left out by the compiler) where NQ = 1.
            let q4 = quad(w4, t);
            let q5 = quad(w5, t);
            let q6 = quad(w6, t);
            let q7 = quad(w7, t);
            for (var v = 0u; v < M; v++) {
//#if XLANES
                let xv = xl[xb[v] + c0 * SPW + (c4 - c * SPW) * nl + rg_lane];
//#else
                let xv = x4[xb[v] + c4];
//#endif
                sx[v] += dot(xv, vec4<f32>(1.0));
                let a = qx[v];
                qx[v] = vec4<f32>(
                    dot_acc(q0, xv, a.x), dot_acc(q1, xv, a.y), dot_acc(q2, xv, a.z), dot_acc(q3, xv, a.w),
                );
                if (NQ == 2u) {
                    let b = qx2[v];
                    qx2[v] = vec4<f32>(
                        dot_acc(q4, xv, b.x), dot_acc(q5, xv, b.y), dot_acc(q6, xv, b.z), dot_acc(q7, xv, b.w),
                    );
                }
            }
        }
        if (BITS < 4u) {
            // A word of 32 / BITS symbols lies in one group, a vec4 may not.
            fold_group(gr, gr2, (col + j * SPW) / params.group_size);
        }
    }
    if (BITS >= 4u) {
        fold(s, b, s2, b2);
    }
}

// Adds chunk `c` (32 symbols, BITS words) of the block's rows (first words rw, rw2; first groups gr, gr2) to
// acc and acc2.
fn chunk_step(rw: vec4<u32>, rw2: vec4<u32>, gr: vec4<u32>, gr2: vec4<u32>, c: u32) {
    chunk_quad(rw, c, false);
    if (NQ == 2u) {
        chunk_quad(rw2, c, true);
    }
    fold_group(gr, gr2, c * 32u / params.group_size);
}

// Adds chunk `c` of one quad of rows (first words rw) to qx, or to qx2 where `second`; sum(x) with the first.
fn chunk_quad(rw: vec4<u32>, c: u32, second: bool) {
    for (var r = 0u; r < 4u; r++) {
        // The row's BITS words, plus a zero so a symbol that straddles the last word reads nothing new.
        var w: array<u32, 9>;
        let base = rw[r] + c * BITS;
        for (var i = 0u; i < BITS; i++) {
            w[i] = packed_word(base + i);
        }
        w[BITS] = 0u;
        for (var t = 0u; t < 8u; t++) {
            var q: vec4<u32>;
            for (var k = 0u; k < 4u; k++) {
                let bit = (4u * t + k) * BITS;
                let off = bit % 32u;
                var sym = w[bit / 32u] >> off;
                if (off + BITS > 32u) {
                    sym |= w[bit / 32u + 1u] << (32u - off);
                }
                q[k] = sym & QMASK;
            }
            let qf = unit4(q);
            for (var v = 0u; v < M; v++) {
                let xv = x4[xb[v] + c * 8u + t];
                if (second) {
                    qx2[v][r] += dot(qf, xv);
                } else {
                    if (r == 0u) {
                        sx[v] += dot(xv, vec4<f32>(1.0));
                    }
                    qx[v][r] += dot(qf, xv);
                }
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
//#if SUBGROUP
    @builtin(subgroup_invocation_id) sid: u32,
    @builtin(subgroup_id) sgid: u32,
    @builtin(num_subgroups) nsg: u32,
//#endif
) {
//#if SUBGROUP
    rows_init(lid, sid, sgid, nsg);
//#else
    rows_init(lid);
//#endif
    let rows = params.rows;
    // Zero: the host keeps rows below 2^27 (`check_gpu_shape`).
    let opaque_zero = rows >> 31u;
    k_mask = (QMASK << LO) | opaque_zero;
    let v0 = wid.y * M;
    for (var v = 0u; v < M; v++) {
        xb[v] = min(v0 + v, call.m - 1u) * (params.cols / 4u);
    }
    let gpr = params.cols / params.group_size;
    let vec_path = WORD_PATH && params.words_per_row % 4u == 0u;
    for (var blk = wid.x; blk * rows_per_block() < rows; blk += nwg.x) {
        let row0 = group_row0(blk);
        // The rows of each quad, clamped (a row past the end repeats the last; its sums are not written). The
        // second quad is used only where NQ = 2.
        let rs = min(vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(rows - 1u));
        let rs2 = min(vec4<u32>(row0) + vec4<u32>(4u, 5u, 6u, 7u), vec4<u32>(rows - 1u));
        let gr = rs * gpr;
        let gr2 = rs2 * gpr;
        for (var v = 0u; v < M; v++) {
            acc[v] = vec4<f32>(0.0);
            acc2[v] = vec4<f32>(0.0);
            qx[v] = vec4<f32>(0.0);
            qx2[v] = vec4<f32>(0.0);
            sx[v] = 0.0;
        }
        if (vec_path) {
            let n = params.words_per_row / 4u;
            let bw = rs * n;
            let bw2 = rs2 * n;
            let l = rg_lanes;
            // One vec4 of every row, and its scales and biases, per step (two steps in flight took more registers
            // and ran slower on an H200).
            for (var c = rg_lane; c < n; c += l) {
                let a0 = packed[bw.x + c];
                let a1 = packed[bw.y + c];
                let a2 = packed[bw.z + c];
                let a3 = packed[bw.w + c];
                var a4 = vec4<u32>(0u);
                var a5 = vec4<u32>(0u);
                var a6 = vec4<u32>(0u);
                var a7 = vec4<u32>(0u);
                if (NQ == 2u) {
                    a4 = packed[bw2.x + c];
                    a5 = packed[bw2.y + c];
                    a6 = packed[bw2.z + c];
                    a7 = packed[bw2.w + c];
                }
                var s0 = vec4<f32>(0.0);
                var b0 = vec4<f32>(0.0);
                var s1 = vec4<f32>(0.0);
                var b1 = vec4<f32>(0.0);
                if (BITS >= 4u) {
                    let g0 = c * (128u / BITS) / params.group_size;
                    s0 = scales4(gr, g0);
                    b0 = biases4(gr, g0);
                    if (NQ == 2u) {
                        s1 = scales4(gr2, g0);
                        b1 = biases4(gr2, g0);
                    }
                }
                vec_step(a0, a1, a2, a3, a4, a5, a6, a7, s0, b0, s1, b1, gr, gr2, c);
            }
        } else {
            let rw = rs * params.words_per_row;
            let rw2 = rs2 * params.words_per_row;
            for (var c = rg_lane; c < params.cols / 32u; c += rg_lanes) {
                chunk_step(rw, rw2, gr, gr2, c);
            }
        }
        for (var v = 0u; v < M; v++) {
            store_rows(acc[v], blk, 0u, v0 + v, rows, call.m);
            if (NQ == 2u) {
                store_rows(acc2[v], blk, 1u, v0 + v, rows, call.m);
            }
        }
    }
}
