//! The GPU backend's kernels against the CPU backend's ops, op by op, on whatever device the
//! backend has: the real GPU (`kojo gpu-check`) or the CPU fiber executor (tests/gpu_kernels.rs).
//! Inputs are random (from a seed); every comparison becomes a [`Check`] with the relative
//! error `|out - ref| / |ref|` (L2) and the largest element error over the largest reference
//! magnitude, against a tolerance per op.

use super::{GpuBackend, GpuTensor, GpuWeight};
use crate::backend::cpu::{CpuBackend, CpuTensor, CpuWeight, MatmulMode};
use crate::backend::{
    AttnParams, Backend, BatchLayout, Glu, HostWeight, KvShape, QkvWeights, Rope, RopeLayout, Stack,
};
use crate::formats::GgmlType;
use crate::model::random::{random_tensor, Rnd};
use anyhow::Result;

/// One comparison.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    /// `|gpu - cpu|_2 / |cpu|_2` (0 for exact checks that passed)
    pub rel_l2: f64,
    /// `max |gpu - cpu| / max |cpu|` (infinite for a NaN, a wrong id or a missing error)
    pub max_rel: f64,
    pub tol: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.max_rel <= self.tol
    }
}

pub struct SelfTest<'a> {
    cpu: CpuBackend,
    gpu: &'a GpuBackend,
    r: Rnd,
    pub checks: Vec<Check>,
}

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn ropes() -> [Rope; 2] {
    [
        Rope {
            layout: RopeLayout::Interleaved,
            n_rot: 64,
            base: 10_000.0,
            freq_scale: 1.0,
        },
        Rope {
            layout: RopeLayout::Halves,
            n_rot: 32,
            base: 1_000_000.0,
            freq_scale: 0.5,
        },
    ]
}

impl<'a> SelfTest<'a> {
    pub fn new(gpu: &'a GpuBackend, seed: u64) -> Self {
        SelfTest {
            cpu: CpuBackend::new(MatmulMode::Exact),
            gpu,
            r: Rnd::new(seed),
            checks: Vec::new(),
        }
    }

