//! The `kojo` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kojo::model::ModelSource;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod bench_cmd;
mod gen_cmd;
mod gpu_check_cmd;
mod kernels_cmd;
mod serve_cmd;

#[derive(Parser)]
#[command(name = "kojo", version, about = "kojo (工場): an LLM inference server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a model's architecture, hyperparameters, tensor types, tokenizer and chat template.
    Inspect {
        /// A GGUF file or a Hugging Face folder (config.json + safetensors + tokenizer.json).
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        #[arg(long, short)]
        model: PathBuf,
        /// Recognise control tokens such as <|im_start|> written in the text.
        #[arg(long)]
        special: bool,
        /// Add BOS/EOS where the model asks for them.
        #[arg(long)]
        add_special: bool,
        text: String,
    },
    /// Print the text of token ids (control tokens included).
    Detokenize {
        #[arg(long, short)]
        model: PathBuf,
        /// Leave control tokens out of the text.
        #[arg(long)]
        skip_special: bool,
        /// Feed the ids one at a time through the streaming detokenizer and print the piece
        /// each one releases, as a JSON array (whole UTF-8 characters only).
        #[arg(long)]
        stream: bool,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Render the model's chat template over the messages in MESSAGES.json (a JSON array of
    /// {role, content}, or an object with "messages").
    ChatTemplate {
        #[arg(long, short)]
        model: PathBuf,
        /// Leave out the assistant prompt that starts the model's reply.
        #[arg(long)]
        no_generation_prompt: bool,
        /// Use this template file instead of the model's own.
        #[arg(long)]
        template: Option<PathBuf>,
        messages: PathBuf,
    },
    /// Serve the OpenAI-compatible API (chat and legacy completions, streaming or not).
    Serve(serve_cmd::ServeArgs),
    /// Load-test an OpenAI-compatible server: TTFT, inter-token latency, tokens per second.
    BenchServe(bench_cmd::BenchServeArgs),
    /// Generate text from a prompt on the CPU, streaming it to the terminal.
    Generate(gen_cmd::GenerateArgs),
    /// Perplexity of a text file, windowed as llama-perplexity does.
    Perplexity(gen_cmd::PerplexityArgs),
    /// Time prompt processing and generation on the CPU, as llama-bench does (pp/tg tests).
    Bench(gen_cmd::BenchArgs),
    /// Check the GPU backend against the CPU backend on a GPU: every kernel, and a random
    /// SmolLM2-shaped model end to end (see scripts/gpu-check.sh).
    GpuCheck(gpu_check_cmd::GpuCheckArgs),
    /// The CUDA kernels: `kojo kernels check --arch sm_80,sm_90` compiles each with NVRTC.
    Kernels(kernels_cmd::KernelsArgs),
    /// Tenants files: `kojo tenants hash-key` (a key on stdin → the hash the file stores),
    /// `kojo tenants check FILE`.
    Tenants {
        #[command(subcommand)]
        cmd: TenantsCmd,
    },
    /// Totals from a usage ledger (`kojo serve --usage-db`), offline: the JSON `GET /v1/usage`
    /// answers, or CSV.
    Usage {
        #[arg(long)]
        db: PathBuf,
        /// First day (UTC, YYYY-MM-DD), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Last day (UTC, YYYY-MM-DD), inclusive.
        #[arg(long)]
        to: Option<String>,
        /// tenant, day or model.
        #[arg(long, default_value = "tenant")]
        group_by: String,
        /// Only this tenant's rows.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        csv: bool,
    },
    /// List tensors (name, type, shape); with --sha256, the hash of each tensor dequantized to
    /// little-endian f32.
    Tensors {
        model: PathBuf,
        #[arg(long)]
        sha256: bool,
        /// Only tensors whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
}

#[derive(Subcommand)]
enum TenantsCmd {
    /// Read a key on stdin (one line; the newline is not part of it) and print its SHA-256 in
    /// hex, as `key_sha256` in a tenants file stores it.
    HashKey,
    /// Validate a tenants file: an error naming the line and the field, or a summary.
    Check { file: PathBuf },
}

fn main() {
    let cli = Cli::parse();
    // The one-shot tools behave like Unix tools when stdout closes early (`kojo inspect m.gguf
    // | head`). The servers keep Rust's default (SIGPIPE ignored): a client that closes its
    // socket, or a closed stderr, is a failed write to handle, never the end of the process.
    if !matches!(cli.cmd, Cmd::Serve(_) | Cmd::BenchServe(_)) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if matches!(cli.cmd, Cmd::Serve(_)) {
        // a file past the size limit (RLIMIT_FSIZE: the usage ledger on a full quota) is a
        // failed write to handle, not the end of the server
        // SAFETY: setting a signal's disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
    }
    if let Err(e) = run(cli) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model, json } => inspect(&model, json),
        Cmd::Serve(a) => serve_cmd::run(a),
        Cmd::BenchServe(a) => bench_cmd::run(a),
        Cmd::Generate(a) => gen_cmd::run_generate(a),
        Cmd::Perplexity(a) => gen_cmd::run_perplexity(a),
        Cmd::Bench(a) => gen_cmd::run_bench(a),
        Cmd::Kernels(a) => kernels_cmd::run(a),
        Cmd::GpuCheck(a) => gpu_check_cmd::run(a),
        Cmd::Tenants { cmd } => match cmd {
            TenantsCmd::HashKey => {
                let mut key = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)?;
                let key = key.strip_suffix('\n').unwrap_or(&key);
                let key = key.strip_suffix('\r').unwrap_or(key);
                if key.is_empty() {
                    anyhow::bail!("no key on stdin");
                }
                println!("{}", kojo::tenancy::hash_key(key));
                Ok(())
            }
            TenantsCmd::Check { file } => {
                let t = kojo::tenancy::Tenants::load(&file).map_err(anyhow::Error::msg)?;
                let keys: usize = t.tenants.iter().map(|x| x.key_sha256.len()).sum();
                println!(
                    "{}: {} tenants, {keys} tenant keys, {} admin keys: ok",
                    file.display(),
                    t.tenants.len(),
                    t.admin_keys.len()
                );
                Ok(())
            }
        },
        Cmd::Usage {
            db,
            from,
            to,
            group_by,
            tenant,
            csv,
        } => {
            let day = |p: &str, v: Option<String>| {
                v.map(|v| kojo::usage::check_day(p, &v))
                    .transpose()
                    .map_err(anyhow::Error::msg)
            };
            let q = kojo::usage::Query {
                from: day("--from", from)?,
                to: day("--to", to)?,
                group_by: group_by.parse().map_err(anyhow::Error::msg)?,
                tenant,
            };
            let rows = kojo::usage::query(&db, &q).map_err(anyhow::Error::msg)?;
            if csv {
                print!("{}", kojo::usage::to_csv(&q, &rows));
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&kojo::usage::to_json(&q, &rows))?
                );
            }
            Ok(())
        }
        Cmd::Tokenize {
            model,
            special,
            add_special,
            text,
        } => {
            let src = ModelSource::open(&model)?;
            let tok = src.tokenizer()?;
            let ids = tok.encode(&text, add_special, special)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Cmd::Detokenize {
            model,
            skip_special,
            stream,
            ids,
        } => {
            let ids = parse_ids(&ids)?;
            let src = ModelSource::open(&model)?;
            let tok = src.tokenizer()?;
            if stream {
                let n = tok.vocab_size();
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
                    bail!("token id {bad} is outside the vocabulary (size {n})");
                }
                let mut dec = kojo::tokenizer::StreamDecoder::new(&tok, !skip_special);
                let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
                pieces.push(dec.finish());
                println!("{}", serde_json::to_string(&pieces)?);
            } else {
                print!("{}", tok.decode(&ids, !skip_special)?);
            }
            Ok(())
        }
        Cmd::ChatTemplate {
            model,
            no_generation_prompt,
            template,
            messages,
        } => {
            let src = ModelSource::open(&model)?;
            let tok = src.tokenizer()?;
            let tmpl = match template {
                Some(p) => {
                    let s = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let text =
                        |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
                    kojo::tokenizer::ChatTemplate::new(&s, &text(tok.bos()), &text(tok.eos()))?
                }
                None => src.chat_template(&tok)?,
            };
            let text = std::fs::read_to_string(&messages)
                .with_context(|| format!("reading {}", messages.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", messages.display()))?;
            let msgs = match &v {
                serde_json::Value::Array(_) => v.clone(),
                serde_json::Value::Object(o) if o.get("messages").is_some_and(|m| m.is_array()) => {
                    o["messages"].clone()
                }
                _ => bail!(
                    "{}: expected a JSON array of messages or an object with \"messages\"",
                    messages.display()
                ),
            };
            print!("{}", tmpl.render(&msgs, !no_generation_prompt, None)?);
            Ok(())
        }
        Cmd::Tensors {
            model,
            sha256,
            filter,
        } => tensors(&model, sha256, filter.as_deref()),
    }
}

