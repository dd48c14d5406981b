// rans_decode.metal: decode-only, ecq's tile stream to MLX-packed symbols (ecq::quant::pack_mlx: each row a
// little-endian bit stream of BITS-bit symbols in u32 words, cols * BITS / 32 words per row).
//
// - Grid: threadgroups of 8 simdgroups sharing one copy of the decode table in threadgroup memory; simdgroup s
//   of threadgroup g decodes tiles g * 8 + s, then strides by the whole grid, so any grid size covers every
//   tile. One lane per row, the same steps as ec_gemv (ec_rans.h).
// - A joint symbol is the next BITS * k bits of its row's bit stream (weight i in bits i * BITS.., as in the
//   packed layout), so each lane appends it to a 32-bit accumulator and stores a word whenever one fills.
//   Segments start on word boundaries (segment * BITS is a multiple of 32), so tiles never share a word.
// - Each lane writes its own row: the stores are not coalesced. Staging a few steps of output in threadgroup
//   memory and writing whole rows is the known next step.
//
// Entry points (threadgroup = 256 threads, 8 simdgroups; any grid, e.g. ceil(tiles / 8) threadgroups):
//   rans_decode_b{1..8}_t{11,12}   t11 holds a decode table of 2^11 entries (params.precision <= 11), t12 2^12
// Buffers, in binding order:
//   0 words         ushort[total_words]
//   1 tile_offsets  uint[tiles + 1]
//   2 states        uint[tiles * 32]
//   3 decode_table  uint[2^precision]
//   4 packed        uint[rows * cols * BITS / 32]  written
//   5 tile_status   uint[tiles]                    written: 0 ok, bit 0 an end state != 2^16, bit 1 word count
//   6 params        EcParams                       (constant address space; `vectors` unused)

// Requires ec_rans.h prepended (EcParams, LANES, WordWindow, renormalize, ...).

template <int BITS, int TABLE_BITS>
[[kernel]] void rans_decode(
    device const ushort* words [[buffer(0)]],
    device const uint* tile_offsets [[buffer(1)]],
    device const uint* states [[buffer(2)]],
    device const uint* decode_table [[buffer(3)]],
    device uint* packed [[buffer(4)]],
    device uint* tile_status [[buffer(5)]],
    constant EcParams& params [[buffer(6)]],
    uint threadgroup_index [[threadgroup_position_in_grid]],
    uint threadgroups [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]]) {
    static_assert(BITS >= 1 && BITS <= 8, "rans_decode supports 1- to 8-bit symbols");
    constexpr uint K = 8 / BITS;            // weights per joint symbol
    constexpr uint JOINT_BITS = BITS * K;   // bits per joint symbol, <= 8
    constexpr uint JOINT_MASK = (1u << JOINT_BITS) - 1u;
    static_assert(TABLE_BITS >= 1 && TABLE_BITS <= int(MAX_PRECISION), "the table holds 2^1 to 2^12 entries");

    threadgroup uint table[1u << TABLE_BITS];

    // Parameters the loops below rely on; the whole threadgroup leaves together if they do not hold. Whole
    // simdgroups only: lane r is row r of the tile.
    const uint cols = params.cols;
    if (params.bits != uint(BITS) || params.segment == 0 || params.segment % K != 0 || cols % K != 0 ||
        (params.segment * BITS) % 32 != 0 || (cols * BITS) % 32 != 0 || threads % LANES != 0 ||
        params.precision > uint(TABLE_BITS)) {
        return;
    }

    const uint precision = min(params.precision, uint(TABLE_BITS));
    const uint slot_mask = (1u << precision) - 1u;
    for (uint i = tid; i <= slot_mask; i += threads) {
        table[i] = decode_table[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    const uint words_per_row = cols * BITS / 32;
    const uint tiles = params.row_tiles * params.segments;
    for (uint tile = threadgroup_index * simdgroups + simdgroup; tile < tiles; tile += threadgroups * simdgroups) {
        const uint row_tile = tile / params.segments;
        const uint segment = tile % params.segments;
        const uint row = row_tile * LANES + lane;
        const bool active = row < params.rows;
        uint state = active ? states[tile * LANES + lane] : STATE_LOWER;
        const uint2 range = tile_word_range(tile_offsets, tile, params.total_words);
        WordWindow window = word_window(words, range, lane);

        const uint col0 = segment * params.segment;
        const uint col_end = min(col0 + params.segment, cols);
        // This lane's output words: row `row`, from the segment's first word to the end of the row.
        uint out = row * words_per_row + col0 * BITS / 32;
        const uint out_end = (row + 1) * words_per_row;
        uint pending = 0;       // bits not yet stored, low first
        uint pending_bits = 0;  // < 32; 0 again at the segment's end since segment * BITS % 32 == 0
        for (uint col = col0; col < col_end; col += K) {
            const uint entry = table[state & slot_mask];
            state = active ? rans_advance(state, entry, precision) : state;
            const uint joint = entry & JOINT_MASK;
            pending |= joint << pending_bits;
            pending_bits += JOINT_BITS;
            if (pending_bits >= 32) {
                if (active && out < out_end) {
                    packed[out] = pending;
                }
                out++;
                pending_bits -= 32;
                // The bits of `joint` that did not fit (none when the word filled exactly).
                pending = pending_bits != 0 ? joint >> (JOINT_BITS - pending_bits) : 0u;
            }
            state = renormalize(state, active, lane, window, words, range.y);
        }

        const uint status = tile_check(state, active, window, range.y);
        if (lane == 0) {
            tile_status[tile] = status;
        }
    }
}

// Instantiations: host names encode the template parameters, rans_decode_b{BITS}_t{TABLE_BITS}.

#define instantiate_rans_decode_table(bits, table)                                                \
    template [[host_name("rans_decode_b" #bits "_t" #table)]] [[kernel]] decltype(rans_decode<bits, table>) \
        rans_decode<bits, table>;

#define instantiate_rans_decode(bits)      \
    instantiate_rans_decode_table(bits, 11) \
    instantiate_rans_decode_table(bits, 12)

instantiate_rans_decode(1)
instantiate_rans_decode(2)
instantiate_rans_decode(3)
instantiate_rans_decode(4)
instantiate_rans_decode(5)
instantiate_rans_decode(6)
instantiate_rans_decode(7)
instantiate_rans_decode(8)
