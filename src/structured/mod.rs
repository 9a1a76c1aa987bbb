//! Structured outputs: grammars that constrain what a request may generate, compiled with
//! `llguidance` over a token trie built from kojo's own tokenizer.
//!
//! - [`Grammars`]: one per model; the token trie and llguidance's parser factory (built on first
//!   use: a few hundred milliseconds for a 262k vocabulary).
//! - [`GrammarSpec`]: what a request asks for (JSON schema, any JSON object, regex, choice, Lark).
//! - [`Constraint`]: one sequence's grammar state; per step a token bitmask (one bit per token id,
//!   32 per `u32` word, the layout the GPU's bitmask kernel reads), then the chosen token.
//!
//! End of generation: every end-of-generation id is allowed exactly when the grammar could end
//! here ([`Constraint::mask`]); a grammar that cannot go on ([`Constraint::is_stopped`]) ends
//! the sequence as an end-of-generation token would.

pub mod tools;

use crate::tokenizer::Tokenizer;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::{Arc, OnceLock};

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema (draft 2020-12 subset llguidance supports).
    JsonSchema(Value),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A regular expression (Rust regex syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect: `%json`, `[lazy]`, `&`, `~`).
    Lark(String),
}

impl GrammarSpec {
    /// The grammar as llguidance takes it. JSON schemas are generated compactly (`", "` and
    /// `": "`, no free whitespace) unless the schema sets its own `x-guidance` options: a small
    /// model sampled at temperature 1 otherwise pads JSON with whitespace until it runs out of
    /// tokens.
    fn to_llg(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Choice(c) => {
                if c.is_empty() {
                    return Err("the choice list is empty".into());
                }
                let alts: Vec<String> = c.iter().map(|s| regex_syntax::escape(s)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
            GrammarSpec::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        })
    }
}

/// A schema with kojo's compact JSON layout, unless it chose its own.
pub fn compact(mut schema: Value) -> Value {
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// Limits on what a request may ask to compile.
#[derive(Debug, Clone, Copy)]
pub struct GrammarLimits {
    /// Bytes of the grammar's source text (a schema's JSON, a regex, a Lark text).
    pub max_bytes: usize,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        GrammarLimits {
            max_bytes: 256 << 10,
        }
    }
}

/// kojo's tokenizer as llguidance sees it: the trie of every token's bytes (control tokens
/// written `\xFF<text>`, so no grammar produces them by accident) and tokenization of bytes.
struct Env {
    trie: TokTrie,
    tok: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tok.encode(text, false, false).unwrap_or_default(),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The grammar machinery of one model.
pub struct Grammars {
    tok: Arc<Tokenizer>,
    /// logits per row (may exceed the tokenizer's vocabulary)
    n_vocab: usize,
    eog: Arc<Vec<u32>>,
    limits: GrammarLimits,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Grammars {
    pub fn new(tok: Arc<Tokenizer>, n_vocab: usize, limits: GrammarLimits) -> Self {
        let eog = Arc::new(tok.end_of_generation());
        Grammars {
            tok,
            n_vocab,
            eog,
            limits,
            factory: OnceLock::new(),
        }
    }

    pub fn limits(&self) -> GrammarLimits {
        self.limits
    }

    fn factory(&self) -> Result<Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| build_factory(&self.tok, &self.eog).map(Arc::new))
            .clone()
    }

    /// Compile `spec` into a fresh constraint. Errors say what is wrong with the grammar.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let size = match spec {
            GrammarSpec::JsonSchema(v) => v.to_string().len(),
            GrammarSpec::JsonObject => 0,
            GrammarSpec::Regex(r) => r.len(),
            GrammarSpec::Choice(c) => c.iter().map(|s| s.len() + 1).sum(),
            GrammarSpec::Lark(l) => l.len(),
        };
        if size > self.limits.max_bytes {
            return Err(format!(
                "the grammar has {size} bytes; this server compiles at most {} (--max-grammar-bytes)",
                self.limits.max_bytes
            ));
        }
        let factory = self.factory()?;
        let grammar = spec.to_llg()?;
        // llguidance reports bad grammars as errors; a panic inside it is one too
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|_| "the grammar compiler failed on this grammar".to_string())?
        .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint {
            matcher,
            eog: self.eog.clone(),
            words: self.n_vocab.div_ceil(32),
        })
    }
}

fn build_factory(tok: &Arc<Tokenizer>, eog: &[u32]) -> Result<ParserFactory, String> {
    let n = tok.vocab_size();
    let mut words = Vec::with_capacity(n);
    let mut b = Vec::new();
    for id in 0..n as u32 {
        b.clear();
        tok.token_bytes(id, false, &mut b);
        if b.is_empty() || eog.contains(&id) {
            // a control token (or one with no bytes): reachable only by name
            let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            match tok.token_text(id) {
                Some(t) if !t.is_empty() => w.extend_from_slice(t.as_bytes()),
                _ => w.extend_from_slice(format!("<[{id}]>").as_bytes()),
            }
            words.push(w);
        } else {
            words.push(b.clone());
        }
    }
    let eos = eog.first().copied().or(tok.eos()).unwrap_or(0);
    let mut info = TokRxInfo::new(n as u32, eos);
    info.tok_bos = tok.bos();
    let trie = TokTrie::from(&info, &words);
    let env: TokEnv = Arc::new(Env {
        trie,
        tok: tok.clone(),
    });
    let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    f.quiet();
    *f.limits_mut() = ParserLimits::default();
    Ok(f)
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
    eog: Arc<Vec<u32>>,
    /// mask words: one bit per logit
    words: usize,
}

impl Constraint {
    /// An independent copy in the same state (for the `n` choices of one request).
    pub fn fork(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
            eog: self.eog.clone(),
            words: self.words,
        }
    }

    /// The tokens allowed next: bit `t % 32` of word `t / 32` is set when token `t` may follow.
    /// Every end-of-generation id is allowed when the grammar could end here. A mask with no
    /// bit set means nothing may follow.
    pub fn mask(&mut self) -> Result<Vec<u32>, String> {
        let mut out = vec![0u32; self.words];
        if self.matcher.is_stopped() {
            return Ok(out);
        }
        // a panic inside llguidance fails this request, never the engine thread
        let m =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.matcher.compute_mask()))
                .map_err(|_| "the grammar engine failed computing a mask".to_string())?
                .map_err(|e| e.to_string())?;
        let src = m.as_slice();
        let n = out.len().min(src.len());
        out[..n].copy_from_slice(&src[..n]);
        // llguidance's own EOS bit stands for all of ours; clear the others it may not know of
        let accepting =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.matcher.is_accepting()))
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
        for &e in self.eog.iter() {
            let (w, bit) = (e as usize / 32, e % 32);
            if w < out.len() {
                if accepting {
                    out[w] |= 1 << bit;
                } else {
                    out[w] &= !(1 << bit);
                }
            }
        }
        Ok(out)
    }

    /// Advance past the chosen token (an end-of-generation id ends the grammar).
    pub fn consume(&mut self, id: u32) -> Result<(), String> {
        if self.eog.contains(&id) {
            return Ok(());
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.matcher.consume_token(id)
        }))
        .map_err(|_| "the grammar engine failed consuming a token".to_string())?
        .map_err(|e| e.to_string())
    }

    /// Nothing more may be generated: the output is complete.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests;
