// Quantized GEMV on MLX-packed symbols (the Cached path): y[v][n] = sum_k (s q[n][k] + b) x[v][k].
//
// Specialization (prepended by the host): BITS (1..=8), M (vectors per workgroup, 1..=8), WG (power of two).
// Preamble: reduce.wgsl.
// Grid: x strides over rows (one row per workgroup at a time), y = vector block: workgroup (i, j) computes
// vectors j*M .. j*M + M of its rows, so any number of vectors runs as a tiled matmul of M-vector blocks.
// Each invocation takes chunks of 32 symbols (BITS packed words, always inside one group since the group size
// is a multiple of 32) and accumulates sum(q x) and sum(x) for the chunk, then s * sum(q x) + b * sum(x).

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
// Packed symbols, rows * words_per_row: each row a little-endian bit stream of BITS-bit symbols.
@group(0) @binding(1) var<storage, read> packed: array<u32>;
// Per-group scales and biases, row-major rows x (cols / group_size).
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> biases: array<f32>;
// Input vectors, row-major m x cols.
@group(1) @binding(0) var<storage, read> x: array<f32>;
// Output, row-major m x rows.
@group(1) @binding(1) var<storage, read_write> y: array<f32>;
@group(1) @binding(2) var<uniform> call: CallParams;

const QMASK: u32 = (1u << BITS) - 1u;

// q as f32 for q < 2^23, built from bits (2^23 + q has q in its mantissa) instead of an integer conversion,
// which runs at a fraction of the FMA rate on some GPUs.
fn small_to_f32(q: u32) -> f32 {
    return bitcast<f32>(q | 0x4b000000u) - 8388608.0;
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
    let chunks = params.cols / 32u;
    let groups_per_row = params.cols / params.group_size;
    for (var row = wid.x; row < params.rows; row += nwg.x) {
        var acc: array<f32, M>;
        for (var v = 0u; v < M; v++) {
            acc[v] = 0.0;
        }
        for (var c = lid; c < chunks; c += WG) {
            // The chunk's BITS words, plus a zero so a symbol that straddles the last word reads nothing new.
            var w: array<u32, 9>;
            let base = row * params.words_per_row + c * BITS;
            for (var i = 0u; i < BITS; i++) {
                w[i] = packed[base + i];
            }
            w[BITS] = 0u;
            let g = row * groups_per_row + c * 32u / params.group_size;
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
                    let xv = x[min(v0 + v, call.m - 1u) * params.cols + c * 32u + i];
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
        for (var v = 0u; v < M; v++) {
            let total = workgroup_sum(acc[v]);
            if (lid == 0u && v0 + v < call.m) {
                y[(v0 + v) * params.rows + row] = total;
            }
        }
    }
}
