//! One sequence on one backend: its own KV cache, fed in chunks. This is what `generate` and
//! `perplexity` drive; the serving engine schedules many sequences over a shared paged cache
//! with the same [`Transformer::forward`].

use super::transformer::{Step, Transformer};
use crate::backend::{Backend, BatchLayout};
use anyhow::{bail, Result};

pub const BLOCK_SIZE: usize = 16;

/// Which rows of a [`Session::feed`] return logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last fed token's.
    Last,
    /// Every fed token from this index on.
    From(usize),
}

pub struct Session<'m, B: Backend> {
    be: &'m B,
    model: &'m Transformer<B>,
    kv: B::KvCache,
    /// `[max_ctx / BLOCK_SIZE]` this sequence owns every block of its cache, in order
    table: Vec<u32>,
    max_ctx: usize,
    /// Tokens per forward pass.
    chunk: usize,
    /// Tokens whose K/V are in the cache.
    pub tokens: Vec<u32>,
}

impl<'m, B: Backend> Session<'m, B> {
    pub fn new(be: &'m B, model: &'m Transformer<B>, max_ctx: usize, chunk: usize) -> Result<Self> {
        if max_ctx == 0 || chunk == 0 {
            bail!("context and chunk sizes must be positive");
        }
        let blocks = max_ctx.div_ceil(BLOCK_SIZE);
        let kv = be.alloc_kv(model.kv_shape(blocks, BLOCK_SIZE))?;
        Ok(Session {
            be,
            model,
            kv,
            table: (0..blocks as u32).collect(),
            max_ctx,
            chunk,
            tokens: Vec::new(),
        })
    }

    /// Forget the sequence (the cache is overwritten by the next tokens).
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Append `tokens` to the sequence and return the logits asked for, `[rows, vocab]`
    /// row-major.
    pub fn feed(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("nothing to feed");
        }
        if self.tokens.len() + tokens.len() > self.max_ctx {
            bail!(
                "{} tokens do not fit the context of {}",
                self.tokens.len() + tokens.len(),
                self.max_ctx
            );
        }
        let first_wanted = match want {
            Logits::Last => tokens.len() - 1,
            Logits::From(i) => i.min(tokens.len() - 1),
        };
        let mut out = Vec::new();
        for (ci, chunk) in tokens.chunks(self.chunk).enumerate() {
            let start = self.tokens.len();
            let positions: Vec<u32> = (start..start + chunk.len()).map(|p| p as u32).collect();
            let slots: Vec<u32> = positions
                .iter()
                .map(|&p| {
                    self.table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32
                })
                .collect();
            let base = ci * self.chunk;
            let rows: Vec<usize> = (0..chunk.len())
                .filter(|&i| base + i >= first_wanted)
                .collect();
            let tables = [&self.table[..]];
            let step = Step {
                tokens: chunk,
                layout: BatchLayout {
                    positions: &positions,
                    seq_starts: &[0, chunk.len()],
                    block_tables: &tables,
                    slots: &slots,
                },
                logit_rows: &rows,
            };
            if rows.is_empty() {
                // still run the pass for the KV cache, with one row of logits thrown away
                let step = Step {
                    logit_rows: &[chunk.len() - 1],
                    ..step
                };
                self.model.forward(self.be, &mut self.kv, &step)?;
            } else {
                let logits = self.model.forward(self.be, &mut self.kv, &step)?;
                out.extend(self.be.download(&logits)?);
            }
            self.tokens.extend_from_slice(chunk);
        }
        Ok(out)
    }
}
