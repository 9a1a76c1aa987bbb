//! Hostile grammars through the server's grammar path (SmolLM2's vocabulary, from `models/`):
//! a JSON schema, a regex, a choice list or a Lark text either fails to compile with an error,
//! or compiles into a constraint whose masks and token steps never panic (an error, which the
//! engine turns into that request's error, is allowed). The first byte picks the kind, the rest is the text;
//! later bytes steer the walk.
#![no_main]
use kojo::model::ModelSource;
use kojo::structured::{GrammarLimits, GrammarSpec, Grammars};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| {
        let dir = std::env::var_os("KOJO_MODELS").map(PathBuf::from).unwrap_or_else(|| {
            ["../models", "models"].iter().map(PathBuf::from).find(|p| p.is_dir()).expect(
                "no models/ folder: run scripts/fetch-models, or set KOJO_MODELS",
            )
        });
        let src = ModelSource::open(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
        let tok = Arc::new(src.tokenizer().unwrap());
        let n = tok.vocab_size();
        // the server's default size limit, a smaller one to keep runs fast
        Grammars::new(tok, n, GrammarLimits { max_bytes: 16 << 10 })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let spec = match kind % 4 {
        0 => match serde_json::from_str(text) {
            Ok(v) => GrammarSpec::JsonSchema(v),
            Err(_) => return,
        },
        1 => GrammarSpec::Regex(text.to_string()),
        2 => GrammarSpec::Choice(text.split('\n').map(str::to_string).collect()),
        _ => GrammarSpec::Lark(text.to_string()),
    };
    let g = grammars();
    let Ok(mut c) = g.compile(&spec) else { return };
    let mut steer = data.iter().cycle().skip(1);
    for _ in 0..8 {
        if c.is_stopped() {
            break;
        }
        let Ok(mask) = c.mask() else { break };
        let allowed: Vec<u32> = (0..mask.len() as u32 * 32)
            .filter(|&t| mask[t as usize / 32] >> (t % 32) & 1 == 1)
            .collect();
        if allowed.is_empty() {
            break;
        }
        let pick = allowed[*steer.next().unwrap() as usize * 7919 % allowed.len()];
        // llguidance can refuse a token its own mask allowed when a step hits its limits
        // (found here: a choice of control bytes, "ParserTooComplex"); the engine fails that
        // request with the error, so an error is allowed, a panic is not
        if c.consume(pick).is_err() {
            break;
        }
    }
});
