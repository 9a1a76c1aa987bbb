//! The kernel lab (`kojo kernels bench`): each GPU op timed alone at the shapes of a real
//! model and set against its roofline, so that a kernel change is a prediction checked by a
//! measurement. Memory-bound ops are reported as a share of the copy bandwidth measured in the
//! same run; compute-bound ones (the matrix library's GEMM, prefill attention) as TFLOP/s and a
//! share of the GEMM's. Ops are timed through the backend, as a model step calls them
//! (output allocation included): a device synchronization, `reps` calls, a synchronization.
//!
//! [`Shapes::llama3_8b`] is the reference shape; [`Shapes::tiny`] runs the same code
//! on the CPU executor in tests (its times mean nothing).

use super::{GpuBackend, GpuTensor, GpuWeight};
use crate::backend::{
    AttnParams, Backend, BatchLayout, Glu, HostWeight, KvShape, QkvWeights, Rope, RopeLayout, Stack,
};
use crate::formats::GgmlType;
use crate::model::random::{random_matrix, Rnd};
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// The model shape the lab measures at.
#[derive(Debug, Clone)]
pub struct Shapes {
    pub name: &'static str,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    /// bytes of each copy-bandwidth buffer
    pub copy_bytes: usize,
    /// (batch, context) of each decode-attention measurement
    pub attention: Vec<(usize, usize)>,
    /// tokens of the prefill measurements (GEMM, prefill attention)
    pub prefill: usize,
    /// decode batch sizes of the matmul measurements
    pub batches: Vec<usize>,
    /// weight types measured
    pub types: Vec<GgmlType>,
    /// least time and calls per measurement
    pub min_time: Duration,
    pub min_reps: usize,
}

impl Shapes {
    /// Llama-3-8B: hidden 4096, FFN 14336, 32 query / 8 KV heads of 128.
    pub fn llama3_8b() -> Shapes {
        use GgmlType::*;
        Shapes {
            name: "llama3-8b",
            hidden: 4096,
            ffn: 14336,
            n_heads: 32,
            n_kv: 8,
            head_dim: 128,
            copy_bytes: 1 << 30,
            attention: vec![(1, 1024), (1, 8192), (1, 32768), (8, 4096), (64, 1024)],
            prefill: 2048,
            batches: vec![1, 8],
            types: vec![BF16, F16, Q8_0, Q6K, Q5K, Q4K, Q4_0],
            min_time: Duration::from_millis(200),
            min_reps: 10,
        }
    }

