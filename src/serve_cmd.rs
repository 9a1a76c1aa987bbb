//! `kojo serve`.

use anyhow::{bail, Context, Result};
use clap::Args;
use kojo::api::serve::{serve, ServeConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// A GGUF file or a Hugging Face folder (`kojo serve MODEL`, as vLLM takes it).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_pos: Option<PathBuf>,
    /// A GGUF file or a Hugging Face folder (as llama-server's -m).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model ids clients may use (`--served-model-name a b`): the first is the one
    /// /v1/models lists first and the metrics name (default: the file name without extension).
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// A chat template to use instead of the model's own (a base model has none): a file, or
    /// the Jinja template itself.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Require this API key (repeatable; also `KOJO_API_KEY`, comma-separated); every route
    /// but /health (and /metrics, unless --metrics-auth) then needs `Authorization: Bearer KEY`.
    #[arg(
        long,
        env = "KOJO_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,
    /// /metrics needs an API key too (by default it is open, as Prometheus scrapes it).
    #[arg(long)]
    pub metrics_auth: bool,
    /// A file with one API key per line.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Longest sequence (prompt + output) per request; capped at the model's context
    /// (`-c`/`--ctx-size`, as llama-server names it).
    #[arg(long, short = 'c', visible_alias = "ctx-size", default_value_t = 4096)]
    pub max_model_len: usize,
    /// KV-cache capacity in tokens, shared by all running requests.
    #[arg(long, default_value_t = 16384)]
    pub kv_cache_tokens: usize,
    /// max_tokens for chat requests that give none (default: the rest of the context).
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// Requests in the running batch at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens per engine step (decodes plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Requests allowed to wait before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Prompt tokens allowed to wait before new requests get 429.
    #[arg(long, default_value_t = 262_144)]
    pub max_waiting_tokens: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds to drain in-flight requests after SIGTERM/SIGINT (exit status 1 when the
    /// deadline cuts requests off).
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Open connections at most; past it a new connection gets a 503 and is closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client may take to send a request's body (408 after).
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, default_value_t = 5.0)]
    pub keep_alive_timeout: f64,
    /// Seconds a response may wait on a client that does not read (a stalled stream is then
    /// closed, and its request aborted).
    #[arg(long, default_value_t = 30.0)]
    pub write_timeout: f64,
    /// Tokenizing, detokenizing and template rendering run on at most this many threads
    /// beside the async runtime (default: the CPU count).
    #[arg(long)]
    pub tokenizer_threads: Option<usize>,
    /// The largest grammar a request may send (a JSON schema's text, a regex, a Lark grammar,
    /// tool definitions), in bytes; larger is a 400.
    #[arg(long, default_value_t = 262_144)]
    pub max_grammar_bytes: usize,
    /// Seconds a request's grammar may take to compile (off the engine, on the tokenizer
    /// threads); slower is a 400.
    #[arg(long, default_value_t = 10.0)]
    pub grammar_timeout: f64,
    /// A tenants file (TOML; `kojo tenants check FILE`): its keys identify tenants, each with
    /// its fair-share weight, rpm, tpm, max_concurrency, max_priority and its own prefix cache
    /// (unless it shares). Replaces --api-key. SIGHUP (or POST /admin/reload) reloads it.
    #[arg(long)]
    pub tenants: Option<PathBuf>,
    /// The usage ledger (SQLite): one row per finished request. Default with --tenants:
    /// kojo-usage.sqlite beside the tenants file; without --tenants, given alone, it meters
    /// the one default tenant.
    #[arg(long)]
    pub usage_db: Option<PathBuf>,
    /// text, or json (one object per line)
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub cpu: crate::gen_cmd::CpuArgs,
    #[command(flatten)]
    pub device: crate::gen_cmd::DeviceArgs,
}

