//! A vocabulary read from GGUF metadata (`tokenizer.ggml.*`), checked for consistency.

use crate::formats::{FormatError, GgufFile, Value};
use std::collections::HashMap;

/// GGUF `tokenizer.ggml.token_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
    /// Matched in text before the model's own tokenization runs.
    pub fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }
}

pub const MAX_VOCAB: usize = 1 << 22;

#[derive(Debug)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    /// SentencePiece scores (empty for BPE vocabularies without them).
    pub scores: Vec<f32>,
    pub token_to_id: HashMap<String, u32>,
    /// Ids of tokens matched in text before tokenization, longest text first.
    pub special: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

impl Vocab {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, FormatError> {
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens: Vec<String> = string_array(g, tokens_key)?
            .ok_or_else(|| g.meta_error(tokens_key, "missing: the file has no tokenizer"))?;
        if tokens.is_empty() || tokens.len() > MAX_VOCAB {
            return Err(g.meta_error(
                tokens_key,
                format!("{} tokens (must be 1..={MAX_VOCAB})", tokens.len()),
            ));
        }
        let n = tokens.len();
        let types = match g.get("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; n],
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| g.meta_error("tokenizer.ggml.token_type", "not an array"))?;
                if arr.len() != n {
                    return Err(g.meta_error(
                        "tokenizer.ggml.token_type",
                        format!("{} entries for {n} tokens", arr.len()),
                    ));
                }
                arr.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64().and_then(TokenType::from_i64).ok_or_else(|| {
                            g.meta_error(
                                "tokenizer.ggml.token_type",
                                format!("entry {i} is {v:?}, not a token type 1..=6"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let scores = match g.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| g.meta_error("tokenizer.ggml.scores", "not an array"))?;
                if arr.len() != n {
                    return Err(g.meta_error(
                        "tokenizer.ggml.scores",
                        format!("{} entries for {n} tokens", arr.len()),
                    ));
                }
                arr.iter()
                    .map(|v| {
                        v.as_f64().map(|f| f as f32).ok_or_else(|| {
                            g.meta_error("tokenizer.ggml.scores", "non-numeric entry")
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // on duplicates the first id wins, as in llama.cpp's loader
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        let id = |key: &str| -> Result<Option<u32>, FormatError> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(x) if (x as usize) < n => Ok(Some(x as u32)),
                    // llama.cpp writes -1 (as u32::MAX) for "none"
                    Some(x) if x == u32::MAX as u64 => Ok(None),
                    _ => Err(g.meta_error(key, format!("{v:?} is not a token id below {n}"))),
                },
            }
        };
        let mut special: Vec<u32> = (0..n as u32)
            .filter(|&i| types[i as usize].is_special() && !tokens[i as usize].is_empty())
            .collect();
        special.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
        Ok(Vocab {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: g
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(model == "llama"),
            add_eos: g.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
            add_space_prefix: g
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(model == "llama"),
            tokens,
            types,
            scores,
            token_to_id,
            special,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
}

/// A metadata array of strings, if present.
pub fn string_array(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>, FormatError> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| {
        g.meta_error(
            key,
            format!("expected an array of strings, got {}", v.type_name()),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(g.meta_error(
                key,
                format!("entry {i} is {}, not a string", other.type_name()),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A piece of input: text still to tokenize, or a special token already recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Split `text` on special tokens, longest first. Control and unknown tokens are recognised only
/// when `parse_special`; user-defined tokens always are (as llama.cpp and HF tokenizers do).
pub fn partition<'a>(vocab: &Vocab, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
    let mut frags = vec![Fragment::Text(text)];
    if text.is_empty() {
        return Vec::new();
    }
    for &id in &vocab.special {
        let ty = vocab.types[id as usize];
        if !parse_special && ty != TokenType::UserDefined {
            continue;
        }
        let needle = vocab.tokens[id as usize].as_str();
        if !frags
            .iter()
            .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
        {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for f in frags {
            match f {
                Fragment::Text(mut t) => {
                    while let Some(at) = t.find(needle) {
                        if at > 0 {
                            next.push(Fragment::Text(&t[..at]));
                        }
                        next.push(Fragment::Token(id));
                        t = &t[at + needle.len()..];
                    }
                    if !t.is_empty() {
                        next.push(Fragment::Text(t));
                    }
                }
                tok => next.push(tok),
            }
        }
        frags = next;
    }
    frags
}
