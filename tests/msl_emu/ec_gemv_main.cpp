// Emulation driver for msl/ec_gemv.metal: reads the kernel inputs from an array file (driver.h), launches the
// ec_gemv_b{bits}_v{variant}_t{11,12} grid, or ec_gemv_split_v{variant}_t{11,12} where params.low_bits is 2 and
// ec_gemv_split3_v{variant}_t{11,12} where it is 3 (one threadgroup per row tile), and writes `y` and
// `tile_status`.
//
// Usage: ec_gemv_emu INPUT OUTPUT. Scalars in the input: `variant` (1 or 8: which VECTORS instantiation),
// `threads` (threads per threadgroup), `workers` (OS threads).
#include "metal_shim.h"
#include "ec_rans.h"
#include "ec_gemv.metal"
#include "metal_shim_end.h"

#include "driver.h"

namespace {

using Kernel = void (*)(const ushort*, const uint*, const uint*, const uint*, const float*, const float*,
                        const uint*, const float*, float*, uint*, EcParams&, uint, uint, uint, uint, uint, uint);

template <int BITS, int TABLE_BITS, bool SPLIT = false>
Kernel pick_variant(uint32_t variant) {
    if (variant == 1) return &ec_gemv<BITS, 1, TABLE_BITS, SPLIT>;
    if (variant == 8) return &ec_gemv<BITS, 8, TABLE_BITS, SPLIT>;
    driver::die("variant must be 1 or 8");
}

template <int TABLE_BITS>
Kernel pick_bits(uint32_t bits, uint32_t variant) {
    switch (bits) {
        case 1: return pick_variant<1, TABLE_BITS>(variant);
        case 2: return pick_variant<2, TABLE_BITS>(variant);
        case 3: return pick_variant<3, TABLE_BITS>(variant);
        case 4: return pick_variant<4, TABLE_BITS>(variant);
        case 5: return pick_variant<5, TABLE_BITS>(variant);
        case 6: return pick_variant<6, TABLE_BITS>(variant);
        case 7: return pick_variant<7, TABLE_BITS>(variant);
        case 8: return pick_variant<8, TABLE_BITS>(variant);
    }
    driver::die("bits must be in 1..=8");
}

// The instantiation whose table holds 2^precision entries (t11 up to 11, else t12), as the host picks; the split
// one where `low_bits` is 2 (2 coded bits) or 3 (1 coded bit).
Kernel pick(uint32_t bits, uint32_t variant, uint32_t precision, uint32_t low_bits) {
    if (low_bits == 2) {
        if (bits != 2) driver::die("a split stream with 2 low bits codes 2 bits");
        return precision <= SMALL_TABLE_BITS ? pick_variant<2, SMALL_TABLE_BITS, true>(variant)
                                             : pick_variant<2, MAX_PRECISION, true>(variant);
    }
    if (low_bits == 3) {
        if (bits != 1) driver::die("a split stream with 3 low bits codes 1 bit");
        return precision <= SMALL_TABLE_BITS ? pick_variant<1, SMALL_TABLE_BITS, true>(variant)
                                             : pick_variant<1, MAX_PRECISION, true>(variant);
    }
    return precision <= SMALL_TABLE_BITS ? pick_bits<SMALL_TABLE_BITS>(bits, variant)
                                         : pick_bits<MAX_PRECISION>(bits, variant);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) driver::die("usage: ec_gemv_emu INPUT OUTPUT");
    const driver::Arrays in = driver::read_arrays(argv[1]);
    EcParams params;
    auto p = in.find("params");
    if (p == in.end() || p->second.size() != sizeof(EcParams)) driver::die("params must be 48 bytes");
    std::memcpy(&params, p->second.data(), sizeof(EcParams));
    const uint32_t threads = driver::scalar(in, "threads");
    const uint32_t workers = driver::scalar(in, "workers");
    const Kernel run = pick(params.bits, driver::scalar(in, "variant"), params.precision, params.low_bits);

    std::unique_ptr<driver::GuardedBuffer> words(driver::input(in, "words", 2));
    std::unique_ptr<driver::GuardedBuffer> offsets(driver::input(in, "tile_offsets", 4));
    std::unique_ptr<driver::GuardedBuffer> states(driver::input(in, "states", 4));
    std::unique_ptr<driver::GuardedBuffer> table(driver::input(in, "decode_table", 4));
    std::unique_ptr<driver::GuardedBuffer> scales(driver::input(in, "scales", 4));
    std::unique_ptr<driver::GuardedBuffer> biases(driver::input(in, "biases", 4));
    std::unique_ptr<driver::GuardedBuffer> low(driver::input(in, "low", 4));
    std::unique_ptr<driver::GuardedBuffer> x(driver::input(in, "x", 4));
    // Outputs start as NaN / all ones so that anything the kernel leaves unwritten shows.
    const size_t y_len = size_t(params.vectors) * params.rows;
    const size_t tiles = size_t(params.row_tiles) * params.segments;
    std::vector<unsigned char> nan_fill(y_len * 4), ones_fill(tiles * 4, 0xff);
    for (size_t i = 0; i < y_len; i++) std::memcpy(&nan_fill[i * 4], "\x00\x00\xc0\x7f", 4);
    driver::GuardedBuffer y(nan_fill, y_len * 4, false);
    driver::GuardedBuffer status(ones_fill, tiles * 4, false);

    driver::launch(params.row_tiles, threads, workers, [&](uint32_t tg, uint32_t tid) {
        run(words->as<ushort>(), offsets->as<uint>(), states->as<uint>(), table->as<uint>(), scales->as<float>(),
            biases->as<float>(), low->as<uint>(), x->as<float>(), y.as<float>(), status.as<uint>(), params, tg, tid,
            threads,
            tid % 32, tid / 32, threads / 32);
    });
    driver::write_arrays(argv[2], {{"y", y.bytes()}, {"tile_status", status.bytes()}});
    return 0;
}
