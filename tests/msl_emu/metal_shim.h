// metal_shim.h: just enough of the Metal Shading Language, in C++17, to run ecq's kernels (msl/) on a CPU.
//
// Test-only: this file lives in tests/ and is never part of the library. The .metal sources compile
// unchanged: `#include <metal_stdlib>` finds the file of that name next to this one.
//
// READ ME FIRST
// - SIMT emulation: every GPU thread of a threadgroup runs as a fiber (its own stack) on one OS thread.
//   A fiber runs until it reaches a collective (a simd_* function or threadgroup_barrier), records its
//   operand and yields to the scheduler. When all 32 lanes of a simdgroup wait at a simd_* function, the
//   scheduler computes every lane's result and resumes them; when every thread waits at a barrier, all resume.
// - Stricter than the hardware, on purpose: every lane of a simdgroup must reach the same collective (no
//   simd_* call in divergent control flow), a shuffle must name a lane in 0..32, and no thread may leave
//   while others wait at a barrier. Any violation aborts with a message naming the lanes.
// - Address spaces: `device`, `constant` and `thread` vanish; `threadgroup` becomes `static thread_local`,
//   so a threadgroup array declared at kernel scope is shared by the fibers of the threadgroup running on
//   this OS thread. The kernels therefore never pass threadgroup memory to helpers by pointer (a
//   `static` parameter would not compile, so a violation is loud).
// - Attributes: every `[[name(...)]]` the kernels use is defined to nothing, leaving a legal empty `[[]]`.
// - Include this header, then the kernel sources, then metal_shim_end.h, before any other code: the macros
//   above would rename identifiers in later standard headers.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

namespace metal {

// ---------------------------------------------------------------------------------------------------------
// Scalar helpers and vector types (only what the kernels use).

template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}
template <class T>
inline T clamp(T v, T lo, T hi) {
    return min(max(v, lo), hi);
}
inline uint popcount(uint v) {
    return uint(__builtin_popcount(v));
}

struct uint2 {
    uint x, y;
    uint2() : x(0), y(0) {}
    uint2(uint x_, uint y_) : x(x_), y(y_) {}
};

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

struct simd_vote {
    typedef uint64_t vote_t;
    explicit simd_vote(vote_t v) : bits(v) {}
    explicit operator vote_t() const { return bits; }
    vote_t bits;
};

}  // namespace metal

using metal::uint2;

// ---------------------------------------------------------------------------------------------------------
// The SIMT runtime: fibers, collectives, scheduler.

namespace emu {

constexpr uint SIMD_WIDTH = 32;
constexpr size_t FIBER_STACK = 256 * 1024;

[[noreturn]] inline void fatal(const std::string& message) {
    std::fprintf(stderr, "msl-emu: error: %s\n", message.c_str());
    std::fflush(stderr);
    std::exit(3);
}

enum class Op : uint8_t { Ballot, Sum, PrefixExclusiveSum, Shuffle, Barrier };
enum class Ty : uint8_t { U32, I32, F32, U16 };

inline const char* op_name(Op op) {
    switch (op) {
        case Op::Ballot: return "simd_ballot";
        case Op::Sum: return "simd_sum";
        case Op::PrefixExclusiveSum: return "simd_prefix_exclusive_sum";
        case Op::Shuffle: return "simd_shuffle";
        case Op::Barrier: return "threadgroup_barrier";
    }
    return "?";
}

template <class T>
struct TyOf;
template <>
struct TyOf<uint> {
    static constexpr Ty value = Ty::U32;
};
template <>
struct TyOf<int> {
    static constexpr Ty value = Ty::I32;
};
template <>
struct TyOf<float> {
    static constexpr Ty value = Ty::F32;
};
template <>
struct TyOf<ushort> {
    static constexpr Ty value = Ty::U16;
};

struct Fiber {
    enum class State { Ready, Waiting, Done };
    void* sp = nullptr;  // saved stack pointer while suspended (x86-64 switch)
#if !defined(__x86_64__)
    ucontext_t context;
#endif
    std::vector<unsigned char> stack;
    State state = State::Ready;
    uint tid = 0;
    Op op = Op::Ballot;
    Ty ty = Ty::U32;
    uint64_t in = 0;   // operand bits
    uint arg = 0;      // shuffle source lane
    uint64_t out = 0;  // result bits
};

// One threadgroup in flight on this OS thread.
struct Threadgroup {
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t scheduler_context;
#endif
    const std::function<void(uint)>* body = nullptr;
};

inline thread_local Threadgroup* current_group = nullptr;

}  // namespace emu

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer of the running context into *save_sp, then resumes
// the context whose stack pointer is load_sp (System V ABI: rbx, rbp, r12-r15 are callee-saved).
extern "C" void ecq_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl ecq_emu_switch
    .type ecq_emu_switch, @function
