//! `kojo generate`, `kojo perplexity` and `kojo bench`: one model on one backend (the CPU, or
//! a GPU with `--device cuda`), one sequence.

use anyhow::{bail, Context, Result};
use clap::Args;
use kojo::backend::cpu::{CpuBackend, MatmulMode};
use kojo::backend::gpu::GpuBackend;
use kojo::backend::{Backend, Target};
use kojo::model::generate::{generate, GenerateRequest};
use kojo::model::perplexity::perplexity;
use kojo::model::session::{Logits, Session};
use kojo::model::{ModelSource, Transformer};
use kojo::sampling::SamplingParams;
use kojo::tokenizer::Tokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How the CPU backend runs.
#[derive(Args)]
pub struct CpuArgs {
    /// Matmul arithmetic: `quantized` (activations quantized per block, integer dot products,
    /// as llama.cpp) or `exact` (weights dequantized to f32).
    #[arg(long, default_value = "quantized", value_parser = parse_mode)]
    pub matmul: MatmulMode,
    /// Worker threads (default: one per core).
    #[arg(long, short)]
    pub threads: Option<usize>,
}

impl CpuArgs {
    pub fn init_threads(&self) -> Result<()> {
        if let Some(t) = self.threads {
            if t == 0 {
                bail!("--threads must be at least 1");
            }
            // the pool is built at its first use, which comes after this
            kojo::backend::cpu::pool::set_threads(t);
        }
        Ok(())
    }
}

/// Which device runs the model.
#[derive(Args)]
pub struct DeviceArgs {
    /// `cpu`, or `cuda[:N]` for GPU N (kojo's CUDA kernels, compiled at first use).
    #[arg(long, default_value = "cpu")]
    pub device: Target,
    /// Compile the CUDA kernels from this folder of .cu/.cuh files instead of the built-in ones.
    #[arg(long)]
    pub kernel_dir: Option<PathBuf>,
}

impl DeviceArgs {
    /// Fail early, in one sentence, when the device cannot be used at all.
    pub fn probe(&self) -> Result<()> {
        if let Target::Cuda(_) = self.device {
            kojo::backend::gpu::cuda::probe()?;
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face folder.
    #[arg(long, short)]
    pub model: PathBuf,
    /// Context length of the session (default: the model's, capped at 4096).
    #[arg(long)]
    pub ctx_size: Option<usize>,
    #[command(flatten)]
    pub cpu: CpuArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tokens per forward pass while reading a prompt.
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
}

fn parse_mode(s: &str) -> Result<MatmulMode, String> {
    match s {
        "quantized" => Ok(MatmulMode::Quantized),
        "exact" => Ok(MatmulMode::Exact),
        _ => Err(format!("'{s}' is not one of: quantized, exact")),
    }
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text (control tokens such as <|im_start|> are recognised).
    #[arg(long, short)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A chat template to use instead of the model's own (a file, or the Jinja template
    /// itself); implies --chat.
    #[arg(long)]
    pub chat_template: Option<String>,
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// End-of-generation tokens are banned until this many tokens were generated.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// `ID=BIAS` added to token ID's logit (repeatable; BIAS in [-100, 100]).
    #[arg(long, value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// The output matches the JSON schema in this file.
    #[arg(long, conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<PathBuf>,
    /// The output matches this regular expression.
    #[arg(long, conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// The output matches the Lark grammar in this file (llguidance's dialect).
    #[arg(long)]
    pub grammar: Option<PathBuf>,
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, b) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not ID=BIAS"))?;
    let id: u32 = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}' is not a token id"))?;
    let b: f32 = b
        .trim()
        .parse()
        .map_err(|_| format!("'{b}' is not a number"))?;
    if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
        return Err(format!("bias {b} is outside [-100, 100]"));
    }
    Ok((id, b))
}

