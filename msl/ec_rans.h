// ec_rans.h: what every ecq Metal kernel shares: the parameter block, the stream constants and the rANS tile
// decoding steps (docs/FORMAT.md, src/rans/tile.rs).
//
// The Metal runtime compiler has no include path for user files, so the host prepends this file to each kernel
// source (src/kernels_msl.rs does it with concat!); the Linux emulation harness includes it the same way.
//
// - Every index taken from stream data (tile offsets, word positions, table slots) is clamped: a corrupt
//   stream yields wrong numbers and a nonzero tile status, never an out-of-bounds access.
// - Simdgroups are 32 wide on every Apple GPU; the lane-per-row layout depends on it.
// - Threadgroup memory is declared only at kernel scope and is never passed to helpers by pointer (the
//   emulation harness in tests/msl_emu/ maps the `threadgroup` qualifier to per-thread static storage).

#include <metal_stdlib>
using namespace metal;

// Host-side layout: twelve little-endian u32, 48 bytes.
struct EcParams {
    uint rows;         // N, output features
    uint cols;         // K, input features
    uint bits;         // bits per weight; must equal the kernel's BITS
    uint group_size;   // columns per scale/bias group; divides segment and cols, multiple of 8 / bits
    uint segment;      // S, columns per segment (the last segment of a row may be shorter)
    uint segments;     // ceil(K / S)
    uint row_tiles;    // ceil(N / 32)
    uint precision;    // P; the decode table holds 2^P entries, P <= 12
    uint total_words;  // entries in `words`
    uint vectors;      // M, input vectors (ec_gemv); unused by rans_decode
    uint low_bits;     // 2 for a split stream (ec_gemv_split_*: bits 2 coded, 4-bit weights), else 0
    uint reserved1;    // zero
};

constant constexpr uint LANES = 32;
constant constexpr uint STATE_LOWER = 1u << 16;
constant constexpr uint MAX_PRECISION = 12;
// Table sizes the kernels are instantiated for (2^TABLE_BITS entries): 11 holds any P <= 11 (8 KiB, ecq's
// default P = 11), 12 the largest (16 KiB). Threadgroup memory the table does not need is held all the same, and
// a GPU keeps fewer threadgroups resident the more each one holds (on an NVIDIA H200 through Vulkan, a 16 KiB
// table let 3 decode workgroups run per SM, an 8 KiB one all of them).
constant constexpr uint SMALL_TABLE_BITS = 11;
constant constexpr uint MAX_SIMDGROUPS = 8;

// ---------------------------------------------------------------------------------------------------------
// Helpers

// The word range [start, end) of tile `tile`, clamped to the words buffer and to start <= end.
inline uint2 tile_word_range(device const uint* tile_offsets, uint tile, uint total_words) {
    const uint start = min(tile_offsets[tile], total_words);
    const uint end = clamp(tile_offsets[tile + 1], start, total_words);
    return uint2(start, end);
}

// Word `index` of the stream if it lies in the tile, else 0 (a corrupt or exhausted tile reads zeros).
inline uint load_word(device const ushort* words, uint index, uint end) {
    return index < end ? uint(words[index]) : 0u;
}

// The unread words of one tile as seen by one lane. Invariant (same in every lane): base <= pos < base + 32.
struct WordWindow {
    uint pos;   // next unread word of the tile
    uint base;  // first word held by the window
    uint lo;    // word base + lane
    uint hi;    // word base + 32 + lane
};

inline WordWindow word_window(device const ushort* words, uint2 range, uint lane) {
    WordWindow window;
    window.pos = range.x;
    window.base = range.x;
    window.lo = load_word(words, range.x + lane, range.y);
    window.hi = load_word(words, range.x + LANES + lane, range.y);
    return window;
}

// One rANS decode step with the slot's table entry: x' = f * (x >> P) + (x mod 2^P) - cum, where the entry
// packs symbol | (f - 1) << 8 | (slot - cum) << 20 and slot = x mod 2^P.
inline uint rans_advance(uint state, uint entry, uint precision) {
    const uint freq = ((entry >> 8) & 0xfffu) + 1u;
    return freq * (state >> precision) + (entry >> 20);
}

// Renormalization after one step, called by all 32 lanes together. Lanes whose state fell below 2^16 shift
// in one word each; the words are handed out in ascending lane order, the order the encoder reversed.
inline uint renormalize(uint state, bool active, uint lane, thread WordWindow& window,
                        device const ushort* words, uint end) {
    const bool need = active && state < STATE_LOWER;
    const uint ballot = uint((simd_vote::vote_t)simd_ballot(need));
    // offset < 64: pos - base < 32 and at most 31 lower lanes.
    const uint offset = window.pos - window.base + popcount(ballot & ((1u << lane) - 1u));
    const uint from_lo = simd_shuffle(window.lo, ushort(offset & (LANES - 1u)));
    const uint from_hi = simd_shuffle(window.hi, ushort(offset & (LANES - 1u)));
    const uint word = offset < LANES ? from_lo : from_hi;
    window.pos += popcount(ballot);
    if (window.pos - window.base >= LANES) {
        // Slide by one half: the upper half becomes the lower, the next 32 words are loaded ahead of use.
        window.base += LANES;
        window.lo = window.hi;
        window.hi = load_word(words, window.base + LANES + lane, end);
    }
    return need ? (state << 16 | word) : state;
}

// Integrity at the end of a tile, called by all 32 lanes together: 0 when every active state is back at 2^16
// and the tile's words were consumed exactly; bit 0 flags an end state, bit 1 the word count.
inline uint tile_check(uint state, bool active, thread const WordWindow& window, uint end) {
    const uint bad_states = uint((simd_vote::vote_t)simd_ballot(active && state != STATE_LOWER));
    return (bad_states != 0 ? 1u : 0u) | (window.pos != end ? 2u : 0u);
}
