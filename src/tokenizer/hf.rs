//! Tokenizers from Hugging Face `tokenizer.json`, through the `tokenizers` crate.

use super::bpe::byte_to_char_table;
use std::collections::HashMap;
use std::path::Path;

/// How a token's string maps to bytes, read off the tokenizer's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pieces {
    /// GPT-2 byte-level: every code point stands for one byte.
    ByteLevel,
    /// SentencePiece-like: `▁` is a space, `<0xXX>` is a byte.
    Metaspace,
    /// Anything else: ask the library to decode the token alone.
    Library,
}

pub struct HfTokenizer {
    /// Splits added special tokens out of the text.
    parse: tokenizers::Tokenizer,
    /// Encodes special-token text as plain text.
    plain: tokenizers::Tokenizer,
    pieces: Pieces,
    char_byte: HashMap<char, u8>,
    special: Vec<bool>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}

impl HfTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
        let parse = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut plain = parse.clone();
        plain.set_encode_special_tokens(true);
        let dec = json
            .get("decoder")
            .map(|d| d.to_string())
            .unwrap_or_default();
        let pieces = if dec.contains("\"ByteLevel\"") {
            Pieces::ByteLevel
        } else if dec.contains("\"Metaspace\"")
            || dec.contains("ByteFallback")
            || dec.contains('\u{2581}')
        {
            Pieces::Metaspace
        } else {
            Pieces::Library
        };
        let n = parse.get_vocab_size(true);
        let mut special = vec![false; n];
        for (id, tok) in parse.get_added_tokens_decoder() {
            if tok.special && (id as usize) < n {
                special[id as usize] = true;
            }
        }
        // BOS/EOS and whether BOS is added come from tokenizer_config.json beside it, if any.
        let cfg: serde_json::Value = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let tok_id = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            parse.token_to_id(s)
        };
        let char_byte = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(HfTokenizer {
            bos: tok_id("bos_token"),
            eos: tok_id("eos_token"),
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            parse,
            plain,
            pieces,
            char_byte,
            special,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.parse.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, String> {
        let t = if parse_special {
            &self.parse
        } else {
            &self.plain
        };
        t.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.parse.id_to_token(id)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.parse.token_to_id(text)
    }

    /// The bytes of one token.
    pub fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(text) = self.parse.id_to_token(id) else {
            return;
        };
        if self.is_special(id) {
            out.extend_from_slice(text.as_bytes());
            return;
        }
        match self.pieces {
            Pieces::ByteLevel => {
                for c in text.chars() {
                    match self.char_byte.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend_from_slice(c.to_string().as_bytes()),
                    }
                }
            }
            Pieces::Metaspace => {
                let hex = text
                    .strip_prefix("<0x")
                    .and_then(|t| t.strip_suffix('>'))
                    .filter(|h| h.len() == 2);
                if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(b);
                } else {
                    out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes());
                }
            }
            Pieces::Library => {
                if let Ok(s) = self.parse.decode(&[id], false) {
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
    }
}
