// Scales and biases from the tile order that ec_gemv.wgsl reads back to row-major, for q_gemv (a fused weight's
// products of more vectors than one ec_gemv pass takes decode the stream and run q_gemv; `GpuScales::to_rows`).
// Tile order: group g of row r is at ((r / 32 * segments + g / per_segment) * 32 + r % 32) * per_segment +
// g % per_segment (`kernels::tile_scale_index`).
//
// Specialization (prepended by the host): WG. Grid: any number of workgroups; each invocation moves one group at a
// time, striding over all of them.

struct ScaleParams {
    rows: u32,
    groups: u32,        // groups a row
    segments: u32,      // segments a row
    per_segment: u32,   // groups a segment
}

@group(0) @binding(0) var<uniform> params: ScaleParams;
@group(0) @binding(1) var<storage, read> tile_scales: array<f32>;
@group(0) @binding(2) var<storage, read> tile_biases: array<f32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;
@group(0) @binding(4) var<storage, read_write> biases: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = params.rows * params.groups;
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        let row = i / params.groups;
        let g = i % params.groups;
        let t = ((row / 32u * params.segments + g / params.per_segment) * 32u + row % 32u) * params.per_segment
            + g % params.per_segment;
        scales[i] = tile_scales[t];
        biases[i] = tile_biases[t];
    }
}
