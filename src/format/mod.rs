//! Encoded tensors and the files that hold them. Nothing here knows about devices.

pub mod gguf;
pub mod mlx;
mod tensor;

pub use gguf::{GgmlType, GgufFile, GgufTensor, GgufTensorInfo, GgufValue};
pub use mlx::{export_mlx, import_mlx, import_mlx_from, MlxArray, MlxQuantized};
pub use tensor::{EcTensor, EncodeOptions};
