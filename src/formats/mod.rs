//! Model file formats: GGUF and safetensors readers, ggml quant block layouts and reference
//! dequantizers.
//!
//! - [`cursor`]: bounds-checked little-endian reads (every reader goes through it)
//! - [`gguf`]: GGUF v2/v3 reader; [`gguf_write`]: a small writer for tests and generated models
//! - [`quant`]: ggml tensor types, block layouts, reference dequantizers
//! - [`safetensors`]: Hugging Face safetensors checkpoints
//! - [`error`]: the error type that names file, field and byte offset

pub mod cursor;
pub mod error;
pub mod gguf;
pub mod gguf_write;
pub mod quant;
pub mod safetensors;

pub use error::FormatError;
pub use gguf::{GgufFile, Value};
pub use quant::GgmlType;
