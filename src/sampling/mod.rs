//! Choosing the next token: logits processors, samplers and a seeded RNG.
//!
//! One pipeline, used by the engine and by `kojo generate` ([`Sampler::process`] then
//! [`Sampler::sample`]): logit bias → end-of-generation ban until `min_tokens` → repetition /
//! presence / frequency penalties → grammar mask ([`apply_mask`]) → temperature → top-k →
//! top-p → min-p → draw (as vLLM orders them, the OpenAI semantics). Temperature 0 is greedy (argmax of
//! the penalized logits; ties go to the lowest id). Each request owns its RNG, so its draws do
//! not depend on what else runs in the batch.
//!
//! - [`stop`]: stop strings matched across token boundaries, never leaked into the output

pub mod stop;

use anyhow::{bail, Result};

/// Sampling settings of one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = off
    pub top_k: usize,
    /// 1 = off
    pub top_p: f32,
    /// 0 = off
    pub min_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens already seen; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence; 0 = off.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check every field; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=100.0).contains(&t)) {
            bail!("temperature must be in [0, 100], got {t}");
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0 && r <= 10.0) {
            bail!("repetition_penalty must be in (0, 10], got {r}");
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                bail!("{name} must be in [-2, 2], got {v}");
            }
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same stream everywhere.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `log_softmax(logits)[i]` for every `i`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// The `k` most likely tokens with their log-probabilities, best first (ties: lower id first).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    top_of(&log_softmax(logits), k)
}

/// The `k` largest entries of `lp` as (index, value), best first (ties: lower index first).
pub fn top_of(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, lp[i as usize])).collect()
}

/// The sampler of one request: its settings, its rules on the logits, its RNG.
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// `(token, bias)` added to the raw logits
    pub logit_bias: Vec<(u32, f32)>,
    /// end-of-generation ids are banned until this many tokens were generated
    pub min_tokens: usize,
    eog: Vec<u32>,
}

/// Set to -inf every logit whose bit is clear in `mask` (bit `t % 32` of word `t / 32` for
/// token `t`; tokens past the mask are cleared too). The CPU twin of the `apply_token_mask`
/// kernel.
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let allowed = mask.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
        if !allowed {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Temperatures below this are greedy (as vLLM's `_SAMPLING_EPS`): dividing logits by one
/// overflows to infinities, whose softmax is NaN.
pub const MIN_TEMPERATURE: f32 = 1e-5;

impl Sampler {
    pub fn new(mut params: SamplingParams) -> Self {
        if params.temperature < MIN_TEMPERATURE {
            params.temperature = 0.0;
        }
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            logit_bias: Vec::new(),
            min_tokens: 0,
            eog: Vec::new(),
        }
    }

    /// Add the rules on the logits: a bias, and the end-of-generation ids banned until
    /// `min_tokens` tokens were generated.
    pub fn with_rules(
        mut self,
        logit_bias: Vec<(u32, f32)>,
        min_tokens: usize,
        eog: &[u32],
    ) -> Self {
        self.logit_bias = logit_bias;
        self.min_tokens = min_tokens;
        self.eog = eog.to_vec();
        self
    }

    /// Whether the next draw depends on the raw logits alone (and a mask), so a backend can
    /// draw it where the logits are: no bias, penalty or ban applies now, and the draw keeps
    /// at most `max_k` candidates (or is greedy).
    pub fn plain(&self, generated: usize, max_k: usize) -> bool {
        let p = &self.params;
        (p.temperature == 0.0 || (1..=max_k).contains(&p.top_k))
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && self.logit_bias.is_empty()
            && (generated >= self.min_tokens || self.eog.is_empty())
    }

    /// Every rule on the logits, in place, in order: bias, the end-of-generation ban before
    /// `min_tokens`, penalties (`prompt` counts for the repetition penalty only), the mask.
    pub fn process(
        &self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        mask: Option<&[u32]>,
    ) {
        for &(t, b) in &self.logit_bias {
            if let Some(x) = logits.get_mut(t as usize) {
                *x += b;
            }
        }
        if generated.len() < self.min_tokens {
            for &e in &self.eog {
                if let Some(x) = logits.get_mut(e as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        self.penalize(logits, prompt, generated);
        if let Some(m) = mask {
            apply_mask(logits, m);
        }
    }

    /// Apply the penalties in place. `prompt` counts for the repetition penalty only (as in
    /// vLLM); presence and frequency penalties count generated tokens.
    fn penalize(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, s) in logits.iter_mut().zip(seen) {
                if s {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Choose a token from logits that were already penalized.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        pick(logits, &self.next_pick())
    }

    /// The next draw as a [`Pick`]: what [`Sampler::sample`] does with the logits, for a
    /// backend to do where they are (advances the RNG as `sample` would).
    pub fn next_pick(&mut self) -> Pick {
        let p = &self.params;
        if p.temperature == 0.0 {
            return Pick::GREEDY;
        }
        Pick {
            top_k: p.top_k,
            temperature: p.temperature,
            top_p: p.top_p,
            min_p: p.min_p,
            u: self.rng.next_f64(),
        }
    }
}

/// One token's draw from logits: keep the `top_k` best (0 = all; ties by lower id), scale by
/// 1/`temperature`, softmax, cut to `top_p` then `min_p`, and take the candidate where `u`
/// (uniform in [0, 1)) falls. `temperature` 0 is the argmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub top_k: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub u: f64,
}

impl Pick {
    pub const GREEDY: Pick = Pick {
        top_k: 1,
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        u: 0.0,
    };

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// The token `p` draws from `logits`.
pub fn pick(logits: &[f32], p: &Pick) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    // candidates sorted by logit, best first
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, l / p.temperature))
        .collect();
    if cand.is_empty() {
        return NO_TOKEN;
    }
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(p.top_k);
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = p.u * total;
    for (i, &q) in probs.iter().enumerate() {
        if r < q {
            return cand[i].0;
        }
        r -= q;
    }
    cand[probs.len() - 1].0
}

/// Index of the largest logit; the lowest index among equals. NaNs are never chosen; a row
/// with nothing else gives [`NO_TOKEN`] (as the GPU kernels do).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && best.is_none_or(|b| l > logits[b]) {
            best = Some(i);
        }
    }
    best.map_or(NO_TOKEN, |b| b as u32)
}

