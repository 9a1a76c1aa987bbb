//! Perplexity with llama-perplexity's windowing: the tokenized text is cut into consecutive
//! windows of `ctx` tokens (the incomplete tail is dropped); when the model adds BOS, each
//! window's first token is replaced by BOS; within a window, the tokens after the first half
//! (indices `ctx/2 + 1 .. ctx`) are scored, each predicted from everything before it in the
//! window. PPL = exp(mean negative log-likelihood); the uncertainty is the standard error of
//! that mean, carried through the exponential, as llama-perplexity reports it.

use super::session::{Logits, Session};
use crate::backend::Backend;
use crate::sampling::log_softmax;
use anyhow::{bail, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub chunks: usize,
    pub scored_tokens: usize,
    pub ppl: f64,
    pub ppl_stderr: f64,
    /// Running PPL after each chunk.
    pub per_chunk: Vec<f64>,
}

/// `tokens` is the whole tokenized text (with BOS first when the model adds it).
pub fn perplexity<B: Backend>(
    session: &mut Session<'_, B>,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity> {
    if ctx < 4 {
        bail!("--ctx must be at least 4, got {ctx}");
    }
    if ctx > session.max_ctx() {
        bail!(
            "--ctx {ctx} is larger than the session's context {}",
            session.max_ctx()
        );
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        bail!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        );
    }
    let first = ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(chunks);
    for c in 0..chunks {
        let mut window = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        session.reset();
        let logits = session.feed(&window, Logits::From(first))?;
        let vocab = logits.len() / (ctx - first);
        for (i, row) in logits.chunks_exact(vocab).take(ctx - 1 - first).enumerate() {
            let target = tokens[c * ctx + first + i + 1] as usize;
            let lp = log_softmax(row)[target] as f64;
            nll -= lp;
            nll2 += lp * lp;
            count += 1;
        }
        let running = (nll / count as f64).exp();
        per_chunk.push(running);
        on_chunk(c, running);
    }
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        chunks,
        scored_tokens: count,
        ppl,
        ppl_stderr: stderr,
        per_chunk,
    })
}
