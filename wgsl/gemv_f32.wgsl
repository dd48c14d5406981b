// Dense GEMV baseline, f32 weights: y[v][n] = sum_k W[n][k] x[v][k].
//
// Specialization (prepended by the host): M (vectors per workgroup, 1..=8), WG (power of two).
// Preamble: reduce.wgsl.
// Grid: x strides over rows (one row per workgroup at a time), y = vector block of M vectors.

struct DenseParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

struct CallParams {
    m: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: DenseParams;
// Weights, row-major rows x cols.
@group(0) @binding(1) var<storage, read> weights: array<f32>;
// Input vectors, row-major m x cols.
@group(1) @binding(0) var<storage, read> x: array<f32>;
// Output, row-major m x rows.
@group(1) @binding(1) var<storage, read_write> y: array<f32>;
@group(1) @binding(2) var<uniform> call: CallParams;

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
    for (var row = wid.x; row < params.rows; row += nwg.x) {
        var acc: array<f32, M>;
        for (var v = 0u; v < M; v++) {
            acc[v] = 0.0;
        }
        for (var c = lid; c < params.cols; c += WG) {
            let w = weights[row * params.cols + c];
            for (var v = 0u; v < M; v++) {
                acc[v] += w * x[min(v0 + v, call.m - 1u) * params.cols + c];
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
