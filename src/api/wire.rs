//! OpenAI wire types as clients send them (every field optional where OpenAI's is), and the
//! validation that turns them into [`ValidRequest`]s with no options left.

use super::error::ApiError;
use super::tools::{parse_tools, ToolSetup};
use crate::sampling::SamplingParams;
use crate::structured::GrammarSpec;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// Fields shared by chat and legacy completions.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Common {
    pub model: Option<Value>,
    pub max_tokens: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub top_k: Option<Value>,
    pub min_p: Option<Value>,
    pub presence_penalty: Option<Value>,
    pub frequency_penalty: Option<Value>,
    pub repetition_penalty: Option<Value>,
    pub logit_bias: Option<Value>,
    pub seed: Option<Value>,
    pub stop: Option<Value>,
    pub n: Option<Value>,
    pub stream: Option<Value>,
    pub stream_options: Option<Value>,
    pub ignore_eos: Option<Value>,
    pub min_tokens: Option<Value>,
    pub user: Option<Value>,
    /// structured outputs: OpenAI's, and vLLM's extra parameters (new and old names)
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    /// tool calling (chat only)
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    /// vLLM's: lower runs first (bounded by the tenant's `max_priority`)
    pub priority: Option<Value>,
    /// vLLM's: requests share prefix-cache blocks only when their salts agree
    pub cache_salt: Option<Value>,
    /// Every other field, checked by [`check_other_fields`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// OpenAI fields kojo does not act on. Features it does not have are a 400 when asked for
/// (rather than silently ignored); fields that change nothing it can honour are type-checked
/// as the spec describes them and otherwise ignored.
fn check_other_fields(other: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let unsupported = |name: &str| bad(name, format!("`{name}` is not supported by this server"));
    for (k, v) in other {
        if v.is_null() {
            continue;
        }
        let ok = match k.as_str() {
            // features kojo does not have: allowed only in their "off" form
            // the deprecated forms of tools: allowed only in their "off" form
            "functions" => v.as_array().is_some_and(|a| a.is_empty()),
            "function_call" => v.as_str() == Some("none"),
            // vLLM's choice of grammar engine and whitespace: kojo has one engine
            "guided_decoding_backend" | "guided_whitespace_pattern" => {
                if !v.is_string() {
                    return Err(bad(k, format!("`{k}` must be a string")));
                }
                true
            }
            "modalities" => v
                .as_array()
                .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text"))),
            "prediction" | "audio" | "web_search_options" | "suffix" => {
                if k == "suffix" && v.as_str() == Some("") {
                    continue;
                }
                return Err(unsupported(k));
            }
            "best_of" => v.as_u64() == Some(1),
            // accepted and ignored, but of the right type
            "store" => {
                if !v.is_boolean() {
                    return Err(bad(k, format!("`{k}` must be a boolean")));
                }
                true
            }
            "service_tier" | "reasoning_effort" | "verbosity" | "prompt_cache_key"
            | "safety_identifier" => {
                if !v.is_string() {
                    return Err(bad(k, format!("`{k}` must be a string")));
                }
                true
            }
            "metadata" => {
                let good = v
                    .as_object()
                    .is_some_and(|m| m.len() <= 16 && m.values().all(|x| x.is_string()));
                if !good {
                    return Err(bad(
                        k,
                        "`metadata` must be an object of at most 16 string values",
                    ));
                }
                true
            }
            _ => true,
        };
        if !ok {
            return Err(unsupported(k));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Value>,
    /// vLLM's: more variables for the chat template (`{"enable_thinking": false}`)
    pub chat_template_kwargs: Option<Value>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Value>,
    pub logprobs: Option<Value>,
    pub echo: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

/// A prompt as the engine takes it.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Sampling and stopping, validated.
#[derive(Debug, Clone)]
pub struct ValidParams {
    /// `None`: as many as fit the context.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    pub min_tokens: usize,
    /// Top log-probabilities per token (`Some(0)`: only the chosen token's).
    pub logprobs: Option<usize>,
    /// The grammar the output must match (`response_format`, `structured_outputs`,
    /// `guided_*`).
    pub grammar: Option<(&'static str, GrammarSpec)>,
    /// lower runs first
    pub priority: i64,
    pub cache_salt: Option<String>,
}

pub struct ValidChat {
    /// `[{role, content}]` with content flattened to a string (or null beside tool calls);
    /// assistant messages may carry `tool_calls` (arguments as sent), tool messages
    /// `tool_call_id`
    pub messages: Vec<Value>,
    pub params: ValidParams,
    /// `tools` and `tool_choice`, when tools are offered
    pub tools: Option<ToolSetup>,
    /// `chat_template_kwargs`: more template variables
    pub template_kwargs: Option<serde_json::Map<String, Value>>,
}

pub struct ValidCompletion {
    pub prompts: Vec<PromptInput>,
    pub echo: bool,
    pub params: ValidParams,
}

/// A request body as every endpoint reads it: JSON, and an object, then the endpoint's type.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

impl ValidParams {
    /// The sampler's settings for the choice drawn with `seed`.
    pub fn sampling(&self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
        }
    }
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

fn num(v: &Option<Value>, param: &str) -> Result<Option<f64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let f = n
                .as_f64()
                .ok_or_else(|| bad(param, format!("`{param}` must be a number")))?;
            if !f.is_finite() {
                return Err(bad(param, format!("`{param}` must be finite")));
            }
            Ok(Some(f))
        }
        Some(other) => Err(bad(
            param,
            format!("`{param}` must be a number, got {other}"),
        )),
    }
}

fn ranged(v: &Option<Value>, param: &str, lo: f64, hi: f64, default: f64) -> Result<f64, ApiError> {
    let x = num(v, param)?.unwrap_or(default);
    if !(lo..=hi).contains(&x) {
        return Err(bad(
            param,
            format!("`{param}` must be in [{lo}, {hi}], got {x}"),
        ));
    }
    Ok(x)
}

fn int(v: &Option<Value>, param: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let i = n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                        .map(|f| f as i64)
                })
                .ok_or_else(|| bad(param, format!("`{param}` must be an integer")))?;
            if i < lo || i > hi {
                return Err(bad(
                    param,
                    format!("`{param}` must be in [{lo}, {hi}], got {i}"),
                ));
            }
            Ok(Some(i))
        }
        Some(other) => Err(bad(
            param,
            format!("`{param}` must be an integer, got {other}"),
        )),
    }
}