/// The grammar `a` asks for, compiled for `tok`; errors name the file.
fn constraint_of(
    a: &GenerateArgs,
    tok: &std::sync::Arc<Tokenizer>,
    n_vocab: usize,
) -> Result<Option<kojo::structured::Constraint>> {
    use kojo::structured::{GrammarLimits, GrammarSpec, Grammars};
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("{}", p.display()));
    let spec = if let Some(p) = &a.json_schema {
        let v: serde_json::Value = serde_json::from_str(&read(p)?)
            .with_context(|| format!("{}: not JSON", p.display()))?;
        GrammarSpec::JsonSchema(v)
    } else if let Some(r) = &a.regex {
        GrammarSpec::Regex(r.clone())
    } else if let Some(p) = &a.grammar {
        GrammarSpec::Lark(read(p)?)
    } else {
        return Ok(None);
    };
    let g = Grammars::new(
        tok.clone(),
        n_vocab,
        GrammarLimits {
            max_bytes: usize::MAX,
        },
    );
    let c = g.compile(&spec).map_err(|e| {
        let src = a
            .json_schema
            .as_ref()
            .or(a.grammar.as_ref())
            .map(|p| p.display().to_string());
        anyhow::anyhow!(
            "{}: the grammar does not compile: {e}",
            src.unwrap_or_else(|| "--regex".into())
        )
    })?;
    Ok(Some(c))
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file to score.
    #[arg(long, short)]
    pub file: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Print JSON instead of llama-perplexity's lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths to time, each read in one batch ("pp" tests; 0 for none).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Numbers of tokens to generate one at a time ("tg" tests; 0 for none).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Sequences decoded together in the "tg" tests (one step feeds one token of each).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub parallel: Vec<usize>,
    /// Tokens already in each sequence's cache when a "tg" test starts (read untimed).
    #[arg(short = 'd', long, default_value_t = 0)]
    pub depth: usize,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(short = 'r', long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

struct Loaded<B: Backend> {
    backend: B,
    model: Transformer<B>,
    /// `None` for random-weight models
    tok: Option<std::sync::Arc<Tokenizer>>,
    src: ModelSource,
}

impl<B: Backend> Loaded<B> {
    fn tok(&self) -> Result<&std::sync::Arc<Tokenizer>> {
        self.tok.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: a random-weight model has no tokenizer",
                self.src.path().display()
            )
        })
    }
}

fn load<B: Backend>(a: &ModelArgs, backend: B) -> Result<Loaded<B>> {
    let src = ModelSource::open(&a.model)?;
    let tok = match &src {
        ModelSource::Random(..) => None,
        _ => Some(std::sync::Arc::new(src.tokenizer()?)),
    };
    let model = Transformer::load(&backend, &src)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(tok) = tok
        .as_ref()
        .filter(|t| t.vocab_size() > model.cfg.vocab_size)
    {
        bail!(
            "{}: the tokenizer has {} tokens but the output layer only {}",
            a.model.display(),
            tok.vocab_size(),
            model.cfg.vocab_size
        );
    }
    Ok(Loaded {
        backend,
        model,
        tok,
        src,
    })
}

/// Load the model of `$m` (ModelArgs) onto the backend it names, as `$l`, and evaluate `$body`.
macro_rules! on_backend {
    ($m:expr, $l:ident => $body:expr) => {{
        $m.cpu.init_threads()?;
        match $m.device.device {
            Target::Cpu => {
                let $l = load(&$m, CpuBackend::new($m.cpu.matmul))?;
                $body
            }
            Target::Cuda(n) => {
                let $l = load(&$m, GpuBackend::cuda(n, $m.device.kernel_dir.as_deref())?)?;
                $body
            }
        }
    }};
}

fn ctx_size(a: &ModelArgs, model_ctx: usize, need: usize) -> usize {
    a.ctx_size.unwrap_or_else(|| model_ctx.min(4096).max(need))
}

/// The prompt's token ids: the chat template applied when asked, BOS added when the model adds
/// it (and the text does not already start with it).
fn prompt_ids<B: Backend>(
    l: &Loaded<B>,
    prompt: &str,
    chat: bool,
    template: Option<&str>,
) -> Result<Vec<u32>> {
    let text = if chat {
        let tmpl = l.src.chat_template_with(l.tok()?, template)?;
        let msgs = serde_json::json!([{"role": "user", "content": prompt}]);
        tmpl.render(&msgs, true, None)?
    } else {
        prompt.to_string()
    };
    let tok = l.tok()?;
    let mut ids = tok.encode(&text, false, true)?;
    if let (true, Some(bos)) = (tok.adds_bos(), tok.bos()) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    on_backend!(a.model, l => generate_on(&l, &a))
}

