//! `kojo kernels`: the CUDA kernels' compilation, by hand.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kojo::backend::gpu::kernels::{self, Sources};
use kojo::backend::gpu::{lab, GpuBackend};
use kojo::backend::Target;
use std::path::PathBuf;

#[derive(Args)]
pub struct KernelsArgs {
    #[command(subcommand)]
    cmd: KernelsCmd,
}

#[derive(Subcommand)]
enum KernelsCmd {
    /// Compile every kernel with NVRTC for each architecture and print registers, shared
    /// memory, stack and spills per kernel; fails on a compile error or a register spill.
    Check {
        /// Comma-separated GPU architectures.
        #[arg(long, default_value = "sm_80,sm_90")]
        arch: String,
        /// Kernel sources to use instead of the ones built in (a folder of .cu/.cuh).
        #[arg(long)]
        kernel_dir: Option<PathBuf>,
    },
    /// The kernel lab: time each GPU op alone at a model's shapes (weights of several types,
    /// decode and prefill attention, the fused projections) and print it against its roofline
    /// (the copy bandwidth and the bf16 GEMM rate measured in the same run).
    Bench {
        /// `cuda[:N]`.
        #[arg(long, default_value = "cuda")]
        device: Target,
        /// Compile the kernels from this folder instead of the built-in ones.
        #[arg(long)]
        kernel_dir: Option<PathBuf>,
        /// The shapes: `llama3-8b`, or `tiny` (a quick look).
        #[arg(long, default_value = "llama3-8b")]
        shapes: String,
        /// Also write the measurements here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub fn run(a: KernelsArgs) -> Result<()> {
    match a.cmd {
        KernelsCmd::Check { arch, kernel_dir } => check(&arch, kernel_dir),
        KernelsCmd::Bench {
            device,
            kernel_dir,
            shapes,
            json,
        } => bench(device, kernel_dir, &shapes, json),
    }
}

fn bench(
    device: Target,
    kernel_dir: Option<PathBuf>,
    shapes: &str,
    json: Option<PathBuf>,
) -> Result<()> {
    let shapes = match shapes {
        "llama3-8b" => lab::Shapes::llama3_8b(),
        "tiny" => lab::Shapes::tiny(),
        other => bail!("--shapes: '{other}' is not one of: llama3-8b, tiny"),
    };
    let Target::Cuda(n) = device else {
        bail!("the kernel lab measures a GPU: --device cuda[:N]");
    };
    kojo::backend::gpu::cuda::probe()?;
    let gpu = GpuBackend::cuda(n, kernel_dir.as_deref())?;
    let report = lab::run(&gpu, shapes, 0x6b6f6a6f)?;
    print!("{}", report.table());
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn check(archs: &str, dir: Option<PathBuf>) -> Result<()> {
    let src = match &dir {
        Some(d) => Sources::from_dir(d)?,
        None => Sources::embedded(),
    };
    let (major, minor) = kernels::nvrtc_version()?;
    let include = kernels::include_dir()?;
    println!("NVRTC {major}.{minor}, headers from {}", include.display());
    println!(
        "{:<8} {:<16} {:<24} {:>5} {:>7} {:>6} {:>7}",
        "arch", "unit", "kernel", "regs", "smem", "stack", "spills"
    );
    let mut spilled = Vec::new();
    let mut count = 0;
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        if !arch.starts_with("sm_") || arch[3..].parse::<u32>().is_err() {
            bail!("--arch: '{arch}' is not an architecture like sm_90");
        }
        for (unit, _) in src.units() {
            let c = kernels::compile(&src, unit, arch, &include)?;
            let stats = kernels::parse_ptxas_log(&c.log);
            if stats.is_empty() {
                bail!(
                    "{unit} for {arch}: NVRTC's log has no ptxas report:\n{}",
                    c.log
                );
            }
            for s in stats {
                let spills = s.spill_stores + s.spill_loads;
                println!(
                    "{arch:<8} {unit:<16} {:<24} {:>5} {:>7} {:>6} {:>7}",
                    s.name, s.registers, s.shared_bytes, s.stack_bytes, spills
                );
                if spills > 0 {
                    spilled.push(format!("{} ({arch})", s.name));
                }
                count += 1;
            }
        }
    }
    if !spilled.is_empty() {
        bail!("register spills in {}", spilled.join(", "));
    }
    println!("{count} kernels compiled, no spills");
    Ok(())
}
