//! Model architectures and their hyperparameters.
//!
//! - [`config`]: [`ModelConfig`] read from GGUF metadata or a Hugging Face `config.json`
//! - [`source`]: opening a model path (GGUF file or safetensors folder) into weights, tokenizer
//!   and chat template

pub mod config;
pub mod source;

pub use config::ModelConfig;
pub use source::ModelSource;
