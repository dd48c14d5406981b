// ec_gemv.metal: fused rANS decode + dequantize + GEMV over ecq's tile stream, y = W x for 1..=8 vectors.
//
// READ ME FIRST
// - Stream format (docs/FORMAT.md, src/rans/tile.rs): a tile is 32 rows (one lane per row) by one segment of
//   columns; its 32 rANS states share one stream of 16-bit words. Each step every active lane decodes one
//   joint symbol of k = 8 / BITS weights (low weight in the low bits), then the lanes renormalize in
//   ascending order, each taking at most one word. Tiles are stored row-tile-major.
// - Grid: one threadgroup per row tile. Its simdgroups share one copy of the decode table in threadgroup
//   memory and take the row tile's segments in turn (simdgroup s: segments s, s + G, s + 2G, ...). Each lane
//   keeps its row's partial sums; the simdgroups' partial sums are added in threadgroup memory at the end, so
//   no atomics are needed and every output is written once.
// - Word positions: a lane that needs a word takes the tile's next unread word plus the number of lower lanes
//   that also need one, `popcount(ballot & lanes_below)`. Words reach the lanes through a 64-word register
//   window (two words per lane, moved by `simd_shuffle`), refilled one window ahead so that the device-memory
//   load is not on the per-step dependency chain.
// - Dequantization is folded into the dot product per group: y += scale * sum(q * x) + bias * sum(x), and
//   sum(x) is one lane-strided sum plus `simd_sum`, shared by the 32 rows.
// - Split streams (docs/FORMAT.md section 2.1; the ec_gemv_split_* entry points, BITS = 2 coded): every 4 steps
//   code the high 2 bits of one block of 16 columns in interleaved order (columns 0, 8, 1, 9, ...); with the
//   block's low word (`low`, by row tile, block and row) they make two packed words of 4-bit weights. Those of
//   section 2.2 (the ec_gemv_split3_* entry points, BITS = 1 coded): every 4 steps code q3 ^ q2 of one block of 32
//   columns (position p is column 8 (p % 4) + p / 4); with the block's three low words (`low`, by row tile,
//   block, word and row) they make four packed words.
// - Stream-derived indices are clamped (see ec_rans.h); a corrupt tile sets its `tile_status`. Sizes come from
//   `EcParams`, which the host validates (wgpu passes no buffer lengths to passthrough shaders).
//
// Entry points (threadgroup = 256 threads, 8 simdgroups; grid = row_tiles threadgroups):
//   ec_gemv_b{1..8}_v1_t{11,12}   one vector (params.vectors == 1)
//   ec_gemv_b{1..8}_v8_t{11,12}   up to 8 vectors (params.vectors in 1..=8), one accumulator per vector per lane
//   ec_gemv_split_v{1,8}_t{11,12} the same for split streams (params.bits == 2, params.low_bits == 2)
//   ec_gemv_split3_v{1,8}_t{11,12} the same for split streams of one coded bit (params.bits == 1, low_bits == 3)
// where t11 holds a decode table of 2^11 entries (params.precision <= 11) and t12 one of 2^12.
// Buffers, in binding order:
//   0 words         ushort[total_words]        the tiles' 16-bit words, tile after tile
//   1 tile_offsets  uint[tiles + 1]            start of each tile in words, plus the total
//   2 states        uint[tiles * 32]           initial decoder states; inactive lanes hold 2^16
//   3 decode_table  uint[2^precision]          symbol | (freq - 1) << 8 | (slot - cum) << 20
//   4 scales        float[rows * cols / group_size]
//   5 biases        float[rows * cols / group_size]
//   6 low           uint[row_tiles * 32 * cols / 16]  a split stream's low words (row_tiles * 32 * cols / 32 * 3
//                                              for ec_gemv_split3_*); read by the split entry points only
//   7 x             float[vectors * cols]      row-major, one input vector per row
//   8 y             float[vectors * rows]      row-major, written
//   9 tile_status   uint[tiles]                written: 0 ok, bit 0 an end state != 2^16, bit 1 word count
//  10 params        EcParams                   (constant address space)

