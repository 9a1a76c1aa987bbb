//! kojo (工場): an LLM inference server with its own kernels.
//!
//! Module map (see docs/DESIGN.md):
//! - [`formats`]: GGUF and safetensors readers, quant block layouts, reference dequantizers
//! - [`api`]: the OpenAI-compatible HTTP API (`kojo serve`)
//! - [`engine`]: the engine thread: continuous batching over a paged, prefix-cached KV cache
//! - [`kv`]: KV block bookkeeping and prefix hashing
//! - [`backend`]: the Backend trait and the CPU backend
//! - [`model`]: architectures, weights, the forward pass, generation and perplexity
//! - [`sampling`]: samplers, penalties, log-probabilities, stop strings
//! - [`structured`]: grammars (JSON schema, regex, choice, Lark, tool calls) constraining output
//! - [`tenancy`]: the tenants file (keys, weights, limits), fair share between tenants
//! - [`tokenizer`]: tokenizers, streaming detokenizer, chat templates
//! - [`usage`]: the usage ledger (SQLite), one row per finished request

pub mod api;
pub mod backend;
pub mod engine;
pub mod formats;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod structured;
pub mod tenancy;
pub mod tokenizer;
pub mod usage;
