//! `kojo serve`: bind first (so /health answers 503 while loading), load the model on a
//! blocking thread, start the engine, then serve. Routes, API keys, body limits, admission
//! control and graceful shutdown live here.

use super::error::ApiError;
use super::listen::ConnLimits;
use super::respond::{respond, Bill, Job, Kind};
use super::wire::{parse_body, ChatRequest, CompletionRequest, PromptInput};
use crate::backend::cpu::{CpuBackend, MatmulMode};
use crate::backend::gpu::GpuBackend;
use crate::backend::{Backend, Target};
use crate::engine::metrics::Metrics;
use crate::engine::scheduler::SchedulerConfig;
use crate::engine::EngineHandle;
use crate::model::{ModelSource, Transformer};
use crate::structured::tools::grammar as tool_grammar;
use crate::structured::{Constraint, GrammarLimits, GrammarSpec, Grammars};
use crate::tenancy::fair::Share;
use crate::tenancy::{request_salt, Registry, Slot, Tenancy, TokensRefused, Who};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::usage::{self, Ledger};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub served_name: String,
    /// more model ids requests may use (`--served-model-name a b c`)
    pub aliases: Vec<String>,
    /// `--chat-template`: a file or the template, instead of the model's own
    pub chat_template: Option<String>,
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    /// Longest sequence (prompt + output) a request may ask for.
    pub max_model_len: usize,
    /// max_tokens of chat requests that give none; `None`: the rest of the context.
    pub default_max_tokens: Option<usize>,
    /// KV-cache capacity in tokens (rounded up to whole blocks).
    pub kv_tokens: usize,
    pub max_num_seqs: usize,
    pub max_batch_tokens: usize,
    /// Admission control: requests and prompt tokens allowed to wait.
    pub max_waiting: usize,
    pub max_waiting_tokens: usize,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    /// /metrics needs a key too (when keys are configured)
    pub metrics_auth: bool,
    pub conn: ConnLimits,
    /// time to read a request's whole body
    pub body_timeout: Duration,
    /// tokenizer, detokenizer and template jobs running at once
    pub tokenizer_threads: usize,
    pub matmul: MatmulMode,
    pub target: Target,
    /// Kernel sources to compile instead of the embedded ones (GPU only).
    pub kernel_dir: Option<PathBuf>,
    /// What a request's grammar may be, and how long it may take to compile.
    pub grammar_limits: GrammarLimits,
    pub grammar_timeout: Duration,
    /// `--tenants`: keys identify tenants (then `api_keys` is empty)
    pub tenants: Option<Arc<Tenancy>>,
    /// `--usage-db`: the usage ledger every finished request is written to
    pub usage: Option<Arc<Ledger>>,
}

/// What exists once the model has loaded.
pub struct Ready {
    pub tok: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub engine: EngineHandle,
    pub max_model_len: usize,
    pub vocab: usize,
    /// the longest token's bytes, plus one: a text of B bytes has at least B / this tokens
    pub max_bytes_per_token: usize,
    pub grammars: Arc<Grammars>,
}

impl Ready {
    /// A 400 for a text whose byte length alone proves it does not fit the context, before
    /// anything tokenizes it.
    fn precheck(&self, param: &str, text: &str) -> Result<(), ApiError> {
        let least = text.len().div_ceil(self.max_bytes_per_token.max(1));
        if least >= self.max_model_len {
            return Err(ApiError::invalid(
                param,
                format!(
                    "the prompt has {} bytes, so at least {least} tokens; this server's context \
                     is {}",
                    text.len(),
                    self.max_model_len
                ),
            ));
        }
        Ok(())
    }
}

pub struct AppState {
    pub cfg: ServeConfig,
    pub ready: OnceLock<Ready>,
    pub metrics: Arc<Metrics>,
    next_id: AtomicU64,
    started: u64,
    /// bounds the tokenizer work beside the async runtime
    blocking: Arc<Semaphore>,
}

