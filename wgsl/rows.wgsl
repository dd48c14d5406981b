// Shared by q_gemv.wgsl and gemv_f16.wgsl: a workgroup takes NR consecutive rows at a time (a row block; NR is 2,
// 4 or 8, set by the host), and its WG invocations stride over the columns together (consecutive
// invocations read consecutive 16-byte pieces of every row), so each x value an invocation loads serves NR rows;
// each keeps a vec4 of partial sums per vector for each quad of up to 4 rows (one component per row). The sums,
// a quad at a time: SUBGROUP, subgroupAdd, then one vec4 per subgroup through workgroup memory (any subgroup
// width); portable, all through workgroup memory.
// The kernel walks row blocks with a loop that is uniform over the workgroup.

var<private> rg_lid: u32;
// Lane within the row group (the workgroup) and lanes per row group.
var<private> rg_lane: u32;
var<private> rg_lanes: u32;
//#if SUBGROUP
var<private> rg_sid: u32;
var<private> rg_sgid: u32;
var<private> rg_nsg: u32;
//#endif
// Rows per quad.
const QR: u32 = min(NR, 4u);
var<workgroup> rg_buf: array<f32, WG * QR>;

//#if SUBGROUP
fn rows_init(lid: u32, sid: u32, sgid: u32, nsg: u32) {
    rg_sid = sid;
    rg_sgid = sgid;
    rg_nsg = nsg;
//#else
fn rows_init(lid: u32) {
//#endif
    rg_lid = lid;
    rg_lane = lid;
    rg_lanes = WG;
}

// Rows one workgroup takes per row block.
fn rows_per_block() -> u32 {
    return NR;
}

// The first row of row block `blk`.
fn group_row0(blk: u32) -> u32 {
    return blk * NR;
}

// Writes y[v][row0 + r] = the sum over the workgroup of acc[r] for r < QR, for the rows below `rows` (row0 =
// group_row0(blk) + 4 quad), if v < m. Call from control flow uniform over the workgroup.
fn store_rows(acc: vec4<f32>, blk: u32, quad: u32, v: u32, rows: u32, m: u32) {
    let row0 = group_row0(blk) + 4u * quad;
//#if SUBGROUP
    let s = subgroupAdd(acc);
    if (rg_sid == 0u) {
        for (var r = 0u; r < QR; r++) {
            rg_buf[r * WG + rg_sgid] = s[r];
        }
    }
    let parts = rg_nsg;
//#else
    for (var r = 0u; r < QR; r++) {
        rg_buf[r * WG + rg_lid] = acc[r];
    }
    let parts = WG;
//#endif
    workgroupBarrier();
    // Invocation r sums row r.
    if (rg_lid < QR) {
        var total = 0.0;
        for (var i = 0u; i < parts; i++) {
            total += rg_buf[rg_lid * WG + i];
        }
        if (row0 + rg_lid < rows && v < m) {
            y[v * rows + row0 + rg_lid] = total;
        }
    }
    workgroupBarrier();
}
