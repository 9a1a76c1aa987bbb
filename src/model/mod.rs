//! Model architectures, their weights, and running them.
//!
//! - [`config`]: [`ModelConfig`] read from GGUF metadata or a Hugging Face `config.json`
//! - [`source`]: opening a model path (GGUF file or safetensors folder) into weights, tokenizer
//!   and chat template
//! - [`weights`]: weights by GGUF name from either kind of file
//! - [`transformer`]: the forward pass of every supported architecture, over a [`crate::backend::Backend`]
//! - [`session`]: one sequence with its own KV cache, fed in chunks
//! - [`generate`]: prompt → sampled tokens, with stop strings and log-probabilities
//! - [`perplexity`]: llama-perplexity's windowed perplexity

pub mod config;
pub mod generate;
pub mod perplexity;
pub mod random;
pub mod session;
pub mod source;
pub mod transformer;
pub mod weights;

pub use config::ModelConfig;
pub use source::ModelSource;
pub use transformer::Transformer;
