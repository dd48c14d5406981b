//! Encoded tensors and the files that hold them. Nothing here knows about devices.

mod container;
pub mod gguf;
pub mod mlx;
mod safetensors_file;
mod tensor;

pub use crate::rans::SplitForm;
pub use container::{
    refuse_overwrite, ArrayNames, Checksums, ContainerWriter, EcFile, EncodedInfo, FORMAT_VERSION, MAX_SEGMENT,
    RAW_CRC_KEY, VERSION_KEY,
};
pub use gguf::{GgmlType, GgufFile, GgufTensor, GgufTensorInfo, GgufValue};
pub use mlx::{export_mlx, import_mlx, import_mlx_from, MlxArray, MlxQuantized};
pub use safetensors_file::{Dtype, SafetensorsFile, TensorInfo, TensorView, MAX_HEADER_LEN};
pub use tensor::{EcTensor, EncodeOptions};