fn parse_ids(args: &[String]) -> Result<Vec<u32>> {
    // accept `1 2 3`, `1,2,3` and `[1, 2, 3]`
    let joined = args.join(" ");
    joined
        .split(|c: char| c == ',' || c.is_whitespace() || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("'{s}' is not a token id"))
        })
        .collect()
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let src = ModelSource::open(path)?;
    let cfg = src.config()?;
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let n_params = src.n_params();
    let (n_tensors, format) = match &src {
        ModelSource::Gguf(g) => {
            for t in &g.tensors {
                *types.entry(t.ty.name()).or_default() += 1;
            }
            (g.tensors.len(), format!("GGUF v{}", g.version))
        }
        ModelSource::Hf { weights, .. } => {
            for t in weights.tensors.values() {
                *types.entry(format!("{:?}", t.dtype)).or_default() += 1;
            }
            (weights.tensors.len(), "safetensors".to_string())
        }
        ModelSource::Random(m, _) => {
            let t = m.tensors();
            for (_, d) in &t {
                let ty = if d.len() == 1 {
                    "F32".to_string()
                } else {
                    m.ty.name()
                };
                *types.entry(ty).or_default() += 1;
            }
            (t.len(), "random weights".to_string())
        }
    };
    let tok = src.tokenizer();
    let template = src.chat_template_source()?;
    if json {
        let v = serde_json::json!({
            "path": path,
            "format": format,
            "config": cfg,
            "tensors": n_tensors,
            "parameters": n_params,
            "tensor_types": types,
            "tokenizer": match &tok { Ok(t) => serde_json::json!({
                "kind": t.kind(), "vocab_size": t.vocab_size(), "bos": t.bos(), "eos": t.eos(), "adds_bos": t.adds_bos()}),
                Err(e) => serde_json::json!({"error": e.to_string()}) },
            "chat_template": template,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model:          {}", path.display());
    println!("format:         {format}");
    println!("architecture:   {}", cfg.arch);
    if let Some(n) = &cfg.name {
        println!("name:           {n}");
    }
    println!("parameters:     {n_params} in {n_tensors} tensors");
    println!("layers:         {}", cfg.n_layers);
    println!("hidden:         {}", cfg.hidden);
    println!("ffn:            {}", cfg.ffn);
    println!(
        "heads:          {} query, {} kv, head dim {}",
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    );
    println!("vocab:          {}", cfg.vocab_size);
    println!("context:        {}", cfg.context_length);
    println!("rope base:      {}", cfg.rope_base);
    println!("rms eps:        {:e}", cfg.rms_eps);
    println!("tied embedding: {}", cfg.tied_embeddings);
    if let Some(w) = cfg.sliding_window {
        println!("sliding window: {w}");
    }
    let types: Vec<String> = types.iter().map(|(k, v)| format!("{k} × {v}")).collect();
    println!("tensor types:   {}", types.join(", "));
    match &tok {
        Ok(t) => {
            let name = |id: Option<u32>| match id {
                Some(i) => format!("{i} {:?}", t.token_text(i).unwrap_or_default()),
                None => "none".into(),
            };
            println!("tokenizer:      {}, {} tokens", t.kind(), t.vocab_size());
            println!(
                "bos / eos:      {} / {} (BOS added: {})",
                name(t.bos()),
                name(t.eos()),
                t.adds_bos()
            );
        }
        Err(e) => println!("tokenizer:      unavailable: {e}"),
    }
    match template {
        Some(t) => println!("chat template:  {} chars\n{t}", t.len()),
        None => println!("chat template:  none"),
    }
    Ok(())
}

fn tensors(path: &Path, sha256: bool, filter: Option<&str>) -> Result<()> {
    let src = ModelSource::open(path)?;
    let hash = |v: &[f32]| {
        let mut h = Sha256::new();
        for x in v {
            h.update(x.to_le_bytes());
        }
        format!("{:x}", h.finalize())
    };
    let keep = |n: &str| filter.is_none_or(|f| n.contains(f));
    let mut rows = Vec::new();
    match &src {
        ModelSource::Gguf(g) => {
            for t in g.tensors.iter().filter(|t| keep(&t.name)) {
                let mut row =
                    serde_json::json!({"name": t.name, "type": t.ty.name(), "shape": t.dims});
                if sha256 {
                    row["sha256"] = hash(&g.tensor_f32(&t.name)?).into();
                }
                rows.push(row);
            }
        }
        ModelSource::Hf { weights, .. } => {
            for (name, t) in weights.tensors.iter().filter(|(n, _)| keep(n)) {
                let mut row = serde_json::json!({"name": name, "type": format!("{:?}", t.dtype), "shape": t.shape});
                if sha256 {
                    row["sha256"] = hash(&weights.tensor_f32(name)?).into();
                }
                rows.push(row);
            }
        }
        ModelSource::Random(m, _) => {
            for (name, dims) in m.tensors().into_iter().filter(|(n, _)| keep(n)) {
                let (ty, _, data) = m.tensor(&name)?;
                let mut row = serde_json::json!({"name": name, "type": ty.name(), "shape": dims});
                if sha256 {
                    let n = dims.iter().product();
                    row["sha256"] =
                        hash(&kojo::formats::quant::dequantize_to_vec(ty, &data, n)?).into();
                }
                rows.push(row);
            }
        }
    }
    println!("{}", serde_json::to_string(&rows)?);
    Ok(())
}
