//! `kojo gpu-check`: the GPU backend against the CPU backend on a real GPU. Part of
//! scripts/gpu-check.sh, which adds the benchmarks and the comparison with transformers.
//!
//! 1. Every kernel against the CPU backend's op (the same checks the CPU executor runs in CI),
//!    `|out - ref| / |ref|` per check against its tolerance.
//! 2. A random-weight model with SmolLM2-135M's shapes, written as a Hugging Face folder (so
//!    transformers can read the same weights) and loaded on both backends: logits of a random
//!    prompt, then greedy decoding (the GPU fed the CPU's tokens); the logits compared at
//!    every step, each greedy pick required equal unless the CPU's logits make it a near-tie.

use anyhow::{bail, Result};
use clap::Args;
use kojo::backend::cpu::{CpuBackend, MatmulMode};
use kojo::backend::gpu::selftest::SelfTest;
use kojo::backend::gpu::GpuBackend;
use kojo::backend::Target;
use kojo::model::random::{write_hf_folder, RandomModel, Rnd};
use kojo::model::session::{Logits, Session};
use kojo::model::{ModelSource, Transformer};
use std::path::PathBuf;

#[derive(Args)]
pub struct GpuCheckArgs {
    #[arg(long, default_value = "cuda")]
    pub device: Target,
    /// Kernel sources to use instead of the built-in ones.
    #[arg(long)]
    pub kernel_dir: Option<PathBuf>,
    /// Folder for the results (kernels.json, model.json) and the small model.
    #[arg(long, default_value = "gpu-check-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Prompt tokens, then greedy tokens, of the end-to-end check.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
}

pub fn run(a: GpuCheckArgs) -> Result<()> {
    let Target::Cuda(n) = a.device else {
        bail!("--device: the GPU check needs a cuda device");
    };
    std::fs::create_dir_all(&a.out)?;
    let gpu = GpuBackend::cuda(n, a.kernel_dir.as_deref())?;
    println!("device: {}", gpu.device().describe());

    // 1. kernels
    let mut st = SelfTest::new(&gpu, a.seed);
    st.all()?;
    println!("| check | rel. error (L2) | max error / max | tolerance | |");
    println!("|---|---:|---:|---:|---|");
    for c in &st.checks {
        println!(
            "| {} | {:.2e} | {:.2e} | {:.0e} | {} |",
            c.name,
            c.rel_l2,
            c.max_rel,
            c.tol,
            if c.ok() { "ok" } else { "FAIL" }
        );
    }
    let kernels: Vec<_> = st
        .checks
        .iter()
        .map(|c| serde_json::json!({"name": c.name, "rel_l2": c.rel_l2, "max_rel": c.max_rel, "tol": c.tol, "ok": c.ok()}))
        .collect();
    std::fs::write(
        a.out.join("kernels.json"),
        serde_json::to_string_pretty(&kernels)?,
    )?;
    let kernel_failures = st.failures().len();
    drop(st);

    // 2. the small random model on both backends
    let spec = format!("random:smollm2-135m:bf16:{}", a.seed);
    let m = RandomModel::parse(&spec)?;
    let dir = a.out.join("small-model");
    write_hf_folder(&m, &dir)?;
    let src = ModelSource::open(&dir)?;
    let cpu = CpuBackend::new(MatmulMode::Exact);
    let cm = Transformer::load(&cpu, &src)?;
    let gm = Transformer::load(&gpu, &src)?;
    let ctx = 2 * a.tokens + 1;
    let mut cs = Session::new(&cpu, &cm, ctx, 512)?;
    let mut gs = Session::new(&gpu, &gm, ctx, 512)?;
    let mut r = Rnd::new(a.seed);
    let vocab = m.cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..a.tokens).map(|_| (r.u64() % vocab) as u32).collect();
    let mut c = cs.feed(&prompt, Logits::Last)?;
    let mut g = gs.feed(&prompt, Logits::Last)?;
    let (first_gpu, first_cpu) = (g.clone(), c.clone());
    let (mut cpu_ids, mut gpu_ids, mut worst) = (Vec::new(), Vec::new(), 0f64);
    let mut cmp = SelfTest::new(&gpu, 0);
    // a different pick is a failure unless the CPU's logits make it a near-tie (the prompt's
    // bf16 GEMM rounds activations to 8 bits of mantissa)
    let mut wrong_picks = 0;
    for step in 0..a.tokens {
        cmp.compare(&format!("logits at step {step}"), &g, &c, 1e-2);
        worst = worst.max(cmp.checks.last().unwrap().rel_l2);
        let (ci, gi) = (kojo::sampling::argmax(&c), kojo::sampling::argmax(&g));
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        if gi != ci && c[gi as usize] < c[ci as usize] - 1e-3 * scale {
            wrong_picks += 1;
        }
        cpu_ids.push(ci);
        gpu_ids.push(gi);
        if step + 1 < a.tokens {
            c = cs.feed(&[ci], Logits::Last)?;
            // the GPU follows the CPU's tokens, so one different pick does not hide later steps
            g = gs.feed(&[ci], Logits::Last)?;
        }
    }
    let same = cpu_ids
        .iter()
        .zip(&gpu_ids)
        .take_while(|(a, b)| a == b)
        .count();
    println!();
    println!(
        "small model ({spec}): greedy tokens equal for {same} of {} (different, not near-ties: {wrong_picks}); logits rel. error (L2) at most {worst:.2e}",
        a.tokens
    );
    let v = serde_json::json!({
        "model": spec, "folder": dir, "prompt": prompt, "cpu_tokens": cpu_ids,
        "gpu_tokens": gpu_ids, "tokens_equal": same, "wrong_picks": wrong_picks,
        "worst_rel_l2": worst,
        "gpu_last_prompt_logits": first_gpu, "cpu_last_prompt_logits": first_cpu,
    });
    std::fs::write(a.out.join("model.json"), serde_json::to_string(&v)?)?;
    let logit_failures = cmp.failures().len();
    if kernel_failures > 0 || logit_failures > 0 || wrong_picks > 0 {
        bail!(
            "GPU check failed: {kernel_failures} kernel checks, {logit_failures} logit steps out of tolerance, {wrong_picks} greedy picks differ (not near-ties)"
        );
    }
    println!("GPU check passed");
    Ok(())
}
