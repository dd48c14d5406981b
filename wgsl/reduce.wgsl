// Shared by q_gemv.wgsl, gemv_f32.wgsl and gemv_f16.wgsl: the sum of one value over the workgroup.
//
// Portable (no SUBGROUP): a tree in workgroup memory, log2(WG) barriers. SUBGROUP: subgroupAdd, then one
// partial per subgroup in workgroup memory (any subgroup width). Callers must call `workgroup_sum` from uniform
// control flow on every invocation.

var<private> red_lid: u32;
var<workgroup> red_buf: array<f32, WG>;
//#if SUBGROUP
var<private> red_sid: u32;
var<private> red_sgid: u32;
var<private> red_nsg: u32;
//#endif

//#if SUBGROUP
fn reduce_init(lid: u32, sid: u32, sgid: u32, nsg: u32) {
    red_lid = lid;
    red_sid = sid;
    red_sgid = sgid;
    red_nsg = nsg;
}
//#else
fn reduce_init(lid: u32) {
    red_lid = lid;
}
//#endif

// The sum of `v` over the workgroup; the result is valid on local invocation 0 only.
fn workgroup_sum(v: f32) -> f32 {
//#if SUBGROUP
    let s = subgroupAdd(v);
    if (red_sid == 0u) {
        red_buf[red_sgid] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    if (red_lid == 0u) {
        for (var i = 0u; i < red_nsg; i++) {
            total += red_buf[i];
        }
    }
    workgroupBarrier();
    return total;
//#else
    red_buf[red_lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (red_lid < stride) {
            red_buf[red_lid] += red_buf[red_lid + stride];
        }
        workgroupBarrier();
    }
    let total = red_buf[0];
    workgroupBarrier();
    return total;
//#endif
}
