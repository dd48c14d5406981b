//! The one error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong in ecq. Messages say what was expected and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A parameter passed by the caller is out of its allowed range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// What is wrong with it and what is allowed.
        reason: String,
    },

    /// Two inputs that must agree in size do not.
    #[error("shape mismatch in {what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// Which input.
        what: String,
        /// The size that was required.
        expected: usize,
        /// The size that was given.
        actual: usize,
    },

    /// An encoded stream failed an integrity check while decoding (bad words, offsets or end states).
    #[error("corrupt stream in tile {tile}: {reason}")]
    CorruptStream {
        /// Index of the tile where the fault was found.
        tile: usize,
        /// What check failed.
        reason: String,
    },

    /// A file or its header is malformed, inconsistent or fails a checksum.
    #[error("invalid file: {reason}")]
    InvalidFile {
        /// What is wrong, naming the tensor or field.
        reason: String,
    },

    /// An array's bytes do not match the CRC-32 stored for them: the file is corrupt.
    #[error("checksum mismatch in `{array}` of tensor `{tensor}`: stored {expected:#010x}, computed {actual:#010x}; the file is corrupt, convert it again")]
    ChecksumMismatch {
        /// The tensor the array belongs to.
        tensor: String,
        /// The array whose bytes were hashed.
        array: String,
        /// The CRC-32 stored in the header.
        expected: u32,
        /// The CRC-32 of the bytes found.
        actual: u32,
    },

    /// The file declares a format version this build cannot read.
    #[error("unsupported ecq format version {found} (this build reads versions 1 to {supported}); upgrade ecq")]
    UnsupportedVersion {
        /// The version written in the file.
        found: String,
        /// The newest version this build reads.
        supported: u32,
    },

    /// A tensor that was asked for is not in the file.
    #[error("tensor `{0}` not found")]
    TensorNotFound(String),

    /// An input tensor has a data type that the operation does not accept.
    #[error("unsupported dtype {dtype} for tensor `{name}`: {hint}")]
    UnsupportedDtype {
        /// The tensor's name.
        name: String,
        /// The dtype found.
        dtype: String,
        /// What is accepted.
        hint: String,
    },

    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file that was being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A converted file, read back, differs from its source (`verify` in [`crate::model::ConvertOptions`]).
    #[error("verification failed for tensor `{tensor}`: {what}; the output was removed (please report this as a bug)")]
    VerifyFailed {
        /// The tensor that differs.
        tensor: String,
        /// What differs.
        what: String,
    },

    /// A GPU operation failed (no adapter, a limit exceeded, a device error).
    #[error("gpu: {0}")]
    Gpu(String),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn param(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidParameter { name, reason: reason.into() }
    }

    pub(crate) fn file(reason: impl Into<String>) -> Self {
        Error::InvalidFile { reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