ecq_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ecq_emu_switch, .-ecq_emu_switch
)");
#endif

namespace emu {

inline void yield_to_scheduler() {
    Threadgroup* g = current_group;
#if defined(__x86_64__)
    ecq_emu_switch(&g->current->sp, g->scheduler_sp);
#else
    swapcontext(&g->current->context, &g->scheduler_context);
#endif
}

// Entry of every fiber: run the kernel for this thread, mark it done, hand control back for good.
inline void fiber_main() {
    Threadgroup* g = current_group;
    Fiber* f = g->current;
    (*g->body)(f->tid);
    f->state = Fiber::State::Done;
    yield_to_scheduler();
    fatal("a finished fiber was resumed");
}

inline void fiber_init(Fiber& f) {
    if (f.stack.size() != FIBER_STACK) f.stack.assign(FIBER_STACK, 0);
#if defined(__x86_64__)
    // Initial stack, as ecq_emu_switch expects to find it: six saved registers, then the return address
    // (fiber_main), then a dummy return address for fiber_main so that it starts with rsp % 16 == 8.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack.data()) + f.stack.size()) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top) - 8;
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void*>(&fiber_main);
    sp[7] = nullptr;
    f.sp = sp;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, &fiber_main, 0);
#endif
}

inline void resume(Threadgroup& g, Fiber& f) {
    g.current = &f;
#if defined(__x86_64__)
    ecq_emu_switch(&g.scheduler_sp, f.sp);
#else
    swapcontext(&g.scheduler_context, &f.context);
#endif
    g.current = nullptr;
}