type St = State<Arc<AppState>>;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        let r = self.ready.get().ok_or_else(ApiError::loading)?;
        match r.engine.status.failure() {
            Some(why) => Err(ApiError::unavailable(why)),
            None => Ok(r),
        }
    }

    /// Run `f` (tokenizing, detokenizing, rendering a template) on the blocking pool, at most
    /// `--tokenizer-threads` at once, so the async workers keep serving.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self
            .blocking
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task: {e}")))?
    }

    /// Compile a request's grammar on the blocking pool within `--grammar-timeout` (a slow
    /// one holds its pool slot until it ends, never the engine or the async workers). A
    /// grammar that does not compile, or not in time, is a 400 naming `param` (counted as an
    /// invalid request).
    async fn compile(
        &self,
        grammars: Arc<Grammars>,
        grammar: Option<(&str, GrammarSpec)>,
    ) -> Result<Option<Constraint>, ApiError> {
        let Some((param, spec)) = grammar else {
            return Ok(None);
        };
        self.compile_one(grammars, param, spec).await.map(Some)
    }

    async fn compile_one(
        &self,
        grammars: Arc<Grammars>,
        param: &str,
        spec: GrammarSpec,
    ) -> Result<Constraint, ApiError> {
        let permit = self
            .blocking
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _ = tx.send(grammars.compile(&spec));
        });
        let limit = self.cfg.grammar_timeout;
        match tokio::time::timeout(limit, rx).await {
            Err(_) => Err(ApiError::invalid(
                param,
                format!(
                    "the grammar did not compile within {:.1} s (--grammar-timeout)",
                    limit.as_secs_f64()
                ),
            )),
            Ok(Err(_)) => Err(ApiError::internal("the grammar compiler stopped")),
            Ok(Ok(Err(e))) => Err(ApiError::invalid(
                param,
                format!("`{param}`: the grammar does not compile: {e}"),
            )),
            Ok(Ok(Ok(c))) => Ok(c),
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{:08x}", self.started, n)
    }

    fn check_model(&self, asked: &str) -> Result<(), ApiError> {
        if asked == self.cfg.served_name || self.cfg.aliases.iter().any(|a| a == asked) {
            Ok(())
        } else {
            Err(ApiError::model_not_found(asked, &self.cfg.served_name))
        }
    }

    /// Admission by what the request adds to the queue: `seqs` sequences (prompts × n) and
    /// their prompt tokens. 400 when the request alone exceeds a limit (it could never be
    /// admitted), 429 when the queue is too full now.
    fn admit(&self, seqs: usize, new_tokens: usize) -> Result<(), ApiError> {
        let m = &self.metrics;
        let (max_w, max_t) = (self.cfg.max_waiting, self.cfg.max_waiting_tokens);
        if seqs > max_w {
            return Err(ApiError::invalid(
                "n",
                format!("the request has {seqs} sequences (prompts × n); this server queues {max_w} at most"),
            ));
        }
        if new_tokens > max_t {
            return Err(ApiError::invalid(
                "prompt",
                format!("the request queues {new_tokens} prompt tokens (prompts × n); this server queues {max_t} at most"),
            ));
        }
        if m.waiting.get() as usize + seqs > max_w {
            return Err(ApiError::overloaded(format!(
                "{} sequences are already waiting; retry later",
                m.waiting.get()
            )));
        }
        if m.waiting_tokens.get() as usize + new_tokens > max_t {
            return Err(ApiError::overloaded(
                "too many prompt tokens are waiting; retry later",
            ));
        }
        Ok(())
    }
}

/// Check the prompt fits with room for at least one token, and `max_tokens` fits after it.
fn check_length(prompt: usize, max_tokens: Option<usize>, max_len: usize) -> Result<(), ApiError> {
    if prompt == 0 {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompt >= max_len {
        return Err(ApiError::invalid(
            "messages",
            format!("the prompt has {prompt} tokens; this server's context is {max_len}"),
        ));
    }
    if let Some(m) = max_tokens {
        if prompt + m > max_len {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("{prompt} prompt tokens + max_tokens {m} exceed the context of {max_len}"),
            ));
        }
    }
    Ok(())
}

/// What a request carries for its tenant: the registry that identified it, its concurrency
/// slot, its name, and the rate-limit headers for its answer. A 429 (with OpenAI's rate-limit
/// headers) past its rpm or its `max_concurrency`.
struct TenantHold {
    who: Option<(Arc<Registry>, Who)>,
    slot: Option<Slot>,
    /// the name its requests are metered under ("default" without `--tenants`)
    name: Arc<str>,
    headers: Vec<(&'static str, String)>,
}

impl TenantHold {
    /// The request's share of the scheduler; a 400 for a `priority` the tenant may not ask for.
    fn share(&self, priority: i64) -> Result<Share, ApiError> {
        match &self.who {
            None => Ok(Share {
                priority,
                ..Share::default()
            }),
            Some((reg, who)) => reg
                .share(*who, priority)
                .map_err(|m| ApiError::invalid("priority", m)),
        }
    }