fn generate_on<B: Backend>(l: &Loaded<B>, a: &GenerateArgs) -> Result<()> {
    let template = a.chat_template.as_deref();
    let ids = prompt_ids(l, &a.prompt, a.chat || template.is_some(), template)?;
    let ctx = ctx_size(
        &a.model,
        l.model.cfg.context_length,
        ids.len() + a.max_tokens,
    );
    let mut session = Session::new(&l.backend, &l.model, ctx, a.model.batch)?;
    let req = GenerateRequest {
        prompt_ids: ids.clone(),
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repeat_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            seed: a.seed,
        },
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        top_logprobs: if a.json { 5 } else { 0 },
        min_tokens: a.min_tokens,
        logit_bias: a.logit_bias.clone(),
        constraint: constraint_of(a, l.tok()?, l.model.cfg.vocab_size)?,
    };
    if let Some(&(id, _)) = req
        .logit_bias
        .iter()
        .find(|b| b.0 as usize >= l.model.cfg.vocab_size)
    {
        anyhow::bail!(
            "--logit-bias: token id {id} is outside the vocabulary ({})",
            l.model.cfg.vocab_size
        );
    }
    let stdout = std::io::stdout();
    let streaming = !a.json;
    let out = generate(&mut session, l.tok()?, &req, |text| {
        if streaming {
            let mut o = stdout.lock();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
        }
    })?;
    if a.json {
        let top: Vec<Vec<(u32, f32)>> = out.top_logprobs;
        let v = serde_json::json!({
            "prompt_ids": ids,
            "output_ids": out.output_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "stop": out.stop_string,
            "top_logprobs": top,
        });
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
}

pub fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    on_backend!(a.model, l => perplexity_on(&l, &a))
}

