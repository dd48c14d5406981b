// Dense GEMV baseline, f16 weights: y[v][n] = sum_k W[n][k] x[v][k]. The weights are read as pairs with
// unpack2x16float, so the kernel needs no shader-f16 feature.
//
// Specialization (prepended by the host): M (vectors per workgroup, 1..=8), WG (power of two, a multiple of 32;
// the host uses 256 for M = 1, else 64), NR (rows per row block: 2 for M = 1, 4 for more vectors, where each x
// value loaded serves more rows). Preambles: row_io.wgsl (group 1), rows.wgsl.
// Grid: x strides over row blocks of NR rows (rows.wgsl), y = vector block of M vectors.
// Where rows start on 16 bytes (cols % 8 == 0) a lane reads 16 bytes (8 weights) of each of its NR rows at a
// time, consecutive lanes consecutive vec4s, and loads the x values of those 8 columns once for all NR rows;
// otherwise it reads one pair at a time. (Measured on an H200 at M = 1: 2 rows by 256 lanes ran 4% faster than
// 4 rows by 64 lanes on 14336x4096 and 14% faster on 4096x4096; at M = 4, 1.8x slower.)

struct DenseParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: DenseParams;
// Weights, row-major rows x cols as f16, eight to a vec4<u32> (cols is even; the buffer is padded to 16 bytes).
@group(0) @binding(1) var<storage, read> weights: array<vec4<u32>>;

var<private> acc: array<vec4<f32>, M>;
// Each vector's first element in x, and (where cols % 4 == 0) its first vec4 in x4.
var<private> xs: array<u32, M>;
var<private> xb: array<u32, M>;

// 8 f16 weights as two vec4s.
fn lo8(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
fn hi8(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
}

// Adds the products of 8 weights of each of the NR rows (w0 .. w3; w2 and w3 unused when NR = 2) at columns
// 8 c .. 8 c + 8 to acc (row r in component r), for every vector.
fn dot8(w0: vec4<u32>, w1: vec4<u32>, w2: vec4<u32>, w3: vec4<u32>, c: u32) {
    let l0 = lo8(w0);
    let h0 = hi8(w0);
    let l1 = lo8(w1);
    let h1 = hi8(w1);
    for (var v = 0u; v < M; v++) {
        let p = x4[xb[v] + 2u * c];
        let q = x4[xb[v] + 2u * c + 1u];
        var s = vec4<f32>(dot(l0, p) + dot(h0, q), dot(l1, p) + dot(h1, q), 0.0, 0.0);
        if (NR == 4u) {
            s.z = dot(lo8(w2), p) + dot(hi8(w2), q);
            s.w = dot(lo8(w3), p) + dot(hi8(w3), q);
        }
        acc[v] += s;
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
    let v0 = wid.y * M;
    for (var v = 0u; v < M; v++) {
        xs[v] = min(v0 + v, call.m - 1u) * params.cols;
        xb[v] = xs[v] / 4u;
    }
    let pairs = params.cols / 2u;
    for (var blk = wid.x; blk * rows_per_block() < rows; blk += nwg.x) {
        let row0 = group_row0(blk);
        // The rows, clamped (a row past the end repeats the last; its sums are not written).
        let r0 = min(row0, rows - 1u);
        let r1 = min(row0 + 1u, rows - 1u);
        let r2 = min(row0 + 2u, rows - 1u);
        let r3 = min(row0 + 3u, rows - 1u);
        for (var v = 0u; v < M; v++) {
            acc[v] = vec4<f32>(0.0);
        }
        if (pairs % 4u == 0u) {
            let n = pairs / 4u;
            let b0 = r0 * n;
            let b1 = r1 * n;
            let b2 = r2 * n;
            let b3 = r3 * n;
            let l = rg_lanes;
            // One vec4 of each row per step (two per step measured the same on an H200).
            for (var c = rg_lane; c < n; c += l) {
                var w2 = vec4<u32>(0u);
                var w3 = vec4<u32>(0u);
                if (NR == 4u) {
                    w2 = weights[b2 + c];
                    w3 = weights[b3 + c];
                }
                dot8(weights[b0 + c], weights[b1 + c], w2, w3, c);
            }
        } else {
            for (var c = rg_lane; c < pairs; c += rg_lanes) {
                let i0 = r0 * pairs + c;
                let i1 = r1 * pairs + c;
                let i2 = r2 * pairs + c;
                let i3 = r3 * pairs + c;
                let w0 = unpack2x16float(weights[i0 / 4u][i0 % 4u]);
                let w1 = unpack2x16float(weights[i1 / 4u][i1 % 4u]);
                let w2 = unpack2x16float(weights[i2 / 4u][i2 % 4u]);
                let w3 = unpack2x16float(weights[i3 / 4u][i3 % 4u]);
                for (var v = 0u; v < M; v++) {
                    let xv = vec2<f32>(x[xs[v] + 2u * c], x[xs[v] + 2u * c + 1u]);
                    var s = vec4<f32>(dot(w0, xv), dot(w1, xv), 0.0, 0.0);
                    if (NR == 4u) {
                        s.z = dot(w2, xv);
                        s.w = dot(w3, xv);
                    }
                    acc[v] += s;
                }
            }
        }
        for (var v = 0u; v < M; v++) {
            store_rows(acc[v], blk, 0u, v0 + v, rows, call.m);
        }
    }
}