    /// The request's prefix-cache key: its tenant's, with the request's own `cache_salt`.
    fn salt(&self, cache_salt: Option<&str>) -> u64 {
        let base = self
            .who
            .as_ref()
            .map_or(0, |(reg, who)| reg.cache_salt(*who));
        request_salt(base, cache_salt)
    }

    /// Take the request's tokens from the tenant's tpm: a 400 when it could never fit, a 429
    /// (with the `-tokens` headers) when not now.
    fn take_tokens(&mut self, tokens: u64) -> Result<Option<crate::tenancy::Account>, ApiError> {
        let Some((reg, who)) = &self.who else {
            return Ok(None);
        };
        match reg.take_tokens(*who, tokens) {
            Ok(None) => Ok(None),
            Ok(Some((account, info))) => {
                self.headers.extend(info.headers());
                Ok(Some(account))
            }
            Err(TokensRefused::Never(m)) => Err(ApiError::invalid("max_tokens", m)),
            Err(TokensRefused::Later(info)) => {
                let mut e = ApiError::overloaded(format!(
                    "tenant '{}' is past its tpm ({} tokens per minute); retry in {} s",
                    info.tenant, info.limit, info.next_secs
                ));
                e.retry_after = Some(info.next_secs);
                self.headers.extend(info.headers());
                Err(e)
            }
        }
    }
}

fn tenant_of(st: &AppState, caller: Option<Extension<Caller>>) -> Result<TenantHold, ApiError> {
    let (Some(_), Some(Extension(Caller(reg, who)))) = (&st.cfg.tenants, caller) else {
        return Ok(TenantHold {
            who: None,
            slot: None,
            name: Arc::from("default"),
            headers: Vec::new(),
        });
    };
    let name: Arc<str> = Arc::from(reg.name(who));
    let rate = reg.take_request(who).map_err(|info| {
        let mut e = ApiError::overloaded(format!(
            "tenant '{}' is past its rpm ({} requests per minute); retry in {} s",
            info.tenant, info.limit, info.next_secs
        ));
        e.retry_after = Some(info.next_secs);
        e.headers = info.headers();
        e
    })?;
    let headers = rate.map(|r| r.headers()).unwrap_or_default();
    let slot = reg.acquire(who).map_err(|m| {
        let mut e = ApiError::overloaded(m);
        e.headers = headers.clone();
        e
    })?;
    Ok(TenantHold {
        who: Some((reg, who)),
        slot,
        name,
        headers,
    })
}

/// The client's own request id (`X-Request-Id`), when it sent a usable one.
fn client_request_id(h: &axum::http::HeaderMap) -> Option<String> {
    h.get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_string)
}