fn boolean(v: &Option<Value>, param: &str) -> Result<bool, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(
            param,
            format!("`{param}` must be a boolean, got {other}"),
        )),
    }
}

impl Common {
    /// The model name the request asks for (required).
    /// The model asked for. Required, as OpenAI requires it (and llm-comply checks): vLLM
    /// serves a request without one, but a client that leaves it out is more often wrong
    /// than relying on that.
    pub fn model(&self) -> Result<String, ApiError> {
        match &self.model {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            None | Some(Value::Null) => Err(bad("model", "`model` is required")),
            Some(other) => Err(bad(
                "model",
                format!("`model` must be a non-empty string, got {other}"),
            )),
        }
    }

    pub fn validate(&self, vocab: usize, logprobs: Option<usize>) -> Result<ValidParams, ApiError> {
        check_other_fields(&self.other)?;
        let max_tokens = match int(
            &self.max_completion_tokens,
            "max_completion_tokens",
            1,
            1 << 24,
        )? {
            Some(m) => Some(m as usize),
            None => int(&self.max_tokens, "max_tokens", 1, 1 << 24)?.map(|m| m as usize),
        };
        let temperature = ranged(&self.temperature, "temperature", 0.0, 2.0, 1.0)? as f32;
        let top_p = ranged(&self.top_p, "top_p", 0.0, 1.0, 1.0)? as f32;
        if top_p == 0.0 {
            return Err(bad("top_p", "`top_p` must be in (0, 1], got 0"));
        }
        let top_k = int(&self.top_k, "top_k", -1, 1 << 20)?.unwrap_or(0).max(0) as usize;
        let min_p = ranged(&self.min_p, "min_p", 0.0, 1.0, 0.0)? as f32;
        let presence_penalty =
            ranged(&self.presence_penalty, "presence_penalty", -2.0, 2.0, 0.0)? as f32;
        let frequency_penalty =
            ranged(&self.frequency_penalty, "frequency_penalty", -2.0, 2.0, 0.0)? as f32;
        let repetition_penalty = ranged(
            &self.repetition_penalty,
            "repetition_penalty",
            0.01,
            10.0,
            1.0,
        )? as f32;
        let mut logit_bias = Vec::new();
        match &self.logit_bias {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                if m.len() > 1024 {
                    return Err(bad("logit_bias", "`logit_bias` has more than 1024 entries"));
                }
                for (k, v) in m {
                    let id: u32 = k
                        .parse()
                        .ok()
                        .filter(|&i: &u32| (i as usize) < vocab)
                        .ok_or_else(|| {
                            bad(
                                "logit_bias",
                                format!("`logit_bias` key '{k}' is not a token id below {vocab}"),
                            )
                        })?;
                    let b = ranged(&Some(v.clone()), "logit_bias", -100.0, 100.0, 0.0)? as f32;
                    logit_bias.push((id, b));
                }
            }
            Some(other) => {
                return Err(bad(
                    "logit_bias",
                    format!("`logit_bias` must be an object, got {other}"),
                ))
            }
        }
        let seed = match &self.seed {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_i64()
                    .map(|i| i as u64)
                    .or_else(|| n.as_u64())
                    .ok_or_else(|| bad("seed", "`seed` must be an integer"))?,
            ),
            Some(other) => {
                return Err(bad(
                    "seed",
                    format!("`seed` must be an integer, got {other}"),
                ))
            }
        };
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => {
                if a.len() > 16 {
                    return Err(bad("stop", "`stop` has more than 16 strings"));
                }
                a.iter()
                    .map(|x| {
                        x.as_str().map(str::to_string).ok_or_else(|| {
                            bad("stop", "`stop` must be a string or a list of strings")
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(_) => return Err(bad("stop", "`stop` must be a string or a list of strings")),
        };
        if stop.iter().any(|s| s.is_empty() || s.len() > 1024) {
            return Err(bad("stop", "stop strings must be 1 to 1024 bytes"));
        }
        let n = int(&self.n, "n", 1, 16)?.unwrap_or(1) as usize;
        let stream = boolean(&self.stream, "stream")?;
        let include_usage = match &self.stream_options {
            None | Some(Value::Null) => false,
            Some(v @ Value::Object(_)) => {
                if !stream {
                    return Err(bad(
                        "stream_options",
                        "`stream_options` is only allowed with `stream: true`",
                    ));
                }
                let so: StreamOptions = serde_json::from_value(v.clone())
                    .map_err(|e| bad("stream_options", format!("`stream_options`: {e}")))?;
                so.include_usage
            }
            Some(other) => {
                return Err(bad(
                    "stream_options",
                    format!("`stream_options` must be an object, got {other}"),
                ))
            }
        };
        let min_tokens = int(&self.min_tokens, "min_tokens", 0, 1 << 24)?.unwrap_or(0) as usize;
        if let Some(m) = max_tokens {
            if min_tokens > m {
                return Err(bad(
                    "min_tokens",
                    format!("`min_tokens` ({min_tokens}) is larger than `max_tokens` ({m})"),
                ));
            }
        }
        match &self.user {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(other) => {
                return Err(bad("user", format!("`user` must be a string, got {other}")))
            }
        }
        Ok(ValidParams {
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
            seed,
            stop,
            n,
            stream,
            include_usage,
            ignore_eos: boolean(&self.ignore_eos, "ignore_eos")?,
            min_tokens,
            logprobs,
            grammar: self.grammar()?,
            priority: int(&self.priority, "priority", -(1 << 31), (1 << 31) - 1)?.unwrap_or(0),
            cache_salt: match &self.cache_salt {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 1024 => Some(s.clone()),
                Some(_) => {
                    return Err(bad(
                        "cache_salt",
                        "`cache_salt` must be a string of 1 to 1024 bytes",
                    ))
                }
            },
        })
    }

    /// The one grammar the request asks for, from whichever field names it.
    fn grammar(&self) -> Result<Option<(&'static str, GrammarSpec)>, ApiError> {
        let mut found: Vec<(&'static str, GrammarSpec)> = Vec::new();
        if let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) {
            if let Some(g) = response_format(rf)? {
                found.push(("response_format", g));
            }
        }
        if let Some(so) = self.structured_outputs.as_ref().filter(|v| !v.is_null()) {
            let Value::Object(m) = so else {
                return Err(bad(
                    "structured_outputs",
                    "`structured_outputs` must be an object",
                ));
            };
            for (k, v) in m {
                if v.is_null() || v == &Value::Bool(false) {
                    continue;
                }
                let name = format!("structured_outputs.{k}");
                let g = match k.as_str() {
                    "json" => json_schema_value(v, &name)?,
                    "json_object" => GrammarSpec::JsonObject,
                    "regex" => GrammarSpec::Regex(string(v, &name)?),
                    "choice" => choice(v, &name)?,
                    "grammar" => GrammarSpec::Lark(string(v, &name)?),
                    "whitespace_pattern" | "disable_any_whitespace" | "disable_additional_properties" => continue,
                    other => {
                        return Err(bad(
                            "structured_outputs",
                            format!("`structured_outputs.{other}` is not supported (json, json_object, regex, choice, grammar)"),
                        ))
                    }
                };
                found.push(("structured_outputs", g));
            }
        }
        for (name, v) in [
            ("guided_json", &self.guided_json),
            ("guided_regex", &self.guided_regex),
            ("guided_choice", &self.guided_choice),
            ("guided_grammar", &self.guided_grammar),
        ] {
            let Some(v) = v.as_ref().filter(|v| !v.is_null()) else {
                continue;
            };
            let g = match name {
                "guided_json" => json_schema_value(v, name)?,
                "guided_regex" => GrammarSpec::Regex(string(v, name)?),
                "guided_choice" => choice(v, name)?,
                _ => GrammarSpec::Lark(string(v, name)?),
            };
            found.push((name, g));
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|f| f.0).collect();
            return Err(bad(
                found[1].0,
                format!(
                    "a request takes one grammar; this one names {}",
                    names.join(", ")
                ),
            ));
        }
        Ok(found.pop())
    }
}

fn string(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err(bad(param, format!("`{param}` must be a non-empty string"))),
    }
}

