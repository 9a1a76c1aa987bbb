//! kojo (工場): an LLM inference server with its own kernels.
//!
//! Module map (see docs/DESIGN.md):
//! - [`formats`]: GGUF and safetensors readers, quant block layouts, reference dequantizers
//! - [`model`]: architectures' hyperparameters; opening a model path
//! - [`tokenizer`]: tokenizers, streaming detokenizer, chat templates

pub mod formats;
pub mod model;
pub mod tokenizer;
