// Shared by q_gemv.wgsl, gemv_f32.wgsl and gemv_f16.wgsl: the call's bindings (group 1), the same for every row
// kernel so one bind group serves them all.

struct CallParams {
    m: u32,               // vectors in x and y
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Input vectors, row-major m x cols.
@group(1) @binding(0) var<storage, read> x: array<f32>;
// Output, row-major m x rows.
@group(1) @binding(1) var<storage, read_write> y: array<f32>;
@group(1) @binding(2) var<uniform> call: CallParams;
// The same input vectors as vec4s (their whole 16-byte multiples), read only where every row of x starts on 16
// bytes.
@group(1) @binding(3) var<storage, read> x4: array<vec4<f32>>;