/// How `serve` writes its log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// for people: coloured on a terminal (never with NO_COLOR set)
    Text,
    /// one JSON object per line, for log collectors
    Json,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // a closed stderr loses log lines, nothing else
        .log_internal_errors(false);
    match a.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal as _;
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            logs.with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init()
        }
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    a.cpu.init_threads()?;
    // a machine without the device fails here, in one line, before listening
    a.device.probe()?;
    let mut keys = a.api_key.clone();
    if let Some(f) = &a.api_key_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--api-key must not be empty");
    }
    for (name, v) in [
        ("--max-model-len", a.max_model_len),
        ("--kv-cache-tokens", a.kv_cache_tokens),
        ("--max-num-seqs", a.max_num_seqs),
        ("--max-batch-tokens", a.max_batch_tokens),
        ("--max-grammar-bytes", a.max_grammar_bytes),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    for (name, v) in [
        ("--header-timeout", a.header_timeout),
        ("--body-timeout", a.body_timeout),
        ("--keep-alive-timeout", a.keep_alive_timeout),
        ("--write-timeout", a.write_timeout),
        ("--grammar-timeout", a.grammar_timeout),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            bail!("{name} must be a number of seconds in (0, 86400], got {v}");
        }
    }
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let secs = Duration::from_secs_f64;
    let Some(model) = a.model_pos.clone().or_else(|| a.model.clone()) else {
        bail!("no model: give its path (`kojo serve MODEL` or -m MODEL)");
    };
    let mut names = a.served_model_name.clone();
    if names.iter().any(|n| n.trim().is_empty()) {
        bail!("--served-model-name must not be empty");
    }
    if names.is_empty() {
        names.push(
            model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
        );
    }
    let served = names.remove(0);
    if let Some(t) = &a.chat_template {
        // a bad argument is a start-up error, before the model loads
        kojo::model::source::template_arg(t)?;
    }
    let cfg_keys_empty = keys.is_empty();
    let cfg = ServeConfig {
        model,
        served_name: served,
        aliases: names,
        chat_template: a.chat_template.clone(),
        host: a.host.clone(),
        port: a.port,
        api_keys: keys,
        max_model_len: a.max_model_len,
        default_max_tokens: a.default_max_tokens,
        kv_tokens: a.kv_cache_tokens,
        max_num_seqs: a.max_num_seqs,
        max_batch_tokens: a.max_batch_tokens,
        max_waiting: a.max_waiting,
        max_waiting_tokens: a.max_waiting_tokens,
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        metrics_auth: a.metrics_auth,
        conn: kojo::api::listen::ConnLimits {
            max_connections: a.max_connections,
            header_timeout: secs(a.header_timeout),
            keep_alive_timeout: secs(a.keep_alive_timeout),
            write_timeout: secs(a.write_timeout),
        },
        body_timeout: secs(a.body_timeout),
        tokenizer_threads: a
            .tokenizer_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1),
        matmul: a.cpu.matmul,
        target: a.device.device,
        kernel_dir: a.device.kernel_dir.clone(),
        grammar_limits: kojo::structured::GrammarLimits {
            max_bytes: a.max_grammar_bytes,
        },
        grammar_timeout: secs(a.grammar_timeout),
        tenants: match &a.tenants {
            None => None,
            Some(p) => {
                if !cfg_keys_empty {
                    bail!("--tenants replaces --api-key, --api-key-file and KOJO_API_KEY: give one or the other");
                }
                let t = kojo::tenancy::Tenancy::load(p).map_err(anyhow::Error::msg)?;
                Some(std::sync::Arc::new(t))
            }
        },
        usage: match (&a.usage_db, &a.tenants) {
            (None, None) => None,
            (Some(db), _) => Some(db.clone()),
            (None, Some(t)) => Some(
                t.parent()
                    .map(|d| d.join("kojo-usage.sqlite"))
                    .unwrap_or_else(|| "kojo-usage.sqlite".into()),
            ),
        }
        .map(|p| kojo::usage::Ledger::open(&p).map(std::sync::Arc::new))
        .transpose()
        .map_err(anyhow::Error::msg)?,
    };
    if !cfg.model.exists() {
        bail!("{}: no such file or folder", cfg.model.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg))
}
