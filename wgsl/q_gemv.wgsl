// Quantized GEMV on MLX-packed symbols (the Cached path): y[v][n] = sum_k (s q[n][k] + b) x[v][k].
//
// Specialization (prepended by the host): BITS (1..=8), M (vectors per workgroup, 1..=8), WG (power of two).
// Preamble: reduce.wgsl.
// Grid: x strides over rows (one row per workgroup at a time), y = vector block: workgroup (i, j) computes
// vectors j*M .. j*M + M of its rows, so any number of vectors runs as a tiled matmul of M-vector blocks.
// Where BITS divides 32 (1, 2, 4, 8) each invocation takes whole packed words, consecutive invocations
// consecutive words (coalesced): four at a time (16 bytes) for BITS 4 and 8 where rows hold whole vec4s, else one
// at a time, with
// their scales and biases loaded before the first is used; a word's 32 / BITS symbols lie in
// one group, and their x values are read as vec4s. Other widths take chunks of 32 symbols (BITS words, always
// inside one group since the group size is a multiple of 32). Either way a piece accumulates sum(q x) and
// sum(x), then adds s * sum(q x) + b * sum(x).

struct PackedParams {
    rows: u32,
    cols: u32,
    group_size: u32,
    words_per_row: u32,   // cols * BITS / 32
}

