//! HTTP: the OpenAI-compatible API over the engine.
//!
//! - [`wire`]: request types as clients send them, validated into `Valid*` types
//! - [`tools`]: `tools`/`tool_choice` validated, tool-call history rendered for the template
//! - [`error`]: OpenAI-style error bodies
//! - [`listen`]: the HTTP/1.1 accept loop: connection cap, header, keep-alive and write timeouts
//! - [`serve`]: `kojo serve`: loading, routes, auth, shutdown
//! - [`respond`]: running one request's choices on the engine: detokenizing, stop strings,
//!   log-probabilities, SSE chunks and final bodies
//!
//! The API side never touches the KV cache or the backend: it tokenizes (on the blocking
//! pool), submits to the engine, and turns each choice's event stream into text.

pub mod error;
pub mod listen;
pub mod respond;
pub mod serve;
pub mod tools;
pub mod wire;

pub use error::ApiError;
