// Shared by q_gemv.wgsl and x_lanes.wgsl: the packed weight's parameters (group 0, binding 0 of q_gemv), so
// x_lanes runs on q_gemv's bind groups.

struct PackedParams {
    rows: u32,
    cols: u32,
    group_size: u32,
    words_per_row: u32,   // cols * BITS / 32
}

@group(0) @binding(0) var<uniform> params: PackedParams;
