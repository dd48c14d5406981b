//! Encoded tensors and the files that hold them. Nothing here knows about devices.

mod tensor;

pub use tensor::{EcTensor, EncodeOptions};
