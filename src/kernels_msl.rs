//! The hand-written Metal Shading Language kernels of `msl/`, as source text for the Metal passthrough path
//! (`wgpu::Features::PASSTHROUGH_SHADERS`, `Device::create_shader_module_passthrough` with `msl: Some(..)`).
//!
//! Each constant is one complete MSL library: `msl/ec_rans.h` (the parameter block and the rANS tile steps)
//! followed by one kernel file, since the Metal runtime compiler resolves no user includes. The top of each
//! kernel file lists its entry points and buffers. The `[[buffer(n)]]` indices follow binding order: wgpu's
//! Metal backend numbers buffers in the order of the pipeline layout's entries, group after group, starting at
//! 0 when no immediates are used ([`EC_GEMV_GROUPS`] lists ec_gemv's two groups). Every size travels in the
//! `EcParams` block (last binding, a uniform buffer of [`PARAMS_SIZE`] bytes: twelve `u32`, in order `rows,
//! cols, bits, group_size, segment, segments, row_tiles, precision, total_words, vectors, low_bits, 0`, built by
//! [`EcParams::new`]), because
//! wgpu passes no buffer lengths to passthrough shaders. The `words` buffer holds the `u16` words as
//! little-endian bytes (padding the buffer to a multiple of 4 bytes is fine).
//!
//! Verified on Linux by compiling these sources as C++ against an emulation shim (tests/msl_emu.rs); no
//! Metal compiler has checked them.

use crate::error::{Error, Result};
use crate::format::EcTensor;

/// Threads per threadgroup both kernels are written for (8 simdgroups of 32): the passthrough entry point's
/// workgroup size is `(THREADS_PER_THREADGROUP, 1, 1)`.
pub const THREADS_PER_THREADGROUP: u32 = 256;

/// Bytes of the `EcParams` block bound last.
pub const PARAMS_SIZE: usize = 48;

/// Most input vectors one `ec_gemv_b*_v8` dispatch handles.
pub const EC_GEMV_MAX_VECTORS: u32 = 8;

/// Fused decode + dequantize + GEMV, one threadgroup per row tile (grid: `ceil(rows / 32)` threadgroups).
/// Entry points `ec_gemv_b{bits}_v1_t{table}` (one vector) and `ec_gemv_b{bits}_v8_t{table}` (1 to 8 vectors), bits
/// 1 to 8, with a decode table of `2^table` entries ([`msl_table_bits`]: 11 or 12), and `ec_gemv_split_v{1,8}_t{table}`
/// for split streams (docs/FORMAT.md section 2.1).
/// Buffers: words, tile_offsets, states, decode_table, scales, biases, low, x, y, tile_status, params.
pub const EC_GEMV: &str = concat!(include_str!("../msl/ec_rans.h"), include_str!("../msl/ec_gemv.metal"));

/// Decode-only to MLX-packed `u32` symbols (`quant::pack_mlx` layout), any grid (tiles are strided over it).
/// Entry points `rans_decode_b{bits}_t{table}`, bits 1 to 8, table 11 or 12 ([`msl_table_bits`]).
/// Buffers: words, tile_offsets, states, decode_table, packed, tile_status, params.
pub const RANS_DECODE: &str = concat!(include_str!("../msl/ec_rans.h"), include_str!("../msl/rans_decode.metal"));

/// The `EcParams` block of `msl/ec_rans.h`: twelve `u32` in the MSL field order, [`PARAMS_SIZE`] bytes, bound
/// as a uniform buffer (`bytemuck::bytes_of` gives its bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EcParams {
    /// Rows `N` (output features).
    pub rows: u32,
    /// Columns `K` (input features).
    pub cols: u32,
    /// Bits per coded symbol (the layout's; 2 for a split stream); must equal the entry point's `BITS`.
    pub bits: u32,
    /// Columns per scale/bias group.
    pub group_size: u32,
    /// Columns per segment `S`.
    pub segment: u32,
    /// Segments per row, `ceil(K / S)`.
    pub segments: u32,
    /// Row tiles, `ceil(N / 32)`.
    pub row_tiles: u32,
    /// Decode-table precision `P`.
    pub precision: u32,
    /// 16-bit words in the stream (before any padding of the buffer).
    pub total_words: u32,
    /// Input vectors `M` of an `ec_gemv` call (1..=8); unused by `rans_decode`.
    pub vectors: u32,
    /// Low bits stored as they are: 2 for a split stream, else 0.
    pub low_bits: u32,
    /// Zero.
    pub reserved1: u32,
}

