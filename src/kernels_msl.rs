//! The hand-written Metal Shading Language kernels of `msl/`, as source text for the Metal passthrough path
//! (`wgpu::Features::PASSTHROUGH_SHADERS`, `Device::create_shader_module_passthrough` with `msl: Some(..)`).
//!
//! Each constant is one complete MSL library: `msl/ec_rans.h` (the parameter block and the rANS tile steps)
//! followed by one kernel file, since the Metal runtime compiler resolves no user includes. The top of each
//! kernel file lists its entry points and buffers. Buffer `n` is binding `n` of bind group 0, with the layout's
//! entries listed in binding order (wgpu's Metal backend numbers buffers in the order of the layout entries,
//! starting at 0 when no immediates are used), and every size travels in the
//! `EcParams` block (last binding, a uniform buffer of [`PARAMS_SIZE`] bytes: twelve `u32`, in order `rows,
//! cols, bits, group_size, segment, segments, row_tiles, precision, total_words, vectors, 0, 0`), because
//! wgpu passes no buffer lengths to passthrough shaders. The `words` buffer holds the `u16` words as
//! little-endian bytes (padding the buffer to a multiple of 4 bytes is fine).
//!
//! Verified on Linux by compiling these sources as C++ against an emulation shim (tests/msl_emu.rs); no
//! Metal compiler has checked them.

/// Threads per threadgroup both kernels are written for (8 simdgroups of 32): the passthrough entry point's
/// workgroup size is `(THREADS_PER_THREADGROUP, 1, 1)`.
pub const THREADS_PER_THREADGROUP: u32 = 256;

/// Bytes of the `EcParams` block bound last.
pub const PARAMS_SIZE: usize = 48;

/// Most input vectors one `ec_gemv_b*_v8` dispatch handles.
pub const EC_GEMV_MAX_VECTORS: u32 = 8;

/// Fused decode + dequantize + GEMV, one threadgroup per row tile (grid: `ceil(rows / 32)` threadgroups).
/// Entry points `ec_gemv_b{bits}_v1` (one vector) and `ec_gemv_b{bits}_v8` (1 to 8 vectors), bits 1 to 8.
/// Buffers: words, tile_offsets, states, decode_table, scales, biases, x, y, tile_status, params.
pub const EC_GEMV: &str = concat!(include_str!("../msl/ec_rans.h"), include_str!("../msl/ec_gemv.metal"));

/// Decode-only to MLX-packed `u32` symbols (`quant::pack_mlx` layout), any grid (tiles are strided over it).
/// Entry points `rans_decode_b{bits}`, bits 1 to 8.
/// Buffers: words, tile_offsets, states, decode_table, packed, tile_status, params.
pub const RANS_DECODE: &str = concat!(include_str!("../msl/ec_rans.h"), include_str!("../msl/rans_decode.metal"));
