// Shared by q_gemv.wgsl and gemv_f16.wgsl: row groups, and the sums of their rows.
//
// A workgroup is split into row groups. A row group takes NR = 4 consecutive rows at a time; its lanes stride
// over the columns together (consecutive lanes read consecutive 16-byte pieces of every row), so each x value a
// lane loads serves 4 rows, and each lane keeps a vec4 of partial sums (one component per row) per vector.
// SUBGROUP: a row group is one subgroup (any width), summed with subgroupAdd, no workgroup memory.
// Portable: a row group is 32 consecutive invocations, summed through workgroup memory.
// The kernel walks row blocks (rows_per_block() rows each) with a loop that is uniform over the workgroup.

var<private> rg_lid: u32;
// Lane within the row group, lanes per row group, the row group and row groups per workgroup.
var<private> rg_lane: u32;
var<private> rg_lanes: u32;
var<private> rg_group: u32;
var<private> rg_groups: u32;
//#if SUBGROUP
//#else
var<workgroup> rg_buf: array<f32, WG * NR>;
//#endif

//#if SUBGROUP
fn rows_init(lid: u32, sid: u32, sgid: u32, nsg: u32, sg_size: u32) {
    rg_lid = lid;
    rg_lane = sid;
    rg_lanes = sg_size;
    rg_group = sgid;
    rg_groups = nsg;
}
//#else
fn rows_init(lid: u32) {
    rg_lid = lid;
    rg_lane = lid % 32u;
    rg_lanes = 32u;
    rg_group = lid / 32u;
    rg_groups = WG / 32u;
}
//#endif

// Rows one workgroup takes per row block.
fn rows_per_block() -> u32 {
    return rg_groups * NR;
}

// The first row of this invocation's row group in row block `blk`.
fn group_row0(blk: u32) -> u32 {
    return (blk * rg_groups + rg_group) * NR;
}

// Writes y[v][row0 + r] = the sum over the row group of acc[r], for the rows r below `rows` (row0 =
// group_row0(blk)), if v < m. Call from control flow uniform over the workgroup.
fn store_rows(acc: vec4<f32>, blk: u32, v: u32, rows: u32, m: u32) {
    let row0 = group_row0(blk);
//#if SUBGROUP
    let total = subgroupAdd(acc);
    if (rg_lane < NR && row0 + rg_lane < rows && v < m) {
        y[v * rows + row0 + rg_lane] = total[rg_lane];
    }
//#else
    for (var r = 0u; r < NR; r++) {
        rg_buf[r * WG + rg_lid] = acc[r];
    }
    workgroupBarrier();
    // Lane r of each row group sums row r.
    if (rg_lane < NR) {
        let base = rg_lane * WG + rg_group * 32u;
        var total = 0.0;
        for (var i = 0u; i < 32u; i++) {
            total += rg_buf[base + i];
        }
        if (row0 + rg_lane < rows && v < m) {
            y[v * rows + row0 + rg_lane] = total;
        }
    }
    workgroupBarrier();
//#endif
}