fn choice(v: &Value, param: &str) -> Result<GrammarSpec, ApiError> {
    let items = v
        .as_array()
        .filter(|a| !a.is_empty() && a.len() <= 4096)
        .ok_or_else(|| {
            bad(
                param,
                format!("`{param}` must be a list of 1 to 4096 strings"),
            )
        })?;
    let strs = items
        .iter()
        .map(|x| x.as_str().filter(|s| !s.is_empty()).map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            bad(
                param,
                format!("`{param}` must be a list of non-empty strings"),
            )
        })?;
    Ok(GrammarSpec::Choice(strs))
}

/// A JSON schema given as an object (or a boolean), or as a string holding one (vLLM accepts
/// both).
fn json_schema_value(v: &Value, param: &str) -> Result<GrammarSpec, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| bad(param, format!("`{param}` is not valid JSON: {e}")))?,
        other => other.clone(),
    };
    match schema {
        Value::Object(_) => Ok(GrammarSpec::JsonSchema(schema)),
        Value::Bool(true) => Ok(GrammarSpec::JsonSchema(serde_json::json!({}))),
        _ => Err(bad(
            param,
            format!("`{param}` must be a JSON schema object"),
        )),
    }
}

/// OpenAI's `response_format`: text (no grammar), json_object, json_schema.
fn response_format(rf: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    const P: &str = "response_format";
    let ty = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad(
            P,
            "`response_format.type` must be text, json_object or json_schema",
        )
    })?;
    match ty {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let js = rf.get("json_schema").filter(|v| v.is_object()).ok_or_else(|| {
                bad(P, "`response_format.json_schema` must be an object with `name` and `schema`")
            })?;
            if let Some(n) = js.get("name") {
                if !n.as_str().is_some_and(|n| (1..=64).contains(&n.len())) {
                    return Err(bad(P, "`response_format.json_schema.name` must be a string of 1 to 64 characters"));
                }
            }
            match js.get("strict") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => {}
                _ => return Err(bad(P, "`response_format.json_schema.strict` must be a boolean")),
            }
            match js.get("schema") {
                // OpenAI's default: any JSON value... as an object
                None | Some(Value::Null) => Ok(Some(GrammarSpec::JsonObject)),
                Some(s) => json_schema_value(s, "response_format.json_schema.schema").map(Some),
            }
        }
        other => Err(bad(
            P,
            format!("`response_format.type` '{other}' is not supported (text, json_object, json_schema)"),
        )),
    }
}

