//! The CPU reference codec: frequency tables and the 32-lane tile rANS coder of docs/FORMAT.md.
//!
//! This module is the oracle every GPU result is checked against. It depends on nothing else in the crate
//! but the error type.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod fast;
mod table;
mod tile;

pub use table::{entropy_bits, FreqTable, DEFAULT_PRECISION, MAX_PRECISION};
pub use tile::{
    check_stream_shape, decode, decode_into, decode_into_with, decode_row_tile, decode_row_tile_with, decode_with,
    encode, encode_with, joint_counts, DecodeTable, EncodedStream, Kernel, Tile, TileLayout, LANES, STATE_LOWER,
};

/// Default segment width `S` in columns: one 32-bit state per row per segment costs `32 / S` bits per weight,
/// while `K / S` segments keep enough tiles in flight. Measured on a 4096 x 4096 4-bit group-64 layer
/// (BENCHMARKS.md): the whole stream is +1.8% over the order-0 entropy at `S = 256`, +0.45% at 512, -0.2% at 1024.
pub const DEFAULT_SEGMENT: usize = 512;