    /// Small enough for the CPU executor.
    pub fn tiny() -> Shapes {
        use GgmlType::*;
        Shapes {
            name: "tiny",
            hidden: 256,
            ffn: 512,
            n_heads: 4,
            n_kv: 2,
            head_dim: 64,
            copy_bytes: 1 << 16,
            attention: vec![(1, 100), (3, 40)],
            prefill: 20,
            batches: vec![1, 3],
            types: vec![BF16, Q4K],
            min_time: Duration::ZERO,
            min_reps: 1,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LabRow {
    pub op: String,
    pub shape: String,
    /// per call
    pub us: f64,
    /// bytes an ideal kernel moves per call (memory-bound ops), else 0
    pub bytes: f64,
    /// floating-point operations per call (compute-bound ops), else 0
    pub flops: f64,
    pub gb_s: f64,
    pub tflop_s: f64,
    /// share of the roofline: copy bandwidth (memory-bound) or the GEMM's rate (compute-bound)
    pub of_roofline: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LabReport {
    pub device: String,
    pub shapes: String,
    /// device-to-device copy, read + write bytes per second
    pub copy_gb_s: f64,
    /// the matrix library's bf16 GEMM at the prefill shape
    pub gemm_tflop_s: Option<f64>,
    pub rows: Vec<LabRow>,
}

impl LabReport {
    /// A Markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "Kernel lab on {} at {} shapes; copy {:.0} GB/s{}.\n\n",
            self.device,
            self.shapes,
            self.copy_gb_s,
            self.gemm_tflop_s
                .map_or(String::new(), |t| format!(", bf16 GEMM {t:.1} TFLOP/s"))
        );
        s += "| op | shape | µs/call | GB/s | TFLOP/s | of roofline |\n|---|---|---:|---:|---:|---:|\n";
        for r in &self.rows {
            let num = |v: f64, p: usize| {
                if v > 0.0 {
                    format!("{v:.p$}")
                } else {
                    "".into()
                }
            };
            s += &format!(
                "| {} | {} | {:.1} | {} | {} | {:.0}% |\n",
                r.op,
                r.shape,
                r.us,
                num(r.gb_s, 0),
                num(r.tflop_s, 1),
                100.0 * r.of_roofline
            );
        }
        s
    }
}

/// Seconds per call of `f`, after one warm-up call.
fn time(gpu: &GpuBackend, sh: &Shapes, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.dev.synchronize()?;
    gpu.check()?;
    let t0 = Instant::now();
    let mut reps = 0;
    while reps < sh.min_reps || t0.elapsed() < sh.min_time {
        f()?;
        reps += 1;
        if reps % 8 == 0 {
            // bound the queue (and the pool's outstanding allocations)
            gpu.dev.synchronize()?;
        }
    }
    gpu.dev.synchronize()?;
    gpu.check()?;
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

struct Lab<'a> {
    gpu: &'a GpuBackend,
    sh: Shapes,
    r: Rnd,
    report: LabReport,
}

impl Lab<'_> {
    fn push(&mut self, op: &str, shape: String, secs: f64, bytes: f64, flops: f64) {
        let gb_s = bytes / secs / 1e9;
        let tflop_s = flops / secs / 1e12;
        let of_roofline = if bytes > 0.0 {
            gb_s / self.report.copy_gb_s
        } else {
            self.report.gemm_tflop_s.map_or(0.0, |g| tflop_s / g)
        };
        self.report.rows.push(LabRow {
            op: op.into(),
            shape,
            us: secs * 1e6,
            bytes,
            flops,
            gb_s,
            tflop_s,
            of_roofline,
        });
    }

    fn activations(&mut self, rows: usize, cols: usize) -> GpuTensor {
        let v: Vec<f32> = (0..rows * cols).map(|_| self.r.f()).collect();
        self.gpu.upload(&v, rows, cols)
    }

    fn weights(&mut self, ty: GgmlType, parts: &[usize], cols: usize) -> Result<GpuWeight> {
        let seed = self.r.u64();
        let ws: Vec<HostWeight> = parts
            .iter()
            .enumerate()
            .map(|(i, &rows)| HostWeight {
                name: format!("lab {} {rows}x{cols}", ty.name()),
                ty,
                dims: vec![cols, rows],
                data: random_matrix(ty, rows, cols, 0.05, seed + i as u64).into(),
            })
            .collect();
        match &ws[..] {
            [one] => self.gpu.load_weight(one),
            _ => self
                .gpu
                .load_stacked(&ws)?
                .ok_or_else(|| anyhow::anyhow!("weights not stacked")),
        }
    }

    /// A norm weight of ones.
    fn ones(&self, n: usize) -> Result<GpuWeight> {
        let v: Vec<u8> = (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
        self.gpu.load_weight(&HostWeight {
            name: "lab norm".into(),
            ty: GgmlType::F32,
            dims: vec![n],
            data: v.into(),
        })
    }

    fn copy(&mut self) -> Result<()> {
        let n = self.sh.copy_bytes;
        let (a, b) = (self.gpu.try_alloc(n)?, self.gpu.try_alloc(n)?);
        // SAFETY: both buffers hold n bytes
        unsafe { self.gpu.dev.zero(a.ptr, n)? };
        let dev = self.gpu.dev.clone();
        // SAFETY: as above; distinct buffers
        let secs = time(self.gpu, &self.sh, || unsafe { dev.copy(b.ptr, a.ptr, n) })?;
        self.report.copy_gb_s = 2.0 * n as f64 / secs / 1e9;
        self.push(
            "copy",
            format!("{} MiB", n >> 20),
            secs,
            2.0 * n as f64,
            0.0,
        );
        Ok(())
    }

    fn gemm(&mut self) -> Result<()> {
        let (n, h) = (self.sh.prefill, self.sh.hidden);
        let w = self.weights(GgmlType::BF16, &[h], h)?;
        let x = self.activations(n, h);
        let gpu = self.gpu;
        let secs = time(gpu, &self.sh, || {
            gpu.matmul(&x, &w, None);
            Ok(())
        })?;
        let flops = 2.0 * (n * h * h) as f64;
        self.report.gemm_tflop_s = Some(flops / secs / 1e12);
        self.push(
            "matmul bf16 prefill",
            format!("{n} x {h} x {h}"),
            secs,
            0.0,
            flops,
        );
        Ok(())
    }

    /// Each weight type: the attention output projection (plain, and with the norm in its
    /// prologue), the FFN down projection and the fused gate/up at each decode batch.
    fn matmuls(&mut self) -> Result<()> {
        let (h, f) = (self.sh.hidden, self.sh.ffn);
        for ty in self.sh.types.clone() {
            let tn = super::kernel_type(ty).unwrap();
            let row = |cols: usize| cols / ty.block_size().unwrap_or(1) * ty.type_size().unwrap();
            let wo = self.weights(ty, &[h], h)?;
            let down = self.weights(ty, &[h], f)?;
            let gate_up = Stack::One(self.weights(ty, &[f, f], h)?);
            let norm = self.ones(h)?;
            for n in self.sh.batches.clone() {
                let xh = self.activations(n, h);
                let xf = self.activations(n, f);
                let gpu = self.gpu;
                for (w, x, name) in [(&wo, &xh, "matmul"), (&down, &xf, "matmul")] {
                    let secs = time(gpu, &self.sh, || {
                        gpu.matmul(x, w, None);
                        Ok(())
                    })?;
                    let bytes = (w.rows * w.row_bytes + 4 * n * (w.rows + w.cols)) as f64;
                    let shape = format!("n={n}, {} x {}", w.rows, w.cols);
                    self.push(&format!("{name} {tn}"), shape, secs, bytes, 0.0);
                }
                // the same projection with the RMSNorm in its prologue (the residual stream in)
                let secs = time(gpu, &self.sh, || {
                    gpu.matmul_normed(&xh, &norm, 1e-5, &wo);
                    Ok(())
                })?;
                let bytes = (wo.rows * wo.row_bytes + 4 * n * (wo.rows + wo.cols)) as f64;
                let shape = format!("n={n}, {} x {}", wo.rows, wo.cols);
                self.push(&format!("matmul_normed {tn}"), shape, secs, bytes, 0.0);
                let secs = time(gpu, &self.sh, || {
                    gpu.ffn_glu(&xh, &norm, 1e-5, &gate_up, Glu::Silu).map(drop)
                })?;
                let bytes = (2 * f * row(h) + 4 * n * (h + f)) as f64;
                let shape = format!("n={n}, 2 x {f} x {h}");
                self.push(&format!("ffn_glu {tn}"), shape, secs, bytes, 0.0);
            }
        }
        Ok(())
    }

    /// Decode attention (split + reduce) at each (batch, context), and the prefill kernel on
    /// one causal prompt; the fused attention input at decode.
    fn attention(&mut self) -> Result<()> {
        let sh = self.sh.clone();
        let (hd, bs) = (sh.head_dim, 16);
        let p = AttnParams {
            n_heads: sh.n_heads,
            n_kv_heads: sh.n_kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: None,
        };
        let kv_cols = sh.n_kv * hd;
        let mut cases: Vec<(usize, usize, bool)> =
            sh.attention.iter().map(|&(b, c)| (b, c, false)).collect();
        cases.push((1, sh.prefill, true));
        for (batch, ctx, prefill) in cases {
            let blocks_per = ctx.div_ceil(bs);
            let shape = KvShape {
                n_layers: 1,
                num_blocks: batch * blocks_per,
                block_size: bs,
                n_kv_heads: sh.n_kv,
                head_dim: hd,
            };
            let cache = self.gpu.alloc_kv(shape)?;
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|s| ((s * blocks_per) as u32..((s + 1) * blocks_per) as u32).collect())
                .collect();
            let trefs: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
            let (positions, starts, slots): (Vec<u32>, Vec<usize>, Vec<u32>) = if prefill {
                let pos: Vec<u32> = (0..ctx as u32).collect();
                (pos.clone(), vec![0, ctx], pos)
            } else {
                let pos = vec![ctx as u32 - 1; batch];
                let slots = (0..batch)
                    .map(|s| tables[s][(ctx - 1) / bs] * bs as u32 + ((ctx - 1) % bs) as u32)
                    .collect();
                (pos, (0..=batch).collect(), slots)
            };
            let lay = BatchLayout {
                positions: &positions,
                seq_starts: &starts,
                block_tables: &trefs,
                slots: &slots,
            };
            let q = self.activations(positions.len(), sh.n_heads * hd);
            let gpu = self.gpu;
            let secs = time(gpu, &sh, || {
                gpu.attention(&cache, 0, &q, &lay, &p).map(drop)
            })?;
            if prefill {
                // q.k and p.v over the causal half
                let flops = 4.0 * (sh.n_heads * hd) as f64 * (ctx * (ctx + 1) / 2) as f64;
                self.push(
                    "attention prefill",
                    format!("{ctx} tokens"),
                    secs,
                    0.0,
                    flops,
                );
            } else {
                let bytes = (batch * ctx * kv_cols * 2 * 2) as f64;
                let shape = format!("batch {batch}, context {ctx}");
                self.push("attention decode", shape, secs, bytes, 0.0);
            }
        }
        // the fused attention input of a decode batch: bf16 QKV projection + qkv_post
        let n = *sh.batches.last().unwrap_or(&1);
        let shape = KvShape {
            n_layers: 1,
            num_blocks: n,
            block_size: bs,
            n_kv_heads: sh.n_kv,
            head_dim: hd,
        };
        let mut cache = self.gpu.alloc_kv(shape)?;
        let tables: Vec<Vec<u32>> = (0..n as u32).map(|s| vec![s]).collect();
        let trefs: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
        let positions = vec![5u32; n];
        let starts: Vec<usize> = (0..=n).collect();
        let slots: Vec<u32> = (0..n as u32).map(|s| s * bs as u32 + 5).collect();
        let lay = BatchLayout {
            positions: &positions,
            seq_starts: &starts,
            block_tables: &trefs,
            slots: &slots,
        };
        let (q_dim, h) = (sh.n_heads * hd, sh.hidden);
        let w = QkvWeights {
            w: Stack::One(self.weights(GgmlType::BF16, &[q_dim, kv_cols, kv_cols], h)?),
            bias: None,
            qk_norm: None,
        };
        let x = self.activations(n, h);
        let norm = self.ones(h)?;
        let rope = Rope {
            layout: RopeLayout::Halves,
            n_rot: hd,
            base: 500_000.0,
            freq_scale: 1.0,
        };
        let gpu = self.gpu;
        let secs = time(gpu, &sh, || {
            gpu.attention_input(&x, &norm, &w, 1e-5, &mut cache, 0, &lay, hd, &rope, None)
                .map(drop)
        })?;
        let bytes = ((q_dim + 2 * kv_cols) * h * 2) as f64;
        let shape = format!("n={n}, {} x {h}", q_dim + 2 * kv_cols);
        self.push("attention_input bf16", shape, secs, bytes, 0.0);
        Ok(())
    }

    /// The small row ops of a decode step: their time is mostly launch latency.
    fn row_ops(&mut self) -> Result<()> {
        let h = self.sh.hidden;
        let n = *self.sh.batches.last().unwrap_or(&1);
        let w = self.ones(h)?;
        let x = self.activations(n, h);
        let mut r = self.activations(n, h);
        let gpu = self.gpu;
        let secs = time(gpu, &self.sh, || {
            gpu.add_rms_norm(&mut r, &x, &w, 1e-5);
            Ok(())
        })?;
        let bytes = (n * h * 4 * 4) as f64;
        self.push("add_rms_norm", format!("n={n}, {h}"), secs, bytes, 0.0);
        Ok(())
    }
}

/// Every measurement at `shapes` on `gpu`'s device.
pub fn run(gpu: &GpuBackend, shapes: Shapes, seed: u64) -> Result<LabReport> {
    if shapes
        .types
        .iter()
        .any(|t| super::kernel_type(*t).is_none())
    {
        bail!("the lab measures only types the kernels take");
    }
    let mut lab = Lab {
        gpu,
        report: LabReport {
            device: gpu.dev.describe(),
            shapes: shapes.name.into(),
            copy_gb_s: 0.0,
            gemm_tflop_s: None,
            rows: Vec::new(),
        },
        sh: shapes,
        r: Rnd::new(seed),
    };
    lab.copy()?;
    lab.gemm()?;
    lab.matmuls()?;
    lab.attention()?;
    lab.row_ops()?;
    Ok(lab.report)
}