template <class T>
inline uint64_t to_bits(T v) {
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// Called by a kernel thread: record the operand, wait for the simdgroup (or threadgroup), return the result.
template <class T>
inline T collective(Op op, T value, uint arg) {
    Threadgroup* g = current_group;
    if (g == nullptr) fatal(std::string(op_name(op)) + " called outside a kernel launch");
    Fiber* f = g->current;
    f->op = op;
    f->ty = TyOf<T>::value;
    f->in = to_bits(value);
    f->arg = arg;
    f->state = Fiber::State::Waiting;
    yield_to_scheduler();
    return from_bits<T>(f->out);
}

template <class T>
inline void reduce_typed(Fiber* lanes, Op op) {
    T running = T(0);
    for (uint i = 0; i < SIMD_WIDTH; i++) {
        T v = from_bits<T>(lanes[i].in);
        if (op == Op::PrefixExclusiveSum) lanes[i].out = to_bits(running);
        running = T(running + v);
    }
    if (op == Op::Sum) {
        for (uint i = 0; i < SIMD_WIDTH; i++) lanes[i].out = to_bits(running);
    }
}

// All 32 lanes wait at the same simd_* function: compute each lane's result.
inline void resolve_simd(Fiber* lanes, uint simdgroup) {
    const Op op = lanes[0].op;
    const Ty ty = lanes[0].ty;
    for (uint i = 1; i < SIMD_WIDTH; i++) {
        if (lanes[i].op != op || lanes[i].ty != ty) {
            fatal("simdgroup " + std::to_string(simdgroup) + ": lane 0 waits at " + op_name(op) + ", lane " +
                  std::to_string(i) + " at " + op_name(lanes[i].op) + " (divergent collectives)");
        }
    }
    switch (op) {
        case Op::Ballot: {
            uint64_t mask = 0;
            for (uint i = 0; i < SIMD_WIDTH; i++) mask |= uint64_t(lanes[i].in != 0) << i;
            for (uint i = 0; i < SIMD_WIDTH; i++) lanes[i].out = mask;
            break;
        }
        case Op::Sum:
        case Op::PrefixExclusiveSum:
            switch (ty) {
                case Ty::U32: reduce_typed<uint>(lanes, op); break;
                case Ty::I32: reduce_typed<int>(lanes, op); break;
                case Ty::F32: reduce_typed<float>(lanes, op); break;
                case Ty::U16: reduce_typed<ushort>(lanes, op); break;
            }
            break;
        case Op::Shuffle: {
            uint64_t in[SIMD_WIDTH];
            for (uint i = 0; i < SIMD_WIDTH; i++) in[i] = lanes[i].in;
            for (uint i = 0; i < SIMD_WIDTH; i++) {
                if (lanes[i].arg >= SIMD_WIDTH) {
                    fatal("simdgroup " + std::to_string(simdgroup) + ": lane " + std::to_string(i) +
                          " shuffles from lane " + std::to_string(lanes[i].arg));
                }
                lanes[i].out = in[lanes[i].arg];
            }
            break;
        }
        case Op::Barrier: fatal("internal: barrier resolved as a simd collective");
    }
    for (uint i = 0; i < SIMD_WIDTH; i++) lanes[i].state = Fiber::State::Ready;
}

// Runs one threadgroup of `threads` threads (a multiple of 32) to completion; `body(tid)` runs one thread.
inline void run_threadgroup(Threadgroup& g, uint threads, const std::function<void(uint)>& body) {
    if (threads == 0 || threads % SIMD_WIDTH != 0) fatal("threadgroup size must be a positive multiple of 32");
    g.fibers.resize(threads);
    g.body = &body;
    current_group = &g;
    for (uint t = 0; t < threads; t++) {
        g.fibers[t].tid = t;
        g.fibers[t].state = Fiber::State::Ready;
        fiber_init(g.fibers[t]);
    }
    const uint simdgroups = threads / SIMD_WIDTH;
    for (;;) {
        // Run each simdgroup until all its lanes are done or wait at a barrier.
        for (uint s = 0; s < simdgroups; s++) {
            Fiber* lanes = &g.fibers[s * SIMD_WIDTH];
            for (;;) {
                for (uint i = 0; i < SIMD_WIDTH; i++) {
                    if (lanes[i].state == Fiber::State::Ready) resume(g, lanes[i]);
                }
                uint done = 0, at_barrier = 0;
                for (uint i = 0; i < SIMD_WIDTH; i++) {
                    done += lanes[i].state == Fiber::State::Done;
                    at_barrier += lanes[i].state == Fiber::State::Waiting && lanes[i].op == Op::Barrier;
                }
                if (done == SIMD_WIDTH || at_barrier == SIMD_WIDTH) break;
                if (done == 0 && at_barrier == 0) {
                    resolve_simd(lanes, s);
                    continue;
                }
                std::string who;
                for (uint i = 0; i < SIMD_WIDTH; i++) {
                    who += " " + std::to_string(i) + ":" +
                           (lanes[i].state == Fiber::State::Done ? "done" : op_name(lanes[i].op));
                }
                fatal("simdgroup " + std::to_string(s) + " diverged at a collective; lanes:" + who);
            }
        }
        uint done = 0;
        for (const Fiber& f : g.fibers) done += f.state == Fiber::State::Done;
        if (done == threads) break;
        if (done != 0) {
            fatal(std::to_string(done) + " of " + std::to_string(threads) +
                  " threads returned while the others wait at threadgroup_barrier");
        }
        for (Fiber& f : g.fibers) f.state = Fiber::State::Ready;  // everyone reached the barrier
    }
    current_group = nullptr;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// The Metal functions the kernels call.

namespace metal {

inline simd_vote simd_ballot(bool predicate) {
    return simd_vote(simd_vote::vote_t(emu::collective<uint>(emu::Op::Ballot, predicate ? 1u : 0u, 0)));
}
template <class T>
inline T simd_sum(T value) {
    return emu::collective<T>(emu::Op::Sum, value, 0);
}
template <class T>
inline T simd_prefix_exclusive_sum(T value) {
    return emu::collective<T>(emu::Op::PrefixExclusiveSum, value, 0);
}
template <class T>
inline T simd_shuffle(T value, ushort lane) {
    return emu::collective<T>(emu::Op::Shuffle, value, lane);
}
inline void threadgroup_barrier(mem_flags) {
    emu::collective<uint>(emu::Op::Barrier, 0u, 0);
}

}  // namespace metal

// ---------------------------------------------------------------------------------------------------------
// Address spaces and attributes. Undone by metal_shim_end.h.

#define device
#define constant
#define thread
#define threadgroup static thread_local
#define kernel
#define host_name(name)
#define buffer(index)
#define threadgroup_position_in_grid
#define threadgroups_per_grid
#define thread_index_in_threadgroup
#define threads_per_threadgroup
#define thread_index_in_simdgroup
#define simdgroup_index_in_threadgroup
#define simdgroups_per_threadgroup