// Requires ec_rans.h prepended (EcParams, LANES, WordWindow, renormalize, ...).

// sum(q * x) over the COUNT weights of `symbol` (by default the k of one joint symbol; 8 for a packed word of
// 4-bit weights): weight i sits in bits i * BITS.., column i.
template <int BITS, uint COUNT = 8 / BITS>
inline float symbol_dot(uint symbol, device const float* x) {
    constexpr uint MASK = (1u << BITS) - 1u;
    float sum = 0.0f;
    for (uint i = 0; i < COUNT; i++) {
        sum += float((symbol >> (i * BITS)) & MASK) * x[i];
    }
    return sum;
}

// sum(x[0..n]) for the whole simdgroup: lane-strided partial sums, then one simd_sum.
inline float simd_range_sum(device const float* x, uint n, uint lane) {
    float sum = 0.0f;
    for (uint i = lane; i < n; i += LANES) {
        sum += x[i];
    }
    return simd_sum(sum);
}

// ---------------------------------------------------------------------------------------------------------
// Kernel

template <int BITS, int VECTORS, int TABLE_BITS, bool SPLIT>
[[kernel]] void ec_gemv(
    device const ushort* words [[buffer(0)]],
    device const uint* tile_offsets [[buffer(1)]],
    device const uint* states [[buffer(2)]],
    device const uint* decode_table [[buffer(3)]],
    device const float* scales [[buffer(4)]],
    device const float* biases [[buffer(5)]],
    device const uint* low [[buffer(6)]],
    device const float* x [[buffer(7)]],
    device float* y [[buffer(8)]],
    device uint* tile_status [[buffer(9)]],
    constant EcParams& params [[buffer(10)]],
    uint row_tile [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]]) {
    static_assert(BITS >= 1 && BITS <= 8, "ec_gemv supports 1- to 8-bit symbols");
    static_assert(VECTORS >= 1 && VECTORS <= 8, "ec_gemv keeps at most 8 accumulators per lane");
    static_assert(TABLE_BITS >= 1 && TABLE_BITS <= int(MAX_PRECISION), "the table holds 2^1 to 2^12 entries");
    static_assert(!SPLIT || BITS == 2 || BITS == 1, "a split stream codes 2-bit or 1-bit symbols");
    constexpr uint K = 8 / BITS;  // weights per joint symbol
    // Columns a trip of the step loop covers: one joint symbol, or a split stream's block (4 steps): 16 columns,
    // or 32 where one bit is coded.
    constexpr uint STEP_COLS = SPLIT ? 4u * K : K;
    // Low bits of each weight a split stream stores.
    constexpr uint LOW_BITS = SPLIT ? 4u - uint(BITS) : 0u;

    threadgroup uint table[1u << TABLE_BITS];
    threadgroup float partial[MAX_SIMDGROUPS * VECTORS * LANES];

    // Parameters the loops below rely on; the whole threadgroup leaves together if they do not hold.
    const uint group_size = params.group_size;
    // Whole simdgroups only: lane r is row r of the tile.
    if (params.bits != uint(BITS) || params.vectors == 0 || params.vectors > uint(VECTORS) || group_size == 0 ||
        group_size % STEP_COLS != 0 || params.low_bits != LOW_BITS || params.segment == 0 ||
        params.segment % group_size != 0 ||
        params.cols % group_size != 0 || row_tile >= params.row_tiles || threads % LANES != 0 ||
        params.precision > uint(TABLE_BITS)) {
        return;
    }
    // The one-vector variant knows the count at compile time (the check above guarantees it).
    const uint vectors = VECTORS == 1 ? 1u : params.vectors;

    const uint precision = min(params.precision, uint(TABLE_BITS));
    const uint slot_mask = (1u << precision) - 1u;
    for (uint i = tid; i <= slot_mask; i += threads) {
        table[i] = decode_table[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    const uint cols = params.cols;
    const uint row = row_tile * LANES + lane;
    const bool active = row < params.rows;
    const uint groups_per_row = cols / group_size;
    const uint workers = min(simdgroups, MAX_SIMDGROUPS);

    float acc[VECTORS];
    for (int v = 0; v < VECTORS; v++) {
        acc[v] = 0.0f;
    }

    for (uint segment = simdgroup; simdgroup < workers && segment < params.segments; segment += workers) {
        const uint tile = row_tile * params.segments + segment;
        uint state = active ? states[tile * LANES + lane] : STATE_LOWER;
        const uint2 range = tile_word_range(tile_offsets, tile, params.total_words);
        WordWindow window = word_window(words, range, lane);

        const uint col0 = segment * params.segment;
        const uint col_end = min(col0 + params.segment, cols);
        for (uint group_col = col0; group_col < col_end; group_col += group_size) {
            float qx[VECTORS];
            float sx[VECTORS];
            for (int v = 0; v < VECTORS; v++) {
                qx[v] = 0.0f;
                sx[v] = uint(v) < vectors ? simd_range_sum(x + v * cols + group_col, group_size, lane) : 0.0f;
            }
            for (uint col = group_col; col < group_col + group_size; col += STEP_COLS) {
                if (SPLIT) {
                    // Four steps: the block's coded symbols, the first lowest, then merged with its low word.
                    uint hi = 0u;
                    for (uint h = 0; h < 4; h++) {
                        const uint entry = table[state & slot_mask];
                        state = active ? rans_advance(state, entry, precision) : state;
                        hi |= (entry & 0xffu) << (8u * h);
                        state = renormalize(state, active, lane, window, words, range.y);
                    }
                    if (BITS == 2) {
                        const uint lo = low[(row_tile * (cols / 16u) + col / 16u) * LANES + lane];
                        const uint first = ((hi & 0x33333333u) << 2) | (lo & 0x33333333u);
                        const uint second = (hi & 0xccccccccu) | ((lo >> 2) & 0x33333333u);
                        for (int v = 0; v < VECTORS; v++) {
                            if (uint(v) < vectors) {
                                device const float* xv = x + v * cols + col;
                                qx[v] += symbol_dot<4, 8>(first, xv) + symbol_dot<4, 8>(second, xv + 8);
                            }
                        }
                    } else {
                        // One coded bit (section 2.2): q2 = c ^ q3 goes where each of the first three low words
                        // holds a bit of the fourth packed word.
                        const uint at = (row_tile * (cols / 32u) + col / 32u) * 3u * LANES + lane;
                        const uint s0 = low[at];
                        const uint s1 = low[at + LANES];
                        const uint s2 = low[at + 2u * LANES];
                        const uint w0 = (s0 & 0xbbbbbbbbu) | (((hi << 2) ^ (s0 >> 1)) & 0x44444444u);
                        const uint w1 = (s1 & 0xbbbbbbbbu) | (((hi << 1) ^ (s1 >> 1)) & 0x44444444u);
                        const uint w2 = (s2 & 0xbbbbbbbbu) | ((hi ^ (s2 >> 1)) & 0x44444444u);
                        const uint w3 = ((s0 << 1) & 0x88888888u) | (((hi >> 1) ^ s0) & 0x44444444u) |
                                        ((s1 >> 1) & 0x22222222u) | ((s2 >> 2) & 0x11111111u);
                        for (int v = 0; v < VECTORS; v++) {
                            if (uint(v) < vectors) {
                                device const float* xv = x + v * cols + col;
                                qx[v] += symbol_dot<4, 8>(w0, xv) + symbol_dot<4, 8>(w1, xv + 8) +
                                         symbol_dot<4, 8>(w2, xv + 16) + symbol_dot<4, 8>(w3, xv + 24);
                            }
                        }
                    }
                } else {
                    const uint entry = table[state & slot_mask];
                    state = active ? rans_advance(state, entry, precision) : state;
                    for (int v = 0; v < VECTORS; v++) {
                        if (uint(v) < vectors) {
                            qx[v] += symbol_dot<BITS>(entry & 0xffu, x + v * cols + col);
                        }
                    }
                    state = renormalize(state, active, lane, window, words, range.y);
                }
            }
            if (active) {
                const uint g = row * groups_per_row + group_col / group_size;
                const float scale = scales[g];
                const float bias = biases[g];
                for (int v = 0; v < VECTORS; v++) {
                    acc[v] += scale * qx[v] + bias * sx[v];
                }
            }
        }

        // Integrity: every active state back at 2^16 and every word of the tile consumed exactly.
        const uint status = tile_check(state, active, window, range.y);
        if (lane == 0) {
            tile_status[tile] = status;
        }
    }

    // Sum the simdgroups' partial results per row and vector.
    if (simdgroup < workers) {
        for (int v = 0; v < VECTORS; v++) {
            partial[(simdgroup * VECTORS + v) * LANES + lane] = acc[v];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = tid; i < uint(VECTORS) * LANES; i += threads) {
        const uint v = i / LANES;
        const uint out_row = row_tile * LANES + i % LANES;
        if (v < vectors && out_row < params.rows) {
            float sum = 0.0f;
            for (uint s = 0; s < workers; s++) {
                sum += partial[(s * VECTORS + v) * LANES + i % LANES];
            }
            y[v * params.rows + out_row] = sum;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Instantiations: host names encode the template parameters, ec_gemv_b{BITS}_v{VECTORS}_t{TABLE_BITS}.

#define instantiate_ec_gemv(bits, vectors, table)                                                            \
    template [[host_name("ec_gemv_b" #bits "_v" #vectors "_t" #table)]] [[kernel]]                           \
        decltype(ec_gemv<bits, vectors, table, false>) ec_gemv<bits, vectors, table, false>;

// Split streams: ec_gemv_split_v{VECTORS}_t{TABLE_BITS}, 2-bit coded symbols.
#define instantiate_ec_gemv_split(vectors, table)                                                           \
    template [[host_name("ec_gemv_split_v" #vectors "_t" #table)]] [[kernel]]                              \
        decltype(ec_gemv<2, vectors, table, true>) ec_gemv<2, vectors, table, true>;

// Split streams of one coded bit: ec_gemv_split3_v{VECTORS}_t{TABLE_BITS}, 1-bit coded symbols.
#define instantiate_ec_gemv_split3(vectors, table)                                                          \
    template [[host_name("ec_gemv_split3_v" #vectors "_t" #table)]] [[kernel]]                             \
        decltype(ec_gemv<1, vectors, table, true>) ec_gemv<1, vectors, table, true>;

#define instantiate_ec_gemv_vectors(bits) \
    instantiate_ec_gemv(bits, 1, 11)      \
    instantiate_ec_gemv(bits, 1, 12)      \
    instantiate_ec_gemv(bits, 8, 11)      \
    instantiate_ec_gemv(bits, 8, 12)

instantiate_ec_gemv_vectors(1)
instantiate_ec_gemv_vectors(2)
instantiate_ec_gemv_vectors(3)
instantiate_ec_gemv_vectors(4)
instantiate_ec_gemv_vectors(5)
instantiate_ec_gemv_vectors(6)
instantiate_ec_gemv_vectors(7)
instantiate_ec_gemv_vectors(8)
instantiate_ec_gemv_split(1, 11)
instantiate_ec_gemv_split(1, 12)
instantiate_ec_gemv_split(8, 11)
instantiate_ec_gemv_split(8, 12)
instantiate_ec_gemv_split3(1, 11)
instantiate_ec_gemv_split3(1, 12)
instantiate_ec_gemv_split3(8, 11)
instantiate_ec_gemv_split3(8, 12)
