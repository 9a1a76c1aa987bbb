//! Hostile chat messages rendered through a real model's chat template (SmolLM2's ChatML,
//! from `models/`, fetched by scripts/fetch-models) and tokenized as the server does: an error
//! or a prompt, never a crash; every message lands in the prompt whole and in order (content
//! cannot close its own turn early or drop another), the prompt's control tokens are exactly
//! the rendered turn markers, and the tokenizer gives back the rendered text.
#![no_main]
use kojo::api::wire::{parse_body, ChatRequest};
use kojo::model::ModelSource;
use kojo::tokenizer::{ChatTemplate, Tokenizer};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;

fn model() -> &'static (Tokenizer, ChatTemplate) {
    static M: OnceLock<(Tokenizer, ChatTemplate)> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::var_os("KOJO_MODELS").map(PathBuf::from).unwrap_or_else(|| {
            ["../models", "models"].iter().map(PathBuf::from).find(|p| p.is_dir()).expect(
                "no models/ folder: run scripts/fetch-models, or set KOJO_MODELS",
            )
        });
        let src = ModelSource::open(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
        let tok = src.tokenizer().unwrap();
        let tmpl = src.chat_template(&tok).unwrap();
        (tok, tmpl)
    })
}

/// Messages from a request body when it is one, else from raw bytes (parts split at 0xFF; a
/// part's first byte picks the role), so the fuzzer reaches odd content without JSON syntax.
fn messages(data: &[u8]) -> Option<Vec<Value>> {
    if let Ok(req) = parse_body::<ChatRequest>(data) {
        return req.validate(49152).ok().map(|v| v.messages);
    }
    let roles = ["system", "user", "assistant", "tool"];
    let msgs: Vec<Value> = data
        .split(|&b| b == 0xFF)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let role = roles[p[0] as usize % roles.len()];
            json!({"role": role, "content": String::from_utf8_lossy(&p[1..])})
        })
        .collect();
    (!msgs.is_empty()).then_some(msgs)
}

fuzz_target!(|data: &[u8]| {
    let Some(msgs) = messages(data) else { return };
    let (tok, tmpl) = model();
    let Ok(text) = tmpl.render(&msgs, true, None) else { return };
    let mut at = 0;
    for m in &msgs {
        let turn = format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m["role"].as_str().unwrap(),
            m["content"].as_str().unwrap()
        );
        let found = text[at..].find(&turn).unwrap_or_else(|| panic!("{turn:?} not in {text:?}"));
        at += found + turn.len();
    }
    assert!(text[at..].ends_with("<|im_start|>assistant\n"), "{text:?}");
    let ids = tok.encode(&text, false, true).unwrap();
    // the turns the model sees are the turns rendered: one control token per marker
    for marker in ["<|im_start|>", "<|im_end|>"] {
        let id = tok.encode(marker, false, true).unwrap();
        assert_eq!(id.len(), 1);
        let n = ids.iter().filter(|&&i| i == id[0]).count();
        assert_eq!(n, text.matches(marker).count(), "{marker} in {text:?}");
    }
    // and the text comes back, less the bytes no token writes alone (SmolLM2's byte-level
    // vocabulary lacks some control bytes; they are dropped, as Hugging Face's tokenizer does)
    static WRITABLE: OnceLock<[bool; 256]> = OnceLock::new();
    let writable = WRITABLE.get_or_init(|| {
        let mut w = [false; 256];
        for id in 0..tok.vocab_size() as u32 {
            let mut b = Vec::new();
            tok.token_bytes(id, false, &mut b);
            if let [x] = b[..] {
                w[x as usize] = true;
            }
        }
        w
    });
    let written: Vec<u8> = text.bytes().filter(|&b| writable[b as usize]).collect();
    let mut got = Vec::new();
    for &id in &ids {
        tok.token_bytes(id, true, &mut got);
    }
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&written));
});