impl ChatRequest {
    pub fn validate(&self, vocab: usize) -> Result<ValidChat, ApiError> {
        let msgs = match &self.messages {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => return Err(bad("messages", "`messages` must not be empty")),
            None | Some(Value::Null) => return Err(bad("messages", "`messages` is required")),
            Some(other) => {
                return Err(bad(
                    "messages",
                    format!("`messages` must be a list, got {other}"),
                ))
            }
        };
        let mut messages = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).ok_or_else(|| {
                bad(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be a string"),
                )
            })?;
            if !matches!(role, "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!("unknown role '{role}'"),
                ));
            }
            if m.get("function_call").is_some_and(|v| !v.is_null()) {
                return Err(bad(
                    &format!("messages[{i}].function_call"),
                    "`function_call` is deprecated and not supported; use `tool_calls`",
                ));
            }
            let tool_calls = match m.get("tool_calls") {
                None | Some(Value::Null) => None,
                Some(v) if role == "assistant" => Some(super::tools::history_calls(v, i)?),
                Some(_) => {
                    return Err(bad(
                        &format!("messages[{i}].tool_calls"),
                        "only assistant messages carry `tool_calls`",
                    ))
                }
            };
            let content = match m.get("content") {
                None | Some(Value::Null) if role == "assistant" => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(bad(
                                    &format!("messages[{i}].content[{j}]"),
                                    "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(bad(
                        &format!("messages[{i}].content"),
                        format!("`messages[{i}].content` must be a string or a list of text parts"),
                    ))
                }
            };
            let role = if role == "developer" { "system" } else { role };
            let mut msg = serde_json::json!({"role": role, "content": content});
            if let Some(calls) = tool_calls {
                msg["tool_calls"] = calls;
            }
            if role == "tool" {
                match m.get("tool_call_id") {
                    Some(Value::String(id)) => msg["tool_call_id"] = Value::String(id.clone()),
                    None | Some(Value::Null) => {}
                    Some(_) => {
                        return Err(bad(
                            &format!("messages[{i}].tool_call_id"),
                            "`tool_call_id` must be a string",
                        ))
                    }
                }
                if let Some(Value::String(n)) = m.get("name") {
                    msg["name"] = Value::String(n.clone());
                }
            }
            messages.push(msg);
        }
        let logprobs = if boolean(&self.logprobs, "logprobs")? {
            Some(int(&self.top_logprobs, "top_logprobs", 0, 20)?.unwrap_or(0) as usize)
        } else {
            if int(&self.top_logprobs, "top_logprobs", 0, 20)?.is_some_and(|k| k > 0) {
                return Err(bad("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
            }
            None
        };
        let params = self.common.validate(vocab, logprobs)?;
        let tools = parse_tools(
            &self.common.tools,
            &self.common.tool_choice,
            &self.common.parallel_tool_calls,
        )?;
        if let (Some(t), Some(_)) = (&tools, &params.grammar) {
            if t.mode.is_some() {
                return Err(bad(
                    "tool_choice",
                    "tool calls and a grammar (response_format, structured_outputs, guided_*) \
                     cannot be combined; set tool_choice to none",
                ));
            }
        }
        let template_kwargs = match &self.chat_template_kwargs {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                if m.contains_key("messages") {
                    return Err(bad(
                        "chat_template_kwargs",
                        "`chat_template_kwargs` may not set `messages`",
                    ));
                }
                Some(m.clone())
            }
            Some(other) => {
                return Err(bad(
                    "chat_template_kwargs",
                    format!("`chat_template_kwargs` must be an object, got {other}"),
                ))
            }
        };
        Ok(ValidChat {
            messages,
            params,
            tools,
            template_kwargs,
        })
    }
}

