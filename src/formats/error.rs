//! The one error type of the format readers: it names the file, the field and the byte offset.

use std::fmt;
use std::path::{Path, PathBuf};

/// A malformed, truncated or unsupported model file.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatError {
    pub file: PathBuf,
    /// What was being read ("tensor_count", "metadata[3].value", "tensor 'x'.offset").
    pub field: String,
    /// Byte offset in the file where the field starts (or the data it points to).
    pub offset: u64,
    pub message: String,
}

impl FormatError {
    pub fn new(
        file: &Path,
        field: impl Into<String>,
        offset: u64,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.to_path_buf(),
            field: field.into(),
            offset,
            message: message.into(),
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} at byte offset {}: {}",
            self.file.display(),
            self.field,
            self.offset,
            self.message
        )
    }
}

impl std::error::Error for FormatError {}

pub type Result<T> = std::result::Result<T, FormatError>;