    /// Every op: several weight types, shapes and batch layouts.
    pub fn all(&mut self) -> Result<()> {
        self.matmul()?;
        self.ffn_glu()?;
        self.attention_input(4, 2, 64, true, false, 0)?;
        self.attention_input(8, 8, 32, false, true, 1)?;
        self.embed()?;
        self.rows()?;
        self.rope()?;
        self.attention(6, 2, 64, None)?;
        self.attention(10, 1, 32, Some(20))?;
        self.attention(32, 8, 128, None)?;
        self.attention(20, 1, 256, Some(40))?;
        self.sampling()
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok()).collect()
    }

    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.r.f() * amp).collect()
    }

    fn both(&self, data: &[f32], rows: usize, cols: usize) -> (CpuTensor, GpuTensor) {
        (
            self.cpu.upload(data, rows, cols),
            self.gpu.upload(data, rows, cols),
        )
    }

    fn weight(
        &self,
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<(CpuWeight, GpuWeight)> {
        let dims = if rows == 1 {
            vec![cols]
        } else {
            vec![cols, rows]
        };
        let w = HostWeight {
            name: name.into(),
            ty,
            dims,
            data: data.into(),
        };
        Ok((self.cpu.load_weight(&w)?, self.gpu.load_weight(&w)?))
    }

    fn vector(
        &mut self,
        name: &str,
        n: usize,
        around: f32,
        amp: f32,
    ) -> Result<(CpuWeight, GpuWeight)> {
        let v: Vec<u8> = (0..n)
            .flat_map(|_| (around + amp * self.r.f()).to_le_bytes())
            .collect();
        self.weight(name, GgmlType::F32, 1, n, v)
    }

    /// Record the comparison of the two tensors.
    fn close(&mut self, what: &str, c: &CpuTensor, g: &GpuTensor, tol: f64) -> Result<()> {
        let want = self.cpu.download(c)?;
        let got = self.gpu.download(g)?;
        self.compare(what, &got, &want, tol);
        Ok(())
    }

    /// Record `got` against `want`.
    pub fn compare(&mut self, what: &str, got: &[f32], want: &[f32], tol: f64) {
        let (mut d2, mut w2, mut dmax, mut wmax) = (0f64, 0f64, 0f64, 1e-6f64);
        for (&g, &w) in got.iter().zip(want) {
            let d = if g.is_finite() {
                (g as f64 - w as f64).abs()
            } else {
                f64::INFINITY
            };
            d2 += d * d;
            w2 += (w as f64) * (w as f64);
            dmax = dmax.max(d);
            wmax = wmax.max((w as f64).abs());
        }
        if got.len() != want.len() {
            dmax = f64::INFINITY;
        }
        self.checks.push(Check {
            name: what.to_string(),
            rel_l2: if w2 > 0.0 {
                (d2 / w2).sqrt()
            } else {
                d2.sqrt()
            },
            max_rel: dmax / wmax,
            tol,
        });
    }

    /// Record a yes/no check.
    fn expect(&mut self, what: &str, ok: bool) {
        let e = if ok { 0.0 } else { f64::INFINITY };
        self.checks.push(Check {
            name: what.to_string(),
            rel_l2: e,
            max_rel: e,
            tol: 0.0,
        });
    }

    /// `(cpu, gpu)` weights of `parts` (rows each) of one type and width: one by one on the
    /// CPU, stacked on the GPU.
    fn stacked(
        &mut self,
        ty: GgmlType,
        parts: &[usize],
        cols: usize,
    ) -> Result<(Vec<CpuWeight>, Stack<GpuWeight>)> {
        let ws: Vec<HostWeight> = parts
            .iter()
            .map(|&rows| {
                let data = random_tensor(&mut self.r, ty, rows * cols, 0.2);
                HostWeight {
                    name: format!("part of {rows}"),
                    ty,
                    dims: if rows == 1 {
                        vec![cols]
                    } else {
                        vec![cols, rows]
                    },
                    data: data.into(),
                }
            })
            .collect();
        let cpu = ws
            .iter()
            .map(|w| self.cpu.load_weight(w))
            .collect::<Result<_>>()?;
        let gpu = self
            .gpu
            .load_stacked(&ws)?
            .ok_or_else(|| anyhow::anyhow!("the GPU did not stack {}", ty.name()))?;
        Ok((cpu, Stack::One(gpu)))
    }

    /// Gate and up stacked in one weight, the activation fused (matmul_glu_*, or the matrix
    /// library and a strided glu).
    pub fn ffn_glu(&mut self) -> Result<()> {
        let (k, m) = (256, 21);
        for (i, ty) in TYPES.into_iter().enumerate() {
            let (cw, gw) = self.stacked(ty, &[m, m], k)?;
            let cw = Stack::Parts(cw);
            let (cn, gn) = self.vector("ffn_norm", k, 1.0, 0.3)?;
            let act = [Glu::Silu, Glu::GeluTanh][i % 2];
            for n in [1, 5, super::GEMM_MIN_TOKENS + 3] {
                let x = self.vec(n * k, 3.0);
                let (cx, gx) = self.both(&x, n, k);
                let c = self.cpu.ffn_glu(&cx, &cn, 1e-5, &cw, act)?;
                let g = self.gpu.ffn_glu(&gx, &gn, 1e-5, &gw, act)?;
                let tol = match ty {
                    GgmlType::BF16 if n >= super::GEMM_MIN_TOKENS => 2e-2,
                    GgmlType::F16 if n >= super::GEMM_MIN_TOKENS => 4e-3,
                    // (the norm's scale applied after the dot product, not before)
                    _ => 1e-4,
                };
                self.close(&format!("ffn_glu {} {act:?} n={n}", ty.name()), &c, &g, tol)?;
            }
        }
        Ok(())
    }

    pub fn matmul(&mut self) -> Result<()> {
        let m = 37;
        // 768 columns: a lane's last pass takes one chunk instead of two
        for (i, (ty, k)) in TYPES
            .into_iter()
            .flat_map(|t| [(t, 512), (t, 768)])
            .enumerate()
        {
            let data = random_tensor(&mut self.r, ty, m * k, 0.2);
            let (cw, gw) = self.weight("w", ty, m, k, data)?;
            let bias = if i % 2 == 0 {
                Some(self.vector("b", m, 0.0, 1.0)?)
            } else {
                None
            };
            // 21 tokens: bf16/f16 weights go to the matrix library with activations rounded
            // to the weights' type (8 and 11 bits of mantissa)
            for n in [1, 6, super::GEMM_MIN_TOKENS + 5] {
                let x = self.vec(n * k, 1.0);
                let (cx, gx) = self.both(&x, n, k);
                let c = self.cpu.matmul(&cx, &cw, bias.as_ref().map(|b| &b.0));
                let g = self.gpu.matmul(&gx, &gw, bias.as_ref().map(|b| &b.1));
                let tol = match ty {
                    GgmlType::BF16 if n >= super::GEMM_MIN_TOKENS => 1e-2,
                    GgmlType::F16 if n >= super::GEMM_MIN_TOKENS => 2e-3,
                    _ => 2e-5,
                };
                self.close(&format!("matmul {} n={n}", ty.name()), &c, &g, tol)?;
                // the norm fused before it (on the residual stream), and the sum fused after
                let (cn, gn) = self.vector("norm", k, 1.0, 0.3)?;
                let c = self.cpu.matmul_normed(&cx, &cn, 1e-5, &cw);
                let g = self.gpu.matmul_normed(&gx, &gn, 1e-5, &gw);
                let tol_n = if tol > 2e-5 { tol } else { 1e-4 };
                self.close(&format!("matmul_normed {} n={n}", ty.name()), &c, &g, tol_n)?;
                let r = self.vec(n * m, 2.0);
                let (mut cr, mut gr) = self.both(&r, n, m);
                self.cpu.matmul_add(&mut cr, &cx, &cw);
                self.gpu.matmul_add(&mut gr, &gx, &gw);
                self.close(&format!("matmul_add {} n={n}", ty.name()), &cr, &gr, tol)?;
            }
        }
        Ok(())
    }

    pub fn embed(&mut self) -> Result<()> {
        let (rows, cols) = (40, 256);
        for ty in TYPES {
            let data = random_tensor(&mut self.r, ty, rows * cols, 1.0);
            let (cw, gw) = self.weight("emb", ty, rows, cols, data)?;
            for scale in [1.0, 2.5] {
                let ids = [0, 39, 7, 7, 21];
                let c = self.cpu.embed(&cw, &ids, scale)?;
                let g = self.gpu.embed(&gw, &ids, scale)?;
                self.close(&format!("embed {}", ty.name()), &c, &g, 1e-6)?;
            }
            self.expect(
                "embed rejects a token id past the table",
                self.gpu.embed(&gw, &[40], 1.0).is_err(),
            );
        }
        Ok(())
    }

    pub fn rows(&mut self) -> Result<()> {
        let (rows, cols) = (5, 96);
        for seg in [96, 32] {
            let (cw, gw) = self.vector("norm", seg, 1.0, 0.3)?;
            let x = self.vec(rows * cols, 3.0);
            let (cx, gx) = self.both(&x, rows, cols);
            let c = self.cpu.rms_norm(&cx, &cw, 1e-6);
            let g = self.gpu.rms_norm(&gx, &gw, 1e-6);
            self.close(&format!("rms_norm seg {seg}"), &c, &g, 1e-5)?;

            let r = self.vec(rows * cols, 2.0);
            let (mut cr, mut gr) = self.both(&r, rows, cols);
            let c = self.cpu.add_rms_norm(&mut cr, &cx, &cw, 1e-5);
            let g = self.gpu.add_rms_norm(&mut gr, &gx, &gw, 1e-5);
            self.close("add_rms_norm", &c, &g, 1e-5)?;
            self.close("add_rms_norm residual", &cr, &gr, 1e-6)?;
        }
        let (a, b) = (self.vec(rows * cols, 1.0), self.vec(rows * cols, 1.0));
        let (mut ca, mut ga) = self.both(&a, rows, cols);
        let (cb, gb) = self.both(&b, rows, cols);
        self.cpu.add(&mut ca, &cb);
        self.gpu.add(&mut ga, &gb);
        self.close("add", &ca, &ga, 0.0)?;
        self.cpu.scale(&mut ca, -1.75);
        self.gpu.scale(&mut ga, -1.75);
        self.close("scale", &ca, &ga, 0.0)?;
        let pick = [4, 0, 4, 2];
        self.close(
            "gather_rows",
            &self.cpu.gather_rows(&ca, &pick),
            &self.gpu.gather_rows(&ga, &pick),
            0.0,
        )?;
        let (gate, up) = (self.vec(3 * 100, 6.0), self.vec(3 * 100, 2.0));
        let (cg, gg) = self.both(&gate, 3, 100);
        let (cu, gu) = self.both(&up, 3, 100);
        for act in [Glu::Silu, Glu::GeluTanh] {
            let c = self.cpu.glu(&cg, &cu, act);
            let g = self.gpu.glu(&gg, &gu, act);
            self.close(&format!("glu {act:?}"), &c, &g, 1e-5)?;
        }
        Ok(())
    }

    pub fn rope(&mut self) -> Result<()> {
        let positions = [0, 7, 300, 4095];
        let hd = 64;
        let factors: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 0.5).collect();
        for (rope, fac) in ropes().iter().zip([None, Some(&factors[..])]) {
            let x = self.vec(4 * 3 * hd, 2.0);
            let (mut c, mut g) = self.both(&x, 4, 3 * hd);
            self.cpu.rope(&mut c, &positions, hd, rope, fac);
            self.gpu.rope(&mut g, &positions, hd, rope, fac);
            self.close(&format!("rope {:?}", rope.layout), &c, &g, 1e-5)?;
        }
        Ok(())
    }

    /// A ragged batch over a paged cache: a decode token past the first split, a prefill from 0,
    /// and a chunk continuing a sequence; K/V of the earlier positions written first (unfused),
    /// the batch's own with RoPE fused into the write.
    pub fn attention(
        &mut self,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        window: Option<usize>,
    ) -> Result<()> {
        let bs = 16;
        let shape = KvShape {
            n_layers: 2,
            num_blocks: 64,
            block_size: bs,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let mut ck = self.cpu.alloc_kv(shape)?;
        let mut gk = self.gpu.alloc_kv(shape)?;
        // block ids: a shuffled pool shared out to the sequences
        let mut ids: Vec<u32> = (0..64).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, self.r.u64() as usize % (i + 1));
        }
        // (tokens before, tokens now) per sequence
        let seqs = [(290usize, 1usize), (0, 19), (40, 5)];
        let mut tables = Vec::new();
        let mut next = 0;
        for &(before, now) in &seqs {
            let need = (before + now).div_ceil(bs);
            tables.push(ids[next..next + need].to_vec());
            next += need;
        }
        let kvw = n_kv * hd;
        let layer = 1;
        let rope = ropes()[1];
        for phase in 0..2 {
            let (mut positions, mut starts, mut slots) = (Vec::new(), vec![0], Vec::new());
            for (s, &(before, now)) in seqs.iter().enumerate() {
                let range = if phase == 0 {
                    0..before
                } else {
                    before..before + now
                };
                for p in range {
                    positions.push(p as u32);
                    slots.push(tables[s][p / bs] * bs as u32 + (p % bs) as u32);
                }
                starts.push(positions.len());
            }
            let tref: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
            let lay = BatchLayout {
                positions: &positions,
                seq_starts: &starts,
                block_tables: &tref,
                slots: &slots,
            };
            let n = positions.len();
            let (k, v) = (self.vec(n * kvw, 2.0), self.vec(n * kvw, 2.0));
            let (mut c_k, mut g_k) = self.both(&k, n, kvw);
            let (c_v, g_v) = self.both(&v, n, kvw);
            if phase == 0 {
                self.cpu.write_kv(&mut ck, layer, &c_k, &c_v, &lay)?;
                self.gpu.write_kv(&mut gk, layer, &g_k, &g_v, &lay)?;
                continue;
            }
            self.cpu
                .rope_write_kv(&mut ck, layer, &mut c_k, &c_v, &lay, hd, &rope, None)?;
            self.gpu
                .rope_write_kv(&mut gk, layer, &mut g_k, &g_v, &lay, hd, &rope, None)?;
            let q = self.vec(n * n_heads * hd, 2.0);
            let (cq, gq) = self.both(&q, n, n_heads * hd);
            let p = AttnParams {
                n_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
            };
            let c = self.cpu.attention(&ck, layer, &cq, &lay, &p)?;
            let g = self.gpu.attention(&gk, layer, &gq, &lay, &p)?;
            self.close(
                &format!("attention {n_heads}/{n_kv} heads x {hd}, window {window:?}"),
                &c,
                &g,
                2e-5,
            )?;
            // a position past its block table is an error, not a read out of bounds
            let short: Vec<&[u32]> = tables.iter().map(|t| &t[..1]).collect();
            let bad = BatchLayout {
                block_tables: &short,
                ..lay
            };
            self.expect(
                "attention rejects a position past its block table",
                self.gpu.attention(&gk, layer, &gq, &bad, &p).is_err(),
            );
        }
        Ok(())
    }

    /// Q, K and V stacked in one weight (with stacked biases, or head norms), one projection,
    /// then qkv_post: the rotated q and the cache (read back through attention) against the
    /// CPU's separate ops. A prefill of 20 tokens with a decode token (the matrix library for
    /// bf16), then the decode token alone.
    pub fn attention_input(
        &mut self,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        bias: bool,
        qk_norm: bool,
        rope: usize,
    ) -> Result<()> {
        let hidden = 256;
        let (bs, layer, eps) = (16, 1, 1e-5);
        let shape = KvShape {
            n_layers: 2,
            num_blocks: 8,
            block_size: bs,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let rope = ropes()[rope];
        let factors: Vec<f32> = (0..rope.n_rot / 2).map(|i| 1.0 + i as f32 / 8.0).collect();
        let (q_dim, kv_dim) = (n_heads * hd, n_kv * hd);
        let p = AttnParams {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: None,
        };
        for ty in [GgmlType::Q8_0, GgmlType::BF16, GgmlType::Q4K] {
            let (cw, gw) = self.stacked(ty, &[q_dim, kv_dim, kv_dim], hidden)?;
            let (cb, gb) = if bias {
                let mut cpu = Vec::new();
                let mut host = Vec::new();
                for n in [q_dim, kv_dim, kv_dim] {
                    let v: Vec<u8> = (0..n).flat_map(|_| self.r.f().to_le_bytes()).collect();
                    let w = HostWeight {
                        name: "bias".into(),
                        ty: GgmlType::F32,
                        dims: vec![n],
                        data: v.into(),
                    };
                    cpu.push(self.cpu.load_weight(&w)?);
                    host.push(w);
                }
                let g = self.gpu.load_stacked(&host)?.expect("vectors stack");
                (Some(Stack::Parts(cpu)), Some(Stack::One(g)))
            } else {
                (None, None)
            };
            let (cn, gn) = if qk_norm {
                let (cq, gq) = self.vector("q_norm", hd, 1.0, 0.3)?;
                let (ck, gk) = self.vector("k_norm", hd, 1.0, 0.3)?;
                (Some([cq, ck]), Some([gq, gk]))
            } else {
                (None, None)
            };
            let cw = QkvWeights {
                w: Stack::Parts(cw),
                bias: cb,
                qk_norm: cn,
            };
            let gw = QkvWeights {
                w: gw,
                bias: gb,
                qk_norm: gn,
            };
            let (cnorm, gnorm) = self.vector("attn_norm", hidden, 1.0, 0.3)?;
            let mut ck = self.cpu.alloc_kv(shape)?;
            let mut gk = self.gpu.alloc_kv(shape)?;
            // sequence 0: 20 tokens from position 0 (blocks 3, 0); sequence 1: one token at
            // position 4 (block 5), its earlier positions written by the first round
            let tables: [&[u32]; 2] = [&[3, 0], &[5]];
            for round in 0..2 {
                let (positions, starts, slots): (Vec<u32>, Vec<usize>, Vec<u32>) = if round == 0 {
                    let mut pos: Vec<u32> = (0..20).collect();
                    pos.extend(0..5);
                    let slots = (0..20)
                        .map(|p| tables[0][p / bs] * bs as u32 + (p % bs) as u32)
                        .chain((0..5).map(|p| 5 * bs as u32 + p))
                        .collect();
                    (pos, vec![0, 20, 25], slots)
                } else {
                    (vec![5], vec![0, 0, 1], vec![5 * bs as u32 + 5])
                };
                let lay = BatchLayout {
                    positions: &positions,
                    seq_starts: &starts,
                    block_tables: &tables,
                    slots: &slots,
                };
                let n = positions.len();
                let x = self.vec(n * hidden, 3.0);
                let (cx, gx) = self.both(&x, n, hidden);
                let args = (eps, layer, hd, &rope, Some(&factors[..]));
                let cq = self.cpu.attention_input(
                    &cx, &cnorm, &cw, args.0, &mut ck, args.1, &lay, args.2, args.3, args.4,
                )?;
                let gq = self.gpu.attention_input(
                    &gx, &gnorm, &gw, args.0, &mut gk, args.1, &lay, args.2, args.3, args.4,
                )?;
                let what = format!(
                    "attention_input {} {n_heads}/{n_kv} heads x {hd}, bias {bias}, head norms {qk_norm}, {n} tokens",
                    ty.name()
                );
                let tol = if ty == GgmlType::BF16 && n >= super::GEMM_MIN_TOKENS {
                    2e-2
                } else {
                    1e-4
                };
                self.close(&format!("{what}: q"), &cq, &gq, tol)?;
                // the cache as attention reads it, with the same (CPU) queries on both sides
                let qv = self.cpu.download(&cq)?;
                let (cq, gq) = self.both(&qv, n, q_dim);
                let c = self.cpu.attention(&ck, layer, &cq, &lay, &p)?;
                let g = self.gpu.attention(&gk, layer, &gq, &lay, &p)?;
                // (K and V are f16 in the cache: an f32 difference of one rounding step can
                // move a stored value by one f16 step, 1e-3 of it)
                self.close(&format!("{what}: cached K/V"), &c, &g, tol.max(1e-2))?;
            }
        }
        Ok(())
    }

    pub fn sampling(&mut self) -> Result<()> {
        use crate::sampling::{argmax, pick, Pick};
        let (rows, vocab) = (6, 500);
        let mut logits = self.vec(rows * vocab, 4.0);
        // an exact tie for the largest logit in row 1: the lower id wins
        logits[vocab + 10] = 9.0;
        logits[vocab + 20] = 9.0;
        let g = self.gpu.upload(&logits, rows, vocab);
        let row = |r: usize| &logits[r * vocab..(r + 1) * vocab];
        let greedy = vec![Pick::GREEDY; rows];
        let got = self.gpu.pick_rows(&g, &greedy)?;
        let want: Vec<u32> = (0..rows).map(|r| argmax(row(r))).collect();
        self.expect(
            "argmax_rows: ids, lowest id among equal maxima",
            got == want && got[1] == 10,
        );
        // one launch, different settings per row (a greedy row among them)
        for round in 0..4 {
            let picks: Vec<Pick> = (0..rows)
                .map(|r| {
                    if r == (round + 2) % rows {
                        return Pick::GREEDY;
                    }
                    Pick {
                        top_k: [40, 1, 64, 5, 17, 64][(r + round) % 6],
                        temperature: [0.7, 1.0, 1.3][(r + round) % 3],
                        top_p: [0.9, 1.0, 0.5, 1.0, 0.95, 1.0][r],
                        min_p: [0.02, 0.0, 0.0, 0.1, 0.0, 0.0][(r + round) % 6],
                        u: (self.r.u64() >> 11) as f64 / (1u64 << 53) as f64,
                    }
                })
                .collect();
            let got = self.gpu.pick_rows(&g, &picks)?;
            for (r, p) in picks.iter().enumerate() {
                let want = pick(row(r), p);
                self.expect(
                    &format!(
                        "sample_top_k row {r}: top_k {} temperature {} top_p {} min_p {}",
                        p.top_k, p.temperature, p.top_p, p.min_p
                    ),
                    got[r] == want,
                );
            }
        }
        // a grammar's mask on some rows (one row allows only a tie-free few, one nothing
        // past a short mask), then the draws on the masked logits
        let words = vocab.div_ceil(32);
        let masks: Vec<Option<Vec<u32>>> = (0..rows)
            .map(|r| match r % 3 {
                0 => None,
                1 => Some((0..words).map(|_| self.r.u64() as u32).collect()),
                _ => Some(vec![0xA5A5_0F0F; words / 2]),
            })
            .collect();
        let refs: Vec<Option<&[u32]>> = masks.iter().map(|m| m.as_deref()).collect();
        let mut gm = self.gpu.upload(&logits, rows, vocab);
        self.gpu.mask_rows(&mut gm, &refs)?;
        let mut cm = self.cpu.upload(&logits, rows, vocab);
        self.cpu.mask_rows(&mut cm, &refs)?;
        let (gv, cv) = (self.gpu.download(&gm)?, self.cpu.download(&cm)?);
        self.expect(
            "apply_token_mask: -inf exactly where the mask's bit is clear",
            gv.iter().zip(&cv).all(|(a, b)| a.to_bits() == b.to_bits()),
        );
        let picks: Vec<Pick> = (0..rows)
            .map(|r| {
                if r % 2 == 0 {
                    Pick::GREEDY
                } else {
                    Pick {
                        top_k: 20,
                        temperature: 0.8,
                        top_p: 1.0,
                        min_p: 0.0,
                        u: 0.37,
                    }
                }
            })
            .collect();
        let got = self.gpu.pick_rows(&gm, &picks)?;
        for (r, p) in picks.iter().enumerate() {
            let want = pick(&cv[r * vocab..(r + 1) * vocab], p);
            self.expect(&format!("masked draw row {r}"), got[r] == want);
        }
        Ok(())
    }
}
