// The input vectors in the order q_gemv's lanes read them (q_gemv's XLANES path): y is not touched, `xl` gets
// every vector of x4 with the columns of each step of WG lanes regrouped so that a warp's load of x is
// consecutive 16-byte pieces. On q_gemv's word path a lane c of a step (lanes c0 .. c0 + nl, nl = WG but fewer
// in a row's last step) takes XPL = 32 / BITS vec4s of x, vec4s c XPL .. c XPL + XPL of its vector; reading them
// in place, a warp's load is 32 pieces 16 * XPL bytes apart (each in a 128-byte line of its own at 4 bits), which
// held q_gemv at the speed of its loads alone (BENCHMARKS.md, "What limits Cached"). Here vec4 i of lane c0 + l
// goes to c0 XPL + i nl + l, so load i of a step's lanes is nl consecutive vec4s.
//
// Specialization (prepended by the host): BITS and WG, those of the q_gemv pipeline it feeds. Preambles:
// packed.wgsl (q_gemv's weight parameters), row_io.wgsl (group 1, with binding 4 below). Grid: any number of
// workgroups; each invocation moves one vec4 at a time, striding over all of them.

// The vectors in lane order, m x cols f32 as vec4s.
@group(1) @binding(4) var<storage, read_write> xl: array<vec4<f32>>;

const XPL: u32 = 32u / BITS;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cols4 = params.cols / 4u;
    // Steps of a row: vec4s of packed words.
    let n = params.words_per_row / 4u;
    let total = call.m * cols4;
    for (var d = gid.x; d < total; d += nwg.x * WG) {
        let v = d / cols4;
        let r = d % cols4;
        let c0 = r / (WG * XPL) * WG;
        let nl = min(WG, n - c0);
        let o = r - c0 * XPL;
        xl[d] = x4[v * cols4 + (c0 + o % nl) * XPL + o / nl];
    }
}
