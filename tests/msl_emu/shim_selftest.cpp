// Self-test of the SIMT emulation in metal_shim.h: small kernels written in MSL style whose collectives have
// known results, so the GEMV and decode checks rest on a shim that is itself checked.
//
// Usage: shim_selftest collectives   -> prints "shim selftest ok" and exits 0, or lists mismatches, exits 1
//        shim_selftest divergent     -> a simd_sum reached by half the lanes: the shim must abort (exit 3)
//        shim_selftest early_return  -> a thread returns while the others wait at a barrier: must abort
#include <metal_stdlib>
using namespace metal;

constant constexpr uint SELFTEST_VALUES = 7;

[[kernel]] void collectives(device uint* out [[buffer(0)]], device float* out_f [[buffer(1)]],
                            uint group [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                            uint threads [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                            uint simdgroup [[simdgroup_index_in_threadgroup]]) {
    threadgroup uint shared[256];
    const uint v = lane * 7 + simdgroup * 100 + group * 1000;
    const uint ballot = uint((simd_vote::vote_t)simd_ballot(lane % 3 == 0 || lane == 31));
    const uint prefix = simd_prefix_exclusive_sum(v);
    const uint total = simd_sum(v);
    const uint shuffled = simd_shuffle(v, ushort((lane + 5) % 32));
    const float half_sum = simd_sum(float(lane) * 0.5f);
    shared[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Written by another simdgroup before the barrier: visible only if the barrier really waits for everyone.
    const uint other = shared[(tid + 32) % threads];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    shared[tid] = 0;
    const uint base = (group * threads + tid) * SELFTEST_VALUES;
    out[base + 0] = ballot;
    out[base + 1] = prefix;
    out[base + 2] = total;
    out[base + 3] = shuffled;
    out[base + 4] = other;
    out[base + 5] = lane;
    out[base + 6] = simdgroup;
    out_f[group * threads + tid] = half_sum;
}

[[kernel]] void divergent(device uint* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
    if (lane < 16) {
        out[lane] = simd_sum(lane);
    }
}

[[kernel]] void early_return(device uint* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    if (tid == 40) {
        return;
    }
    out[tid] = tid;
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

#include "metal_shim_end.h"

#include "driver.h"

int main(int argc, char** argv) {
    const std::string mode = argc == 2 ? argv[1] : "";
    const uint32_t groups = 3, threads = 128;
    std::vector<uint32_t> out(groups * threads * SELFTEST_VALUES, 0xdeadbeef);
    std::vector<float> out_f(groups * threads, -1.0f);
    if (mode == "divergent") {
        driver::launch(1, 32, 1, [&](uint32_t, uint32_t tid) { divergent(out.data(), tid % 32); });
        return 0;
    }
    if (mode == "early_return") {
        driver::launch(1, 64, 1, [&](uint32_t, uint32_t tid) { early_return(out.data(), tid); });
        return 0;
    }
    if (mode != "collectives") driver::die("usage: shim_selftest collectives|divergent|early_return");

    driver::launch(groups, threads, 2, [&](uint32_t group, uint32_t tid) {
        collectives(out.data(), out_f.data(), group, tid, threads, tid % 32, tid / 32);
    });

    uint32_t ballot = 0;
    for (uint32_t l = 0; l < 32; l++) ballot |= uint32_t(l % 3 == 0 || l == 31) << l;
    int bad = 0;
    auto expect = [&](const char* what, uint32_t group, uint32_t tid, uint32_t got, uint32_t want) {
        if (got != want && bad++ < 20) {
            std::fprintf(stderr, "group %u thread %u %s: got %u, want %u\n", group, tid, what, got, want);
        }
    };
    for (uint32_t g = 0; g < groups; g++) {
        for (uint32_t t = 0; t < threads; t++) {
            const uint32_t lane = t % 32, sg = t / 32;
            auto value = [&](uint32_t l, uint32_t s) { return l * 7 + s * 100 + g * 1000; };
            uint32_t prefix = 0, total = 0;
            for (uint32_t l = 0; l < 32; l++) {
                if (l < lane) prefix += value(l, sg);
                total += value(l, sg);
            }
            const uint32_t other_tid = (t + 32) % threads;
            const uint32_t* o = &out[(g * threads + t) * SELFTEST_VALUES];
            expect("ballot", g, t, o[0], ballot);
            expect("prefix_exclusive_sum", g, t, o[1], prefix);
            expect("sum", g, t, o[2], total);
            expect("shuffle", g, t, o[3], value((lane + 5) % 32, sg));
            expect("value across barrier", g, t, o[4], value(other_tid % 32, other_tid / 32));
            expect("lane", g, t, o[5], lane);
            expect("simdgroup", g, t, o[6], sg);
            if (out_f[g * threads + t] != 248.0f) {  // 0.5 * (0 + 1 + ... + 31)
                expect("float sum * 1000", g, t, uint32_t(out_f[g * threads + t] * 1000), 248000);
            }
        }
    }
    if (bad != 0) {
        std::fprintf(stderr, "shim selftest: %d mismatches\n", bad);
        return 1;
    }
    std::printf("shim selftest ok\n");
    return 0;
}
