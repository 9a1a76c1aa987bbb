//! The GPU backend's kernels against the CPU backend's ops, op by op, on whatever device the
//! backend has: the real GPU (`kojo gpu-check`) or the CPU fiber executor (tests/gpu_kernels.rs).
//! Inputs are random (from a seed); every comparison becomes a [`Check`] with the relative
//! error `|out - ref| / |ref|` (L2) and the largest element error over the largest reference
//! magnitude, against a tolerance per op.

use super::{GpuBackend, GpuTensor, GpuWeight};
use crate::backend::cpu::{CpuBackend, CpuTensor, CpuWeight, MatmulMode};
use crate::backend::{
    AttnParams, Backend, BatchLayout, Glu, HostWeight, KvShape, Rope, RopeLayout,
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

    pub fn matmul(&mut self) -> Result<()> {
        let (k, m) = (512, 37);
        for (i, ty) in TYPES.into_iter().enumerate() {
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
        Ok(())
    }
}