impl AppState {
    /// Answer a chat or completion request: the tenant's limits, then `run`, then the tenant's
    /// headers on whatever comes back; a request refused before it ran is counted for its
    /// tenant (and, refused for a limit, written to the ledger as `rejected`).
    async fn answer<F, Fut>(
        self: Arc<Self>,
        caller: Option<Extension<Caller>>,
        headers: &axum::http::HeaderMap,
        run: F,
    ) -> Result<Response, ApiError>
    where
        F: FnOnce(Arc<Self>, TenantHold, Bill) -> Fut,
        Fut:
            std::future::Future<Output = (Vec<(&'static str, String)>, Result<Response, ApiError>)>,
    {
        let received_ms = usage::now_ms();
        let crid = client_request_id(headers);
        let (tenant, result) = match tenant_of(&self, caller.clone()) {
            Err(e) => {
                let name = match &caller {
                    Some(Extension(Caller(reg, who))) => reg.name(*who).to_string(),
                    None => "default".to_string(),
                };
                (Arc::from(name.as_str()), Err(e))
            }
            Ok(hold) => {
                let name = hold.name.clone();
                let bill = Bill {
                    tenant: name.clone(),
                    account: None,
                    ledger: self.cfg.usage.clone(),
                    client_request_id: crid.clone(),
                    received_ms,
                };
                let (headers, r) = run(self.clone(), hold, bill).await;
                (
                    name,
                    r.map(|x| with_headers(x, &headers)).map_err(|mut e| {
                        e.headers.extend(headers);
                        e
                    }),
                )
            }
        };
        if let Err(e) = &result {
            let outcome = match e.status.as_u16() {
                429 => "rejected",
                400..=499 => "invalid",
                _ => "error",
            };
            self.metrics.outcome(outcome);
            self.metrics.tenant_outcome(&tenant, outcome);
            if outcome == "rejected" {
                if let Some(l) = &self.cfg.usage {
                    let now = usage::now_ms();
                    l.record_later(usage::Row {
                        id: String::new(),
                        tenant: tenant.to_string(),
                        model: self.cfg.served_name.clone(),
                        received_ms,
                        started_ms: None,
                        finished_ms: now,
                        prompt_tokens: 0,
                        cached_tokens: 0,
                        completion_tokens: 0,
                        outcome: "rejected",
                        client_request_id: crid.clone(),
                    });
                }
            }
        }
        result
    }
}

/// `r` with the tenant's rate-limit headers.
fn with_headers(mut r: Response, headers: &[(&'static str, String)]) -> Response {
    for (k, v) in headers {
        if let Ok(v) = axum::http::HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r
}

async fn chat(
    State(st): St,
    caller: Option<Extension<Caller>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    st.answer(caller, &headers, move |st, mut hold, bill| async move {
        let r = chat_as(st, &mut hold, bill, arrived, body).await;
        (hold.headers, r)
    })
    .await
}

async fn chat_as(
    st: Arc<AppState>,
    hold: &mut TenantHold,
    mut bill: Bill,
    arrived: Instant,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (req, r) = (parse_body::<ChatRequest>(&body)?, st.ready()?);
    let model = req.common.model()?;
    st.check_model(&model)?;
    let mut v = req.validate(r.vocab)?;
    let share = hold.share(v.params.priority)?;
    let cache_salt = hold.salt(v.params.cache_salt.as_deref());
    if v.params.max_tokens.is_none() {
        v.params.max_tokens = st.cfg.default_max_tokens;
    }
    if r.template.is_none() {
        return Err(ApiError::bad_request(
            "this model has no chat template; use /v1/completions",
        ));
    }
    let messages = std::mem::take(&mut v.messages);
    let tools = v.tools.take();
    let kwargs = v.template_kwargs.take();
    let st2 = st.clone();
    let tools2 = tools.clone();
    let ids = st
        .blocking(move || {
            let r = st2.ready()?;
            let Some(tmpl) = r.template.as_ref() else {
                return Err(ApiError::bad_request(
                    "this model has no chat template; use /v1/completions",
                ));
            };
            let (messages, mut extra) =
                super::tools::template_messages(messages, tools2.as_ref(), tmpl.native_tools);
            if let Some(kw) = kwargs {
                // the request's variables over kojo's, as vLLM merges them
                extra.get_or_insert_with(Default::default).extend(kw);
            }
            let text = tmpl
                .render(&messages, true, extra.as_ref())
                .map_err(|e| ApiError::bad_request(format!("the chat template failed: {e}")))?;
            r.precheck("messages", &text)?;
            let tok = &r.tok;
            let mut ids = tok
                .encode(&text, false, true)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if let (true, Some(bos)) = (tok.adds_bos(), tok.bos()) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
            Ok(ids)
        })
        .await?;
    check_length(ids.len(), v.params.max_tokens, r.max_model_len)?;
    let tool_mode = tools.as_ref().and_then(|t| t.mode.clone().map(|m| (t, m)));
    let grammar = match (&tool_mode, v.params.grammar.take()) {
        (Some((t, mode)), _) => Some((
            "tools",
            GrammarSpec::Lark(tool_grammar(&t.tools, mode, t.parallel)),
        )),
        (None, g) => g,
    };
    let constraint = st.compile(r.grammars.clone(), grammar).await?;
    st.admit(v.params.n, ids.len() * v.params.n)?;
    let reserve = v.params.max_tokens.unwrap_or(0) * v.params.n;
    bill.account = hold.take_tokens((ids.len() + reserve) as u64)?;
    let job = Job {
        kind: Kind::Chat,
        id: st.new_id("chatcmpl"),
        model,
        created: now_secs(),
        params: v.params,
        prompts: vec![ids],
        echo: None,
        max_model_len: r.max_model_len,
        arrived,
        constraint,
        tool_calls: tool_mode.is_some(),
        cache_salt,
        share,
        slot: hold.slot.take(),
        bill,
    };
    Ok(respond(r.engine.clone(), r.tok.clone(), job).await)
}

async fn completions(
    State(st): St,
    caller: Option<Extension<Caller>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    st.answer(caller, &headers, move |st, mut hold, bill| async move {
        let r = completions_as(st, &mut hold, bill, arrived, body).await;
        (hold.headers, r)
    })
    .await
}

async fn completions_as(
    st: Arc<AppState>,
    hold: &mut TenantHold,
    mut bill: Bill,
    arrived: Instant,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (req, r) = (parse_body::<CompletionRequest>(&body)?, st.ready()?);
    let model = req.common.model()?;
    st.check_model(&model)?;
    let mut v = req.validate(r.vocab)?;
    let share = hold.share(v.params.priority)?;
    let cache_salt = hold.salt(v.params.cache_salt.as_deref());
    let inputs = std::mem::take(&mut v.prompts);
    let st2 = st.clone();
    let (prompts, texts) = st
        .blocking(move || {
            let r = st2.ready()?;
            let tok = &r.tok;
            let bad = |e: crate::tokenizer::TokenizerError| ApiError::bad_request(e.to_string());
            for p in &inputs {
                if let PromptInput::Text(t) = p {
                    r.precheck("prompt", t)?;
                }
            }
            let mut ids = Vec::new();
            let mut texts = Vec::new();
            for p in inputs {
                match p {
                    PromptInput::Text(t) => {
                        ids.push(tok.encode(&t, true, true).map_err(bad)?);
                        texts.push(t);
                    }
                    PromptInput::Ids(i) => {
                        texts.push(tok.decode(&i, false).map_err(bad)?);
                        ids.push(i);
                    }
                }
            }
            Ok((ids, texts))
        })
        .await?;
    for p in &prompts {
        check_length(p.len(), v.params.max_tokens, r.max_model_len).map_err(|mut e| {
            if e.param.as_deref() == Some("messages") {
                e.param = Some("prompt".into());
            }
            e
        })?;
    }
    let constraint = st
        .compile(r.grammars.clone(), v.params.grammar.take())
        .await?;
    let n = v.params.n;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    st.admit(prompts.len() * n, prompt_tokens * n)?;
    let reserve = v.params.max_tokens.unwrap_or(0) * n * prompts.len();
    bill.account = hold.take_tokens((prompt_tokens + reserve) as u64)?;
    let job = Job {
        kind: Kind::Completion,
        id: st.new_id("cmpl"),
        model,
        created: now_secs(),
        params: v.params,
        prompts,
        echo: v.echo.then_some(texts),
        max_model_len: r.max_model_len,
        arrived,
        constraint,
        tool_calls: false,
        cache_salt,
        share,
        slot: hold.slot.take(),
        bill,
    };
    Ok(respond(r.engine.clone(), r.tok.clone(), job).await)
}

impl AppState {
    /// The served model under `id`, as /v1/models lists it.
    fn model_card(&self, id: &str) -> Value {
        json!({
            "id": id, "object": "model", "created": self.started, "owned_by": "kojo",
            "root": self.cfg.model.display().to_string(), "parent": null,
            "max_model_len": self.cfg.max_model_len,
        })
    }

    fn model_ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.cfg.served_name.as_str())
            .chain(self.cfg.aliases.iter().map(String::as_str))
    }
}

async fn models(State(st): St) -> Json<Value> {
    let data: Vec<Value> = st.model_ids().map(|id| st.model_card(id)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one served model, or a 404 naming what is served.
async fn model_by_id(
    State(st): St,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    st.check_model(&id)?;
    Ok(Json(st.model_card(&id)))
}

/// `GET /version`, as vLLM answers it.
async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// 200 while the engine can serve; 503 while loading and from the moment the engine stops.
/// A usage ledger that cannot be written does not stop serving: it is shown here.
async fn health(State(st): St) -> Response {
    match st.ready() {
        Ok(_) => {
            let mut body = json!({"status": "ok"});
            if let Some(l) = &st.cfg.usage {
                body["usage_ledger"] = match l.health() {
                    None => json!("ok"),
                    Some(e) => json!(format!("failing: {e}")),
                };
            }
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(st): St) -> Response {
    let mut text = st.metrics.render();
    if let Some(l) = &st.cfg.usage {
        use std::fmt::Write as _;
        let m = crate::engine::metrics::go_float;
        let name = crate::engine::metrics::escape(&st.cfg.served_name);
        let _ = write!(
            text,
            "# HELP kojo:usage_ledger_rows_total Rows committed to the usage ledger.\n\
             # TYPE kojo:usage_ledger_rows_total counter\n\
             kojo:usage_ledger_rows_total{{model_name=\"{name}\"}} {}\n\
             # HELP kojo:usage_ledger_write_errors_total Usage-ledger writes that failed.\n\
             # TYPE kojo:usage_ledger_write_errors_total counter\n\
             kojo:usage_ledger_write_errors_total{{model_name=\"{name}\"}} {}\n",
            m(l.rows_written() as f64),
            m(l.failed_writes() as f64)
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=tenant|day|model`: the ledger's
/// totals; the admin (or anyone, without `--tenants`) sees every tenant, a tenant its own rows.
async fn usage_totals(
    State(st): St,
    caller: Option<Extension<Caller>>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Json<Value>, ApiError> {
    let Some(ledger) = &st.cfg.usage else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::bad_request("this server keeps no usage ledger (--usage-db, --tenants)")
        });
    };
    let mut query = usage::Query {
        from: None,
        to: None,
        group_by: usage::GroupBy::Tenant,
        tenant: None,
    };
    for (k, v) in form_pairs(q.as_deref().unwrap_or("")) {
        match k.as_str() {
            "from" => {
                query.from =
                    Some(usage::check_day("from", &v).map_err(|m| ApiError::invalid("from", m))?)
            }
            "to" => {
                query.to = Some(usage::check_day("to", &v).map_err(|m| ApiError::invalid("to", m))?)
            }
            "group_by" => {
                query.group_by = v
                    .parse()
                    .map_err(|m: String| ApiError::invalid("group_by", m))?
            }
            "tenant" => query.tenant = Some(v),
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!(
                    "unknown parameter `{other}`; this endpoint takes from, to, group_by, tenant"
                ),
                ))
            }
        }
    }
    if let Some(Extension(Caller(reg, who))) = &caller {
        if let Who::Tenant(_) = who {
            // a tenant sees its own rows only, whatever it asked
            query.tenant = Some(reg.name(*who).to_string());
        }
    }
    let path = ledger.path.clone();
    let q2 = query.clone();
    let rows = st
        .blocking(move || usage::query(&path, &q2).map_err(ApiError::internal))
        .await?;
    Ok(Json(usage::to_json(&query, &rows)))
}

/// `a=b&c=d`, percent-decoded.
fn form_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = |c: u8| (c as char).to_digit(16);
                    match (hex(b[i + 1]), hex(b[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `POST /admin/reload` (the admin key): read the tenants file again, as SIGHUP does.
async fn admin_reload(
    State(st): St,
    caller: Option<Extension<Caller>>,
) -> Result<Json<Value>, ApiError> {
    let Some(t) = &st.cfg.tenants else {
        return Err(ApiError::bad_request(
            "this server runs without a tenants file (--tenants)",
        ));
    };
    if !matches!(caller, Some(Extension(Caller(_, Who::Admin)))) {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            ..ApiError::bad_request("reloading the tenants file needs the admin key")
        });
    }
    let n = t.reload().map_err(ApiError::bad_request)?;
    tracing::info!(tenants = n, "reloaded {}", t.path.display());
    Ok(Json(json!({"reloaded": true, "tenants": n})))
}

async fn tokenize(State(st): St, body: Bytes) -> Result<Json<Value>, ApiError> {
    let mut v: Value = parse_body(&body)?;
    drop(body);
    st.ready()?;
    if let Some(m) = v.get("model").and_then(|m| m.as_str()) {
        st.check_model(m)?;
    }
    let st2 = st.clone();
    st.blocking(move || {
        let r = st2.ready()?;
        let text = match (
            v.get_mut("prompt").map(Value::take),
            v.get_mut("text").map(Value::take),
            v.get("messages"),
        ) {
            (Some(Value::String(s)), _, _) | (None, Some(Value::String(s)), _) => s,
            (_, _, Some(msgs)) => {
                let req: ChatRequest =
                    serde_json::from_value(json!({"model": st2.cfg.served_name, "messages": msgs}))
                        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
                let valid = req.validate(r.vocab)?;
                let tmpl = r
                    .template
                    .as_ref()
                    .ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
                tmpl.render(&valid.messages, true, None)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "`prompt` (a string) or `messages` is required",
                ))
            }
        };
        let add_special = v
            .get("add_special_tokens")
            .and_then(|b| b.as_bool())
            .unwrap_or(true);
        let ids = r
            .tok
            .encode(&text, add_special, true)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Json(
            json!({"tokens": ids, "count": ids.len(), "max_model_len": r.max_model_len}),
        ))
    })
    .await
}

async fn detokenize(State(st): St, body: Bytes) -> Result<Json<Value>, ApiError> {
    let v: Value = parse_body(&body)?;
    let r = st.ready()?;
    let ids: Vec<u32> = v
        .get("tokens")
        .and_then(|t| t.as_array())
        .and_then(|a| {
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&i| (i as usize) < r.vocab)
                        .map(|i| i as u32)
                })
                .collect()
        })
        .ok_or_else(|| {
            ApiError::invalid(
                "tokens",
                format!("`tokens` must be a list of token ids below {}", r.vocab),
            )
        })?;
    let st2 = st.clone();
    let text = st
        .blocking(move || {
            st2.ready()?
                .tok
                .decode(&ids, false)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        })
        .await?;
    Ok(Json(json!({"prompt": text})))
}

/// Every route but /health (and /metrics, unless `--metrics-auth`) needs a key when keys are
/// configured: `Authorization: Bearer KEY`, the scheme in any case (RFC 9110), the key
/// compared in constant time.
/// The caller a tenants file identified (absent without `--tenants`), with the registry that
/// identified it (a reload does not change it for a request in flight).
#[derive(Clone)]
pub struct Caller(pub Arc<Registry>, pub Who);

async fn auth(State(st): St, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/health" || (path == "/metrics" && !st.cfg.metrics_auth);
    if open || (st.cfg.api_keys.is_empty() && st.cfg.tenants.is_none()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            let (scheme, key) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .unwrap_or("")
        .to_string();
    if let Some(t) = &st.cfg.tenants {
        // compared by hash: the lookup's timing depends on the hash, not the key
        let reg = t.current();
        return match reg.identify(&given) {
            Some(who) => {
                req.extensions_mut().insert(Caller(reg.clone(), who));
                next.run(req).await
            }
            None => ApiError::unauthorized().into_response(),
        };
    }
    let mut ok = 0u8;
    for k in &st.cfg.api_keys {
        ok |= k.as_bytes().ct_eq(given.as_bytes()).unwrap_u8();
    }
    if ok == 1 {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Read a request's whole body under one deadline (`--body-timeout`: 408 after it), refusing
/// at once one whose `Content-Length` is over `--max-body-bytes` (413 before a byte of it is
/// read, so a client that sent `Expect: 100-continue` never gets its 100).
async fn read_body(State(st): St, req: Request, next: Next) -> Response {
    let max = st.cfg.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::too_large(format!(
            "the body has {} bytes; this server takes {max} at most (--max-body-bytes)",
            declared.unwrap_or(0)
        ))
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes =
        match tokio::time::timeout(st.cfg.body_timeout, axum::body::to_bytes(body, max)).await {
            Err(_) => {
                return ApiError::timeout(format!(
                    "the body did not arrive within {:?} (--body-timeout)",
                    st.cfg.body_timeout
                ))
                .into_response()
            }
            Ok(Err(e)) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                return if too_large {
                    ApiError::too_large(format!("the body is over {max} bytes (--max-body-bytes)"))
                } else {
                    ApiError::bad_request(format!("reading the body: {e}"))
                }
                .into_response();
            }
            Ok(Ok(b)) => b,
        };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Errors axum produces itself (404, 405, 413, 415) get OpenAI-style JSON bodies too; every
/// response gets a request id, and a log line.
async fn finish(req: Request, next: Next) -> Response {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let client_id = client_request_id(req.headers());
    let t = Instant::now();
    let mut r = next.run(req).await;
    let s = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (s.is_client_error() || s.is_server_error()) && !is_json {
        r = ApiError::status_only(s).into_response();
    }
    // the client's own id when it sent one (echoed, and the id in the log), else ours
    let rid = client_id
        .filter(|v| header::HeaderValue::from_str(v).is_ok())
        .unwrap_or_else(|| format!("req-{id}"));
    if let Ok(v) = header::HeaderValue::from_str(&rid) {
        r.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(request_id = %rid, %method, path, status = s.as_u16(), ms = t.elapsed().as_millis() as u64, "request");
    r
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/usage", get(usage_totals))
        .route("/admin/reload", post(admin_reload))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn(finish))
        .with_state(state)
}

/// Load the model and start the engine (blocking).
fn load(cfg: &ServeConfig, metrics: Arc<Metrics>) -> anyhow::Result<Ready> {
    let src = ModelSource::open(&cfg.model)?;
    let tok = src.tokenizer()?;
    let template = match src.chat_template_with(&tok, cfg.chat_template.as_deref()) {
        Ok(t) => Some(t),
        // a template asked for that does not compile is a load error
        Err(e) if cfg.chat_template.is_some() => return Err(e),
        Err(e) => {
            tracing::warn!("no chat template ({e:#}); /v1/chat/completions will answer 400");
            None
        }
    };
    match cfg.target {
        Target::Cpu => start_engine(
            CpuBackend::new(cfg.matmul),
            cfg,
            &src,
            tok,
            template,
            metrics,
        ),
        Target::Cuda(n) => {
            let be = GpuBackend::cuda(n, cfg.kernel_dir.as_deref())?;
            start_engine(be, cfg, &src, tok, template, metrics)
        }
    }
}

/// Load the weights onto `be` and start the engine over it.
fn start_engine<B: Backend + Send + 'static>(
    be: B,
    cfg: &ServeConfig,
    src: &ModelSource,
    tok: Tokenizer,
    template: Option<ChatTemplate>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Ready>
where
    B::KvCache: Send,
    Transformer<B>: Send,
{
    let model = Transformer::load(&be, src)?;
    let max_model_len = cfg.max_model_len.min(model.cfg.context_length);
    if cfg.kv_tokens < max_model_len {
        anyhow::bail!(
            "--kv-cache-tokens {} is less than the context of {max_model_len} tokens \
             (--max-model-len, capped at the model's): one full-length request would not fit; \
             raise --kv-cache-tokens or lower --max-model-len",
            cfg.kv_tokens
        );
    }
    let block_size = crate::model::session::BLOCK_SIZE;
    let sched = SchedulerConfig {
        num_blocks: cfg.kv_tokens.div_ceil(block_size),
        block_size,
        max_num_seqs: cfg.max_num_seqs,
        max_batch_tokens: cfg.max_batch_tokens,
        max_model_len,
    };
    let vocab = tok.vocab_size().min(model.cfg.vocab_size);
    let eog = tok.end_of_generation();
    let n_logits = model.cfg.vocab_size;
    let (engine, _join) = crate::engine::start(be, model, sched, eog, metrics)?;
    let tok = Arc::new(tok);
    Ok(Ready {
        max_bytes_per_token: tok.max_bytes_per_token(),
        grammars: Arc::new(Grammars::new(tok.clone(), n_logits, cfg.grammar_limits)),
        tok,
        template,
        engine,
        max_model_len,
        vocab,
    })
}

/// How long a server whose engine died keeps answering (503) before it exits.
const ENGINE_DEATH_GRACE: Duration = Duration::from_secs(1);

pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let fds = super::listen::raise_fd_limit();
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", cfg.host, cfg.port))?;
    tracing::info!(
        open_files = fds,
        max_connections = cfg.conn.max_connections,
        "listening on http://{}",
        listener.local_addr()?
    );
    let state = Arc::new(AppState {
        metrics: Arc::new(Metrics::new(&cfg.served_name)),
        blocking: Arc::new(Semaphore::new(cfg.tokenizer_threads)),
        cfg: cfg.clone(),
        ready: OnceLock::new(),
        next_id: AtomicU64::new(0),
        started: now_secs(),
    });
    {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            match load(&state.cfg, state.metrics.clone()) {
                Ok(ready) => {
                    let _ = state.ready.set(ready);
                    tracing::info!("model loaded in {:.2} s; ready", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    use std::io::Write as _;
                    let _ = writeln!(std::io::stderr(), "error: {e:#}");
                    std::process::exit(1);
                }
            }
        });
    }
    // the engine's death ends the process (non-zero), after the requests it failed are told
    let engine_stopped = {
        let state = state.clone();
        async move {
            loop {
                if let Some(r) = state.ready.get() {
                    break r.engine.status.stopped().await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let died = Arc::new(OnceLock::<String>::new());
    let app = router(state.clone());
    let timeout = cfg.shutdown_timeout;
    let d = died.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!(
                "shutting down: no new connections; draining for up to {timeout:?}"
            ),
            why = engine_stopped => {
                tracing::error!("{why}; /health answers 503; exiting so that the process is restarted");
                let _ = d.set(why);
                // a moment for the failed requests' last events and for probes to see 503
                tokio::time::sleep(ENGINE_DEATH_GRACE).await;
            }
        }
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            tracing::warn!("drain deadline passed; aborting the requests still open");
            std::process::exit(1);
        });
    };
    #[cfg(unix)]
    if let Some(t) = cfg.tenants.clone() {
        // SIGHUP reloads the tenants file; a bad file is logged and the old one stays
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| anyhow::anyhow!("SIGHUP handler: {e}"))?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match t.reload() {
                    Ok(n) => tracing::info!(tenants = n, "SIGHUP: reloaded {}", t.path.display()),
                    Err(e) => tracing::error!("SIGHUP: the tenants file was not reloaded: {e}"),
                }
            }
        });
    }
    super::listen::serve(listener, app, cfg.conn, shutdown).await;
    if let Some(l) = &cfg.usage {
        l.close(); // the rows still queued
    }
    match died.get() {
        Some(why) => Err(anyhow::anyhow!("{why}")),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