struct CallParams {
    m: u32,               // vectors in x and y
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: PackedParams;
// Packed symbols, rows * words_per_row u32 words, four to a vec4 (the buffer is padded to 16 bytes): each row
// a little-endian bit stream of BITS-bit symbols.
@group(0) @binding(1) var<storage, read> packed: array<vec4<u32>>;
// Per-group scales and biases, row-major rows x (cols / group_size).
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> biases: array<f32>;
// Input vectors, row-major m x cols.
@group(1) @binding(0) var<storage, read> x: array<f32>;
// Output, row-major m x rows.
@group(1) @binding(1) var<storage, read_write> y: array<f32>;
@group(1) @binding(2) var<uniform> call: CallParams;
// The same input vectors as vec4s (cols is a multiple of 32, so every row of x starts on 16 bytes).
@group(1) @binding(3) var<storage, read> x4: array<vec4<f32>>;

const QMASK: u32 = (1u << BITS) - 1u;
// Symbols per packed word, where BITS divides 32.
const SPW: u32 = 32u / BITS;
const WORD_PATH: bool = 32u % BITS == 0u;

var<private> acc: array<f32, M>;
var<private> xrow: array<u32, M>;

// q as f32 for q < 2^23, built from bits (2^23 + q has q in its mantissa) instead of an integer conversion,
// which runs at a fraction of the FMA rate on some GPUs.
fn small_to_f32(q: u32) -> f32 {
    return bitcast<f32>(q | 0x4b000000u) - 8388608.0;
}

// Word `i` of the packed symbols.
fn packed_word(i: u32) -> u32 {
    return packed[i / 4u][i % 4u];
}

// Adds chunk `c` of row `row` (its BITS words in w[0..BITS], w[BITS] = 0) to the accumulators.
fn chunk_dot(w: array<u32, 9>, row: u32, c: u32) {
    let g = row * (params.cols / params.group_size) + c * 32u / params.group_size;
    var qx: array<f32, M>;
    var sx: array<f32, M>;
    for (var v = 0u; v < M; v++) {
        qx[v] = 0.0;
        sx[v] = 0.0;
    }
    for (var i = 0u; i < 32u; i++) {
        let bit = i * BITS;
        let off = bit % 32u;
        var q = w[bit / 32u] >> off;
        if (off + BITS > 32u) {
            q |= w[bit / 32u + 1u] << (32u - off);
        }
        let qf = small_to_f32(q & QMASK);
        for (var v = 0u; v < M; v++) {
            let xv = x[xrow[v] + c * 32u + i];
            qx[v] += qf * xv;
            sx[v] += xv;
        }
    }
    let s = scales[g];
    let b = biases[g];
    for (var v = 0u; v < M; v++) {
        acc[v] += s * qx[v] + b * sx[v];
    }
}

// The scale and bias of the group of packed word `w` of row `row`.
fn word_scale(row: u32, w: u32) -> vec2<f32> {
    let g = row * (params.cols / params.group_size) + w * SPW / params.group_size;
    return vec2<f32>(scales[g], biases[g]);
}

// Adds packed word `w` of row `row` (`word`, SPW symbols from column w * SPW, with its group's scale and bias
// `sb`) to the accumulators.
fn word_dot(word: u32, sb: vec2<f32>, w: u32) {
    let col = w * SPW;
    var q: array<f32, SPW>;
    for (var i = 0u; i < SPW; i++) {
        q[i] = small_to_f32((word >> (i * BITS)) & QMASK);
    }
    for (var v = 0u; v < M; v++) {
        var qx = 0.0;
        var sx = 0.0;
        for (var j = 0u; j < SPW / 4u; j++) {
            let xv = x4[(xrow[v] + col) / 4u + j];
            qx += q[4u * j] * xv.x + q[4u * j + 1u] * xv.y + q[4u * j + 2u] * xv.z + q[4u * j + 3u] * xv.w;
            sx += xv.x + xv.y + xv.z + xv.w;
        }
        acc[v] += sb.x * qx + sb.y * sx;
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
    reduce_init(lid, sid, sgid, nsg);
//#else
    reduce_init(lid);
//#endif
    let v0 = wid.y * M;
    for (var v = 0u; v < M; v++) {
        xrow[v] = min(v0 + v, call.m - 1u) * params.cols;
    }
    let chunks = params.cols / 32u;
    for (var row = wid.x; row < params.rows; row += nwg.x) {
        for (var v = 0u; v < M; v++) {
            acc[v] = 0.0;
        }
        if (WORD_PATH && BITS >= 4u && params.words_per_row % 4u == 0u) {
            // Rows of whole vec4s: each invocation takes 4 words (16 bytes, at most 32 symbols, so one group) at a
            // time, two such loads with their scales and biases in flight before the first is used.
            let n = params.words_per_row / 4u;
            let base = row * n;
            var c = lid;
            for (; c + WG < n; c += 2u * WG) {
                let a0 = packed[base + c];
                let a1 = packed[base + c + WG];
                let s0 = word_scale(row, 4u * c);
                let s1 = word_scale(row, 4u * (c + WG));
                word_dot(a0.x, s0, 4u * c);
                word_dot(a0.y, s0, 4u * c + 1u);
                word_dot(a0.z, s0, 4u * c + 2u);
                word_dot(a0.w, s0, 4u * c + 3u);
                word_dot(a1.x, s1, 4u * (c + WG));
                word_dot(a1.y, s1, 4u * (c + WG) + 1u);
                word_dot(a1.z, s1, 4u * (c + WG) + 2u);
                word_dot(a1.w, s1, 4u * (c + WG) + 3u);
            }
            for (; c < n; c += WG) {
                let a = packed[base + c];
                let sb = word_scale(row, 4u * c);
                word_dot(a.x, sb, 4u * c);
                word_dot(a.y, sb, 4u * c + 1u);
                word_dot(a.z, sb, 4u * c + 2u);
                word_dot(a.w, sb, 4u * c + 3u);
            }
        } else if (WORD_PATH) {
            let words = params.words_per_row;
            let base = row * words;
            var w = lid;
            // Four words and their scales and biases in flight before the first is used.
            for (; w + 3u * WG < words; w += 4u * WG) {
                let a0 = packed_word(base + w);
                let a1 = packed_word(base + w + WG);
                let a2 = packed_word(base + w + 2u * WG);
                let a3 = packed_word(base + w + 3u * WG);
                let s0 = word_scale(row, w);
                let s1 = word_scale(row, w + WG);
                let s2 = word_scale(row, w + 2u * WG);
                let s3 = word_scale(row, w + 3u * WG);
                word_dot(a0, s0, w);
                word_dot(a1, s1, w + WG);
                word_dot(a2, s2, w + 2u * WG);
                word_dot(a3, s3, w + 3u * WG);
            }
            for (; w < words; w += WG) {
                word_dot(packed_word(base + w), word_scale(row, w), w);
            }
        } else {
            for (var c = lid; c < chunks; c += WG) {
                // The chunk's BITS words, plus a zero so a symbol that straddles the last word reads nothing new.
                var w: array<u32, 9>;
                let base = row * params.words_per_row + c * BITS;
                for (var i = 0u; i < BITS; i++) {
                    w[i] = packed_word(base + i);
                }
                w[BITS] = 0u;
                chunk_dot(w, row, c);
            }
        }
        for (var v = 0u; v < M; v++) {
            let total = workgroup_sum(acc[v]);
            if (lid == 0u && v0 + v < call.m) {
                y[(v0 + v) * params.rows + row] = total;
            }
        }
    }
}