impl EcParams {
    /// The block for `tensor` and a call with `vectors` input vectors. Fails when a size does not fit a `u32`.
    pub fn new(tensor: &EcTensor, vectors: u32) -> Result<Self> {
        let l = tensor.layout();
        let u32_of = |what: &'static str, v: usize| {
            u32::try_from(v).map_err(|_| Error::param(what, format!("{v} does not fit the kernels' 32-bit sizes")))
        };
        Ok(Self {
            rows: u32_of("rows", l.rows())?,
            cols: u32_of("cols", l.cols())?,
            bits: l.bits(),
            group_size: u32_of("group_size", tensor.group_size())?,
            segment: u32_of("segment", l.segment())?,
            segments: u32_of("segments", l.segments())?,
            row_tiles: u32_of("row_tiles", l.row_tiles())?,
            precision: tensor.table().precision(),
            total_words: u32_of("total_words", tensor.stream().words.len())?,
            vectors,
            low_bits: tensor.split().map_or(0, crate::rans::SplitForm::low_bits),
            reserved1: 0,
        })
    }
}

/// How a kernel uses one of its buffers, which sets the binding type the host declares for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufferAccess {
    /// `device const T*`: a read-only storage buffer.
    Read,
    /// `device T*`: a read-write storage buffer.
    ReadWrite,
    /// `constant T&`: a uniform buffer.
    Uniform,
}

/// The buffers of [`EC_GEMV`] as two bind groups: group 0 a weight's arrays (bound once per weight), group 1
/// one call's. wgpu's Metal backend numbers buffers through the groups in order, so the flattened list is
/// `[[buffer(0)]]`, `[[buffer(1)]]`, ... of the kernel.
pub const EC_GEMV_GROUPS: [&[(&str, BufferAccess)]; 2] = [
    &[
        ("words", BufferAccess::Read),
        ("tile_offsets", BufferAccess::Read),
        ("states", BufferAccess::Read),
        ("decode_table", BufferAccess::Read),
        ("scales", BufferAccess::Read),
        ("biases", BufferAccess::Read),
        ("low", BufferAccess::Read),
    ],
    &[
        ("x", BufferAccess::Read),
        ("y", BufferAccess::ReadWrite),
        ("tile_status", BufferAccess::ReadWrite),
        ("params", BufferAccess::Uniform),
    ],
];

/// Table sizes the MSL kernels are instantiated for: `2^11` entries (8 KiB) for any precision up to 11, ecq's
/// default, and `2^12` (16 KiB) for 12.
pub const MSL_TABLE_BITS: [u32; 2] = [11, crate::rans::MAX_PRECISION];

/// The table size (as a power of two) of the MSL entry point that decodes a stream of precision `precision`
/// (1..=12): the smallest of [`MSL_TABLE_BITS`] that holds it. Threadgroup memory a kernel declares is held
/// whether its table fills it or not, and fewer threadgroups stay resident the more each holds.
pub fn msl_table_bits(precision: u32) -> u32 {
    MSL_TABLE_BITS.into_iter().find(|&t| precision <= t).unwrap_or(crate::rans::MAX_PRECISION)
}

/// The `ec_gemv` entry point for `bits` (1..=8) coded bits, a call of `vectors` vectors and a stream of precision
/// `precision`: the one-vector variant for one, the eight-accumulator variant for 2 to 8, each with the table
/// size of [`msl_table_bits`]; `split` picks the split-stream entry points (2 coded bits).
pub fn ec_gemv_entry_point(bits: u32, vectors: u32, precision: u32, split: bool) -> String {
    let v = if vectors == 1 { 1 } else { EC_GEMV_MAX_VECTORS };
    // Split streams: `split` for 2 coded bits (docs/FORMAT.md section 2.1), `split3` for 1 (section 2.2).
    let kind = match (split, bits) {
        (true, 1) => "split3".to_string(),
        (true, _) => "split".to_string(),
        (false, _) => format!("b{bits}"),
    };
    format!("ec_gemv_{kind}_v{v}_t{}", msl_table_bits(precision))
}

/// Every entry point of [`EC_GEMV`], in the order the source instantiates them.
pub fn ec_gemv_entry_points() -> Vec<String> {
    let mut out = Vec::new();
    let widths = (1..=8).map(|bits| (bits, false)).chain([(2, true), (1, true)]);
    for (bits, split) in widths {
        for vectors in [1, EC_GEMV_MAX_VECTORS] {
            for table in MSL_TABLE_BITS {
                out.push(ec_gemv_entry_point(bits, vectors, table, split));
            }
        }
    }
    out
}

/// Threadgroup memory of the `ec_gemv` entry point for `vectors` vectors and a stream of precision `precision`,
/// as the kernel declares it: the decode table (`4 * 2^t` bytes, `t` from [`msl_table_bits`]) plus one partial
/// sum per simdgroup, vector slot and lane.
pub fn ec_gemv_threadgroup_bytes(vectors: u32, precision: u32) -> u64 {
    let slots = if vectors == 1 { 1 } else { EC_GEMV_MAX_VECTORS } as u64;
    (4u64 << msl_table_bits(precision)) + 4 * 8 * slots * 32
}