impl CompletionRequest {
    pub fn validate(&self, vocab: usize) -> Result<ValidCompletion, ApiError> {
        let id_list = |a: &[Value]| -> Option<Vec<u32>> {
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&i| (i as usize) < vocab)
                        .map(|i| i as u32)
                })
                .collect()
        };
        let prompts = match &self.prompt {
            None | Some(Value::Null) => return Err(bad("prompt", "`prompt` is required")),
            Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(bad("prompt", "`prompt` must not be empty"))
            }
            Some(Value::Array(a)) if a.iter().all(|x| x.is_string()) => a
                .iter()
                .map(|x| PromptInput::Text(x.as_str().unwrap().to_string()))
                .collect(),
            Some(Value::Array(a)) if a.iter().all(|x| x.is_number()) => {
                vec![PromptInput::Ids(id_list(a).ok_or_else(|| {
                    bad(
                        "prompt",
                        format!("token ids must be integers below {vocab}"),
                    )
                })?)]
            }
            Some(Value::Array(a)) if a.iter().all(|x| x.is_array()) => a
                .iter()
                .map(|x| {
                    let ids = id_list(x.as_array().unwrap()).ok_or_else(|| {
                        bad(
                            "prompt",
                            format!("token ids must be integers below {vocab}"),
                        )
                    })?;
                    if ids.is_empty() {
                        return Err(bad("prompt", "a token-id prompt must not be empty"));
                    }
                    Ok(PromptInput::Ids(ids))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(bad(
                    "prompt",
                    "`prompt` must be a string, a list of strings, or token ids",
                ))
            }
        };
        if prompts.len() > 64 {
            return Err(bad("prompt", "at most 64 prompts per request"));
        }
        let logprobs = int(&self.logprobs, "logprobs", 0, 5)?.map(|k| k as usize);
        for (name, v) in [
            ("tools", &self.common.tools),
            ("tool_choice", &self.common.tool_choice),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(bad(name, format!("`{name}` is for /v1/chat/completions")));
            }
        }
        let mut params = self.common.validate(vocab, logprobs)?;
        if params.max_tokens.is_none() {
            // OpenAI's default for legacy completions; like vLLM, a larger `min_tokens` is a 400
            if params.min_tokens > 16 {
                return Err(bad(
                    "min_tokens",
                    format!(
                        "`min_tokens` ({}) is larger than the default `max_tokens` (16) of /v1/completions",
                        params.min_tokens
                    ),
                ));
            }
            params.max_tokens = Some(16);
        }
        let echo = boolean(&self.echo, "echo")?;
        if echo && params.stream {
            return Err(bad("echo", "`echo` is not supported with `stream: true`"));
        }
        if echo && logprobs.is_some() {
            return Err(bad(
                "echo",
                "`echo` with `logprobs` (prompt log-probabilities) is not supported yet",
            ));
        }
        Ok(ValidCompletion {
            prompts,
            echo,
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ValidChat, ApiError> {
        let r: ChatRequest = serde_json::from_str(body).unwrap();
        r.validate(100)
    }

    #[test]
    fn rules_name_the_parameter() {
        let ok = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]"#;
        assert!(chat(&format!("{ok}}}")).is_ok());
        for (extra, param) in [
            (r#","temperature":2.5"#, "temperature"),
            (r#","top_p":0"#, "top_p"),
            (r#","n":0"#, "n"),
            (r#","max_tokens":-1"#, "max_tokens"),
            (r#","logit_bias":{"100":1}"#, "logit_bias"),
            (
                r#","stream_options":{"include_usage":true}"#,
                "stream_options",
            ),
            (r#","top_logprobs":3"#, "top_logprobs"),
            (r#","logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#","stop":["", "x"]"#, "stop"),
            (r#","min_tokens":5,"max_tokens":2"#, "min_tokens"),
            (r#","presence_penalty":"a lot""#, "presence_penalty"),
            (r#","priority":1.5"#, "priority"),
            (r#","cache_salt":"""#, "cache_salt"),
            (r#","cache_salt":7"#, "cache_salt"),
        ] {
            let e = chat(&format!("{ok}{extra}}}"))
                .err()
                .unwrap_or_else(|| panic!("{extra} accepted"));
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
        let e = chat(r#"{"model":"m","messages":[]}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let parts = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).ok().unwrap();
        assert_eq!(parts.messages[0]["content"], "ab");
    }

    #[test]
    fn completions_min_tokens_past_the_default_max_tokens_is_a_400() {
        let c = |body: &str| {
            serde_json::from_str::<CompletionRequest>(body)
                .unwrap()
                .validate(100)
        };
        let e = c(r#"{"model":"m","prompt":"a","min_tokens":20}"#)
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("min_tokens"), "{}", e.message);
        let ok = c(r#"{"model":"m","prompt":"a","min_tokens":20,"max_tokens":30}"#)
            .ok()
            .unwrap();
        assert_eq!((ok.params.min_tokens, ok.params.max_tokens), (20, Some(30)));
        let ok = c(r#"{"model":"m","prompt":"a","min_tokens":16}"#)
            .ok()
            .unwrap();
        assert_eq!(ok.params.max_tokens, Some(16));
    }
}
