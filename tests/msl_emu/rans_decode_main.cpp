// Emulation driver for msl/rans_decode.metal: reads the kernel inputs from an array file (driver.h), launches
// `threadgroups` threadgroups of rans_decode_b{bits}_t{11,12} and writes `packed` and `tile_status`.
//
// Usage: rans_decode_emu INPUT OUTPUT. Scalars in the input: `threadgroups`, `threads` (per threadgroup),
// `workers` (OS threads), `packed_words` (length of the output).
#include "metal_shim.h"
#include "ec_rans.h"
#include "rans_decode.metal"
#include "metal_shim_end.h"

#include "driver.h"

namespace {

using Kernel = void (*)(const ushort*, const uint*, const uint*, const uint*, uint*, uint*, EcParams&, uint, uint,
                        uint, uint, uint, uint, uint);

// The instantiation for `bits` whose table holds 2^precision entries (t11 up to 11, else t12), as the host picks.
template <int TABLE_BITS>
Kernel pick_bits(uint32_t bits) {
    switch (bits) {
        case 1: return &rans_decode<1, TABLE_BITS>;
        case 2: return &rans_decode<2, TABLE_BITS>;
        case 3: return &rans_decode<3, TABLE_BITS>;
        case 4: return &rans_decode<4, TABLE_BITS>;
        case 5: return &rans_decode<5, TABLE_BITS>;
        case 6: return &rans_decode<6, TABLE_BITS>;
        case 7: return &rans_decode<7, TABLE_BITS>;
        case 8: return &rans_decode<8, TABLE_BITS>;
    }
    driver::die("bits must be in 1..=8");
}

Kernel pick(uint32_t bits, uint32_t precision) {
    return precision <= SMALL_TABLE_BITS ? pick_bits<SMALL_TABLE_BITS>(bits) : pick_bits<MAX_PRECISION>(bits);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) driver::die("usage: rans_decode_emu INPUT OUTPUT");
    const driver::Arrays in = driver::read_arrays(argv[1]);
    EcParams params;
    auto p = in.find("params");
    if (p == in.end() || p->second.size() != sizeof(EcParams)) driver::die("params must be 48 bytes");
    std::memcpy(&params, p->second.data(), sizeof(EcParams));
    const uint32_t threadgroups = driver::scalar(in, "threadgroups");
    const uint32_t threads = driver::scalar(in, "threads");
    const uint32_t workers = driver::scalar(in, "workers");
    const uint32_t packed_words = driver::scalar(in, "packed_words");
    const Kernel run = pick(params.bits, params.precision);

    std::unique_ptr<driver::GuardedBuffer> words(driver::input(in, "words", 2));
    std::unique_ptr<driver::GuardedBuffer> offsets(driver::input(in, "tile_offsets", 4));
    std::unique_ptr<driver::GuardedBuffer> states(driver::input(in, "states", 4));
    std::unique_ptr<driver::GuardedBuffer> table(driver::input(in, "decode_table", 4));
    // Outputs start as a pattern the kernel never leaves in a correct run's status, so unwritten words show.
    const size_t tiles = size_t(params.row_tiles) * params.segments;
    std::vector<unsigned char> fill_packed(size_t(packed_words) * 4, 0xa5), ones(tiles * 4, 0xff);
    driver::GuardedBuffer packed(fill_packed, size_t(packed_words) * 4, false);
    driver::GuardedBuffer status(ones, tiles * 4, false);

    driver::launch(threadgroups, threads, workers, [&](uint32_t tg, uint32_t tid) {
        run(words->as<ushort>(), offsets->as<uint>(), states->as<uint>(), table->as<uint>(), packed.as<uint>(),
            status.as<uint>(), params, tg, threadgroups, tid, threads, tid % 32, tid / 32, threads / 32);
    });
    driver::write_arrays(argv[2], {{"packed", packed.bytes()}, {"tile_status", status.bytes()}});
    return 0;
}
