//! Any request body given to `/v1/chat/completions` or `/v1/completions` gives validated
//! parameters or a 400-class error, never a crash; what validates is inside the documented
//! ranges and drives the sampler (penalties, bias, temperature, top-k/p, min-p) without a panic
//! or an id outside the vocabulary.
#![no_main]
use kojo::api::wire::{parse_body, ChatRequest, CompletionRequest, PromptInput, ValidParams};
use kojo::sampling::Sampler;
use libfuzzer_sys::fuzz_target;

const VOCAB: usize = 300;

fn check(p: &ValidParams, data: &[u8]) {
    assert!(p.temperature.is_finite() && (0.0..=2.0).contains(&p.temperature));
    assert!(p.top_p > 0.0 && p.top_p <= 1.0);
    assert!((1..=16).contains(&p.n));
    assert!(p.stop.len() <= 16 && p.stop.iter().all(|s| !s.is_empty() && s.len() <= 1024));
    assert!(p.logit_bias.iter().all(|&(id, b)| (id as usize) < VOCAB && b.abs() <= 100.0));
    assert!(p.max_tokens.is_none_or(|m| m >= 1 && p.min_tokens <= m));
    assert!(p.logprobs.is_none_or(|k| k <= 20));
    assert!(p.include_usage <= p.stream);
    assert!((-(1i64 << 31)..1i64 << 31).contains(&p.priority));
    assert!(p
        .cache_salt
        .as_ref()
        .is_none_or(|s| !s.is_empty() && s.len() <= 1024));
    let sp = p.sampling(data.len() as u64);
    sp.validate().expect("validated parameters the sampler refuses");
    // the engine's pipeline: bias, the end-of-generation ban (id 0 here), penalties, draw
    let mut s = Sampler::new(sp).with_rules(p.logit_bias.clone(), p.min_tokens, &[0]);
    // logits from the body's bytes, with the extremes a model can give
    let mut logits: Vec<f32> = (0..VOCAB)
        .map(|i| match data.get(i).copied().unwrap_or(0) {
            0 => f32::NEG_INFINITY,
            1 => 1e30,
            b => (b as f32 - 128.0) / 8.0,
        })
        .collect();
    let generated: Vec<u32> = data.iter().take(32).map(|&b| b as u32 % VOCAB as u32).collect();
    s.process(&mut logits, &[1, 2, 3], &generated, None);
    for _ in 0..4 {
        let id = s.sample(&logits);
        assert!((id as usize) < VOCAB, "sampled id {id}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_body::<ChatRequest>(data) {
        if let Ok(v) = req.validate(VOCAB) {
            assert!(!v.messages.is_empty());
            for m in &v.messages {
                assert!(m["role"].is_string() && m["content"].is_string());
            }
            check(&v.params, data);
        }
    }
    if let Ok(req) = parse_body::<CompletionRequest>(data) {
        if let Ok(v) = req.validate(VOCAB) {
            assert!(!v.prompts.is_empty());
            for p in &v.prompts {
                if let PromptInput::Ids(ids) = p {
                    assert!(ids.iter().all(|&i| (i as usize) < VOCAB), "{ids:?}");
                }
            }
            check(&v.params, data);
        }
    }
});
