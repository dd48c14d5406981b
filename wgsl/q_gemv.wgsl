// Quantized GEMV on MLX-packed symbols (the Cached path): y[v][n] = sum_k (s q[n][k] + b) x[v][k].
//
// Specialization (prepended by the host): BITS (1..=8), M (vectors per workgroup, 1..=8), WG (power of two).
// Preamble: reduce.wgsl.
// Grid: x strides over rows (one row per workgroup at a time), y = vector block: workgroup (i, j) computes
// vectors j*M .. j*M + M of its rows, so any number of vectors runs as a tiled matmul of M-vector blocks.
// Each invocation takes chunks of 32 symbols (BITS packed words, always inside one group since the group size
// is a multiple of 32) and accumulates sum(q x) and sum(x) for the chunk, then s * sum(q x) + b * sum(x).
// A chunk starts on a 16-byte boundary when BITS is 4 or 8: those widths read whole vec4<u32>s and issue the
// loads of four chunks before using the first.

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

const QMASK: u32 = (1u << BITS) - 1u;
// vec4<u32> per 32-symbol chunk where chunks are 16-byte aligned (BITS 4 or 8), else 0.
const CHUNK_VECS: u32 = select(0u, BITS / 4u, BITS % 4u == 0u);

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

// The words of chunk `c` of row `row`, read as vec4s (CHUNK_VECS > 0 only).
fn load_chunk(row: u32, c: u32) -> array<u32, 9> {
    var w: array<u32, 9>;
    let base = (row * params.words_per_row + c * BITS) / 4u;
    for (var j = 0u; j < CHUNK_VECS; j++) {
        let q = packed[base + j];
        w[4u * j] = q.x;
        w[4u * j + 1u] = q.y;
        w[4u * j + 2u] = q.z;
        w[4u * j + 3u] = q.w;
    }
    w[BITS] = 0u;
    return w;
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
        var c = lid;
        if (CHUNK_VECS > 0u) {
            for (; c + 3u * WG < chunks; c += 4u * WG) {
                let w0 = load_chunk(row, c);
                let w1 = load_chunk(row, c + WG);
                let w2 = load_chunk(row, c + 2u * WG);
                let w3 = load_chunk(row, c + 3u * WG);
                chunk_dot(w0, row, c);
                chunk_dot(w1, row, c + WG);
                chunk_dot(w2, row, c + 2u * WG);
                chunk_dot(w3, row, c + 3u * WG);
            }
            for (; c < chunks; c += WG) {
                chunk_dot(load_chunk(row, c), row, c);
            }
        } else {
            for (; c < chunks; c += WG) {
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
