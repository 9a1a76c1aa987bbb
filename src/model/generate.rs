//! Generating text for one prompt: feed the prompt, then sample one token at a time until an
//! end-of-generation token, a stop string or the token limit.

use super::session::{Logits, Session};
use crate::backend::Backend;
use crate::sampling::stop::StopMatcher;
use crate::sampling::{top_logprobs, Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use anyhow::{bail, Result};

pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// How many top log-probabilities to record per position (0 = none).
    pub top_logprobs: usize,
    /// End-of-generation tokens are banned until this many tokens were generated.
    pub min_tokens: usize,
    /// `(token, bias)` added to the logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must match.
    pub constraint: Option<crate::structured::Constraint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context filled up.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub output_ids: Vec<u32>,
    /// The output text, without the stop string or end-of-generation token.
    pub text: String,
    pub finish_reason: FinishReason,
    pub stop_string: Option<String>,
    /// `[output position][k]` (token id, log-probability), from the raw logits.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// Run one request. `on_text` receives the output text as it becomes final (whole UTF-8
/// characters, stop strings held back).
pub fn generate<B: Backend>(
    session: &mut Session<'_, B>,
    tok: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<Generated> {
    if req.prompt_ids.is_empty() {
        bail!("the prompt is empty: nothing to generate from");
    }
    req.sampling.validate()?;
    let room = session.max_ctx().saturating_sub(req.prompt_ids.len());
    if room == 0 {
        bail!(
            "the prompt has {} tokens, which fills the context of {}",
            req.prompt_ids.len(),
            session.max_ctx()
        );
    }
    let all_eog = tok.end_of_generation();
    let eog = if req.ignore_eos && req.constraint.is_none() {
        Vec::new()
    } else {
        all_eog.clone()
    };
    // the same pipeline as the engine's (bias, min_tokens, penalties, grammar mask, draw)
    let mut sampler = Sampler::new(req.sampling.clone()).with_rules(
        req.logit_bias.clone(),
        req.min_tokens,
        &all_eog,
    );
    let mut constraint = req.constraint.as_ref().map(|c| c.fork());
    let mut stops = StopMatcher::new(&req.stop);
    let mut decoder = StreamDecoder::new(tok, false);
    let mut out = Generated {
        output_ids: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        stop_string: None,
        top_logprobs: Vec::new(),
    };
    session.reset();
    let mut logits = session.feed(&req.prompt_ids, Logits::Last)?;
    let max_new = req.max_tokens.min(room);
    loop {
        if out.output_ids.len() >= max_new {
            break;
        }
        if req.top_logprobs > 0 {
            out.top_logprobs
                .push(top_logprobs(&logits, req.top_logprobs));
        }
        let mask = match &mut constraint {
            Some(c) => Some(c.mask().map_err(|e| anyhow::anyhow!("grammar: {e}"))?),
            None => None,
        };
        if mask.as_ref().is_some_and(|m| m.iter().all(|&w| w == 0)) {
            // the grammar is complete
            out.finish_reason = FinishReason::Stop;
            break;
        }
        sampler.process(
            &mut logits,
            &req.prompt_ids,
            &out.output_ids,
            mask.as_deref(),
        );
        let id = sampler.sample(&logits);
        if id == crate::sampling::NO_TOKEN {
            anyhow::bail!(
                "the model produced NaN logits at output token {}",
                out.output_ids.len()
            );
        }
        if eog.contains(&id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if let Some(c) = &mut constraint {
            c.consume(id).map_err(|e| anyhow::anyhow!("grammar: {e}"))?;
        }
        out.output_ids.push(id);
        let pushed = stops.push(&decoder.push(id));
        on_text(&pushed.emit);
        out.text += &pushed.emit;
        if pushed.stopped.is_some() {
            out.stop_string = pushed.stopped;
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.output_ids.len() >= max_new {
            break;
        }
        if constraint.as_ref().is_some_and(|c| c.is_stopped()) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        logits = session.feed(&[id], Logits::Last)?;
    }
    if out.stop_string.is_none() {
        let pushed = stops.push(&decoder.finish());
        let mut tail = pushed.emit;
        if pushed.stopped.is_some() {
            out.stop_string = pushed.stopped;
            out.finish_reason = FinishReason::Stop;
        } else {
            tail += &stops.finish();
        }
        on_text(&tail);
        out.text += &tail;
    }
    Ok(out)
}