/// What a draw from a row with no number in it (all NaN) gives: no token id at all.
pub const NO_TOKEN: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    /// NaNs are never drawn (the GPU kernels skip them too), and a row of nothing but NaN
    /// draws no token, for the caller to fail that request.
    #[test]
    fn nan_is_never_drawn() {
        let nan = f32::NAN;
        assert_eq!(argmax(&[nan, 1.0, 3.0, nan, 2.0]), 2);
        assert_eq!(argmax(&[nan, nan]), NO_TOKEN);
        assert_eq!(argmax(&[]), NO_TOKEN);
        let row = [nan, 0.5, nan, 0.4, 0.1, nan];
        for seed in 0..50 {
            for top_k in [0, 2, 3] {
                let mut s = Sampler::new(SamplingParams {
                    temperature: 1.0,
                    top_k,
                    seed,
                    ..Default::default()
                });
                let id = s.sample(&row);
                assert!([1, 3, 4].contains(&id), "seed {seed} top_k {top_k}: {id}");
            }
        }
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[nan; 8]), NO_TOKEN);
    }

    #[test]
    fn greedy_and_seeded() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..Default::default()
            });
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top-k 1 is greedy whatever the temperature
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            temperature: 5.0,
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // min-p 0.9 keeps only tokens within 90% of the best: 1 and 2 are close, 0/3 are not
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.9,
            ..Default::default()
        });
        assert!((0..200).all(|_| matches!(s.sample(&logits), 1 | 2)));
        // top-p small keeps the best only
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.01,
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(SamplingParams {
            seed: 1,
            ..Default::default()
        });
        let ones = (0..20000).filter(|_| s.sample(&logits) == 1).count();
        assert!((14500..15500).contains(&ones), "{ones}");
    }

    #[test]
    fn penalties() {
        let s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        });
        let mut l = vec![4.0, -4.0, 1.0];
        s.penalize(&mut l, &[0], &[1, 1]);
        assert_eq!(l, vec![2.0, -8.0 - 0.5 - 0.5, 1.0]);
    }

    #[test]
    fn logprobs() {
        let t = top_logprobs(&[0.0, 0.0, (2.0f32).ln()], 2);
        assert_eq!(t[0].0, 2);
        assert!((t[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(t[1].0, 0);
    }
}
