//! ecq: language-model weights stored as quantized symbols compressed with rANS, multiplied without expanding.
//!
//! - [`quant`]: affine group quantization (MLX convention `w = scale * q + bias`).
//! - [`rans`]: the CPU reference codec, 32-lane tiles of interleaved rANS states.
//! - [`format`](mod@format): [`format::EcTensor`] and the safetensors container of docs/FORMAT.md.
//! - `gpu` (feature `gpu`, default): the wgpu context and WGSL kernels behind [`EcMatmul::new`].
//! - [`model`]: whole-model conversion (GGUF, safetensors, sharded safetensors, MLX) and [`EcModel`].
#![deny(missing_docs)]

pub mod error;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod kernels_msl;
pub mod matmul;
pub mod model;
pub mod quant;
pub mod rans;

pub use error::{Error, Result};
pub use matmul::{EcMatmul, Strategy};
pub use model::EcModel;
