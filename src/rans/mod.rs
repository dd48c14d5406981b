//! The CPU reference codec: frequency tables and the 32-lane tile rANS coder of docs/FORMAT.md.
//!
//! This module is the oracle every GPU result is checked against. It depends on nothing else in the crate
//! but the error type.
//!
//! ```
//! use ecq::rans::{decode, encode, joint_counts, FreqTable, TileLayout, DEFAULT_PRECISION, STATE_LOWER};
//!
//! // 40 rows of 100 4-bit symbols, segments of 64 columns: 2 row tiles x 2 segments.
//! let symbols: Vec<u8> = (0..40 * 100).map(|i| ((i * 7) % 11) as u8).collect();
//! let layout = TileLayout::new(40, 100, 4, 64)?;
//! let table = FreqTable::from_counts(&joint_counts(&symbols, &layout)?, DEFAULT_PRECISION)?;
//! let stream = encode(&symbols, &layout, &table)?;
//! assert_eq!(stream.tile_offsets.len(), layout.tiles() + 1);
//! // Inactive lanes (rows 40..64 of the second row tile) hold 2^16 and take no words.
//! assert!(stream.states[2 * 32 + 8..3 * 32].iter().all(|&x| x == STATE_LOWER));
//! assert_eq!(decode(&stream, &layout, &table)?, symbols);
//! # Ok::<(), ecq::Error>(())
//! ```

#[cfg(target_arch = "x86_64")]
mod avx2;
mod fast;
mod split;
mod table;
mod tile;

pub use split::{merge_symbols, merge_words, merge_words3, split_symbols, SplitForm, SPLIT_BITS};
pub use table::{entropy_bits, FreqTable, DEFAULT_PRECISION, MAX_PRECISION};
pub use tile::{
    check_stream_shape, decode, decode_into, decode_into_with, decode_row_tile, decode_row_tile_with, decode_with,
    encode, encode_with, joint_counts, DecodeTable, EncodedStream, Kernel, Tile, TileLayout, LANES, STATE_LOWER,
};

/// Default segment width `S` in columns: one 32-bit state per row per segment costs `32 / S` bits per weight,
/// while `K / S` segments keep enough tiles in flight. Measured on a 4096 x 4096 4-bit group-64 layer
/// (BENCHMARKS.md): the whole stream is +1.8% over the order-0 entropy at `S = 256`, +0.45% at 512, -0.2% at 1024.
pub const DEFAULT_SEGMENT: usize = 512;

/// The shortest segment, in columns, that the shape rule takes to give a matrix more tiles
/// (`EncodeOptions::min_tiles`): at `S = 256` a 4096 x 4096 layer's stream is 1.3% larger than at 512, at 128 3.8%,
/// and its fused product on an NVIDIA H200 took 16.4 and 14.4 us against 22.4 (BENCHMARKS.md, "Shorter segments
/// for 4096x4096"). Shorter segments pay a 32-bit state a row for fewer weights still.
pub const MIN_AUTO_SEGMENT: usize = 128;

/// Segments a row above which `EncodeOptions::min_tiles` rounds their count to a power of two, so that the row
/// splits evenly into the parts a GPU product shares it out in: a 14336-column row in 28 segments of 512 splits
/// into 7 parts of 2048 columns, 128 row tiles of which make 896 parts, 133 workgroups of 7 row tiles on 132 SMs;
/// in 32 segments of 448 (a stream 0.2% larger) it splits into 8 parts, 128 workgroups of 8 row tiles, and four
/// vectors' product on an NVIDIA H200 took 44.5-44.8 us against 48.2-48.4 (BENCHMARKS.md, "Rows in a power of two
/// of segments"). Rows of up to 8 segments (narrower than 4352 columns) keep the shape rule.
pub const EVEN_PARTS_ABOVE: usize = 8;