fn perplexity_on<B: Backend>(l: &Loaded<B>, a: &PerplexityArgs) -> Result<()> {
    let text = read_text(&a.file)?;
    let tok = l.tok()?;
    let tokens = tok.encode(&text, true, false)?;
    let bos = if tok.adds_bos() { tok.bos() } else { None };
    let mut session = Session::new(&l.backend, &l.model, a.ctx, a.model.batch)?;
    if !a.json {
        eprintln!(
            "perplexity: {} tokens, {} chunks of {}",
            tokens.len(),
            tokens.len() / a.ctx.max(1),
            a.ctx
        );
    }
    let json = a.json;
    let r = perplexity(&mut session, &tokens, a.ctx, bos, |c, ppl| {
        if !json {
            print!("[{}]{:.4},", c + 1, ppl);
            let _ = std::io::stdout().flush();
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!();
        println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
    }
    Ok(())
}

fn read_text(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            p.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// llama-bench's method: random token ids; a `pp` test reads the prompt in batches of
/// `--batch` (logits for its last token); a `tg` test decodes `--parallel` sequences one token
/// each per step after `--depth` tokens already in their caches (a greedy token id per
/// sequence comes back each step, picked where the logits are, as in the server's greedy
/// steps); each repetition starts from an empty cache, after one untimed warm-up.
pub fn run_bench(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if a.parallel.contains(&0) {
        bail!("--parallel must be at least 1");
    }
    on_backend!(a.model, l => bench_on(&l, &a))
}

/// Tokens per second of `p` sequences decoding `n` tokens each from `depth` cached ones.
fn decode_rate<B: Backend>(
    l: &Loaded<B>,
    p: usize,
    depth: usize,
    n: usize,
    chunk: usize,
    random: &mut dyn FnMut(usize) -> Vec<u32>,
) -> Result<f64> {
    use kojo::backend::BatchLayout;
    use kojo::model::session::BLOCK_SIZE as BS;
    use kojo::model::transformer::Step;
    let per = (depth + n).div_ceil(BS).max(1);
    let mut kv = l.backend.alloc_kv(l.model.kv_shape(p * per, BS))?;
    let tables: Vec<Vec<u32>> = (0..p)
        .map(|s| ((s * per) as u32..((s + 1) * per) as u32).collect())
        .collect();
    let slot = |s: usize, pos: usize| tables[s][pos / BS] * BS as u32 + (pos % BS) as u32;
    // the cached context, untimed, one sequence and one chunk at a time
    for (s, table) in tables.iter().enumerate() {
        let toks = random(depth);
        for start in (0..depth).step_by(chunk.max(1)) {
            let end = (start + chunk).min(depth);
            let positions: Vec<u32> = (start as u32..end as u32).collect();
            let slots: Vec<u32> = (start..end).map(|pos| slot(s, pos)).collect();
            let step = Step {
                tokens: &toks[start..end],
                layout: BatchLayout {
                    positions: &positions,
                    seq_starts: &[0, end - start],
                    block_tables: &[table],
                    slots: &slots,
                },
                logit_rows: &[end - start - 1],
            };
            l.model.forward(&l.backend, &mut kv, &step)?;
        }
    }
    let refs: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
    let starts: Vec<usize> = (0..=p).collect();
    let rows: Vec<usize> = (0..p).collect();
    let t0 = std::time::Instant::now();
    for i in 0..n {
        let pos = depth + i;
        let toks = random(p);
        let positions = vec![pos as u32; p];
        let slots: Vec<u32> = (0..p).map(|s| slot(s, pos)).collect();
        let step = Step {
            tokens: &toks,
            layout: BatchLayout {
                positions: &positions,
                seq_starts: &starts,
                block_tables: &refs,
                slots: &slots,
            },
            logit_rows: &rows,
        };
        let logits = l.model.forward(&l.backend, &mut kv, &step)?;
        l.backend
            .pick_rows(&logits, &vec![kojo::sampling::Pick::GREEDY; p])?;
    }
    Ok((p * n) as f64 / t0.elapsed().as_secs_f64())
}

fn bench_on<B: Backend>(l: &Loaded<B>, a: &BenchArgs) -> Result<()> {
    let vocab = match &l.tok {
        Some(t) => t.vocab_size().min(l.model.cfg.vocab_size),
        None => l.model.cfg.vocab_size,
    } as u64;
    // (name, prompt tokens, generated tokens, parallel sequences)
    let mut tests: Vec<(String, usize, usize, usize)> = Vec::new();
    for &p in a.n_prompt.iter().filter(|&&p| p > 0) {
        tests.push((format!("pp{p}"), p, 0, 1));
    }
    for &n in a.n_gen.iter().filter(|&&n| n > 0) {
        for &par in &a.parallel {
            let mut name = format!("tg{n}");
            if par > 1 {
                name += &format!(" x{par}");
            }
            if a.depth > 0 {
                name += &format!(" @ d{}", a.depth);
            }
            tests.push((name, 0, n, par));
        }
    }
    let need = tests.iter().map(|t| t.1).max().unwrap_or(1);
    let mut session = Session::new(&l.backend, &l.model, need.max(1), a.model.batch)?;
    let mut rng = kojo::sampling::Rng::new(1234);
    let mut random =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };
    let threads = kojo::backend::cpu::pool::global().threads();
    let backend = match a.model.device.device {
        Target::Cpu => "CPU",
        Target::Cuda(_) => "CUDA",
    };
    let path = l.src.path();
    let size = match &l.src {
        ModelSource::Random(m, _) => m.weight_bytes(),
        _ => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    };
    let params = l.src.n_params();
    // the f16 K and V of one token over every layer
    let c = &l.model.cfg;
    let kv_bytes_per_token = c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut rows = Vec::new();
    if !a.json {
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    }
    for (test, p, n, par) in &tests {
        let mut run = || -> Result<f64> {
            if *n > 0 {
                return decode_rate(l, *par, a.depth, *n, a.model.batch, &mut random);
            }
            session.reset();
            let toks = random(*p);
            let t0 = std::time::Instant::now();
            session.feed(&toks, Logits::Last)?;
            Ok(*p as f64 / t0.elapsed().as_secs_f64())
        };
        run()?;
        let samples: Vec<f64> = (0..a.repetitions).map(|_| run()).collect::<Result<_>>()?;
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let sd = if samples.len() > 1 {
            (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (samples.len() - 1) as f64)
                .sqrt()
        } else {
            0.0
        };
        if a.json {
            rows.push(serde_json::json!({
                "model": name, "size_bytes": size, "params": params, "backend": backend,
                "threads": threads, "test": test, "n_prompt": p, "n_gen": n,
                "parallel": par, "depth": if *n > 0 { a.depth } else { 0 },
                "kv_bytes_per_token": kv_bytes_per_token,
                "avg_ts": mean, "stddev_ts": sd, "samples_ts": samples,
            }));
        } else {
            println!(
                "| {name} | {:.2} MiB | {:.2} M | {backend} | {threads} | {test} | {mean:.2} ± {sd:.2} |",
                size as f64 / (1024.0 * 1024.0),
                params as f64 / 1e6
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}
