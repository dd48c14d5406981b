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

/// Default segment width `S` in columns: one 32-bit state per row per segment costs `32 / S` bits per weight
/// (+1.3% over the entropy of 4-bit symbols at 512), while `K / S` segments keep enough tiles in flight.
pub const DEFAULT_SEGMENT: usize = 512;
