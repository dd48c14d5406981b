// Dense GEMV baseline, f32 weights: y[v][n] = sum_k W[n][k] x[v][k].
//
// Specialization (prepended by the host): M (vectors per workgroup, 1..=8), WG (power of two).
// Preambles: row_io.wgsl (group 1), reduce.wgsl.
// Grid: x strides over rows (one row per workgroup at a time), y = vector block of M vectors.
// Where rows start on 16 bytes (cols % 4 == 0) each invocation reads 16 bytes (4 weights) at a time, four such
// loads issued before their first use; otherwise it reads one weight at a time.

struct DenseParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: DenseParams;
// Weights, row-major rows x cols, four to a vec4 (the buffer is padded to 16 bytes).
@group(0) @binding(1) var<storage, read> weights: array<vec4<f32>>;

var<private> acc: array<f32, M>;
var<private> xrow: array<u32, M>;

// Adds the products of 4 weights starting at column `col` (a multiple of 4, as is cols) for every vector.
fn dot4(w: vec4<f32>, col: u32) {
    for (var v = 0u; v < M; v++) {
        acc[v] += dot(w, x4[(xrow[v] + col) / 4u]);
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
    for (var row = wid.x; row < params.rows; row += nwg.x) {
        for (var v = 0u; v < M; v++) {
            acc[v] = 0.0;
        }
        if (params.cols % 4u == 0u) {
            let n = params.cols / 4u;
            let base = row * n;
            var c = lid;
            for (; c + 3u * WG < n; c += 4u * WG) {
                let w0 = weights[base + c];
                let w1 = weights[base + c + WG];
                let w2 = weights[base + c + 2u * WG];
                let w3 = weights[base + c + 3u * WG];
                dot4(w0, 4u * c);
                dot4(w1, 4u * (c + WG));
                dot4(w2, 4u * (c + 2u * WG));
                dot4(w3, 4u * (c + 3u * WG));
            }
            for (; c < n; c += WG) {
                dot4(weights[base + c], 4u * c);
            }
        } else {
            for (var c = lid; c < params.cols; c += WG) {
                let i = row * params.cols + c;
                let w = weights[i / 4u][i % 4u];
                for (var v = 0u; v < M; v++) {
                    acc[v] += w * x[xrow[v] + c];
                }
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
