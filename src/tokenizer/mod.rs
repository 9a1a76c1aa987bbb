//! Text ↔ token ids, and prompts from chat messages.
//!
//! - [`vocab`]: GGUF vocabularies, special-token partitioning
//! - [`pretok`]: pre-tokenizers for byte-level BPE (`tokenizer.ggml.pre`)
//! - [`bpe`]: GPT-2 style byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`)
//! - [`spm`]: SentencePiece-style BPE over scores with byte fallback (`"llama"`, as Gemma uses)
//! - [`hf`]: `tokenizer.json` through the `tokenizers` crate
//! - [`stream`]: incremental detokenization that never splits a UTF-8 character
//! - [`template`]: chat templates (Jinja, rendered with minijinja)
//!
//! Special tokens (control tokens such as `<|im_start|>`) are recognised in text only when the
//! caller asks (`parse_special`); otherwise they are ordinary text. User-defined tokens are always
//! recognised, as in llama.cpp and HF tokenizers.

pub mod bpe;
pub mod hf;
pub mod pretok;
pub mod spm;
pub mod stream;
pub mod template;
pub mod vocab;

use crate::formats::{FormatError, GgufFile};
use std::path::Path;
use vocab::{Fragment, TokenType, Vocab};

pub use stream::StreamDecoder;
pub use template::ChatTemplate;

enum Model {
    Bpe(bpe::Bpe),
    Spm(spm::Spm),
}

enum Inner {
    Gguf { vocab: Vocab, model: Model },
    Hf(Box<hf::HfTokenizer>),
}

pub struct Tokenizer {
    inner: Inner,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Other(String),
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let vocab = Vocab::from_gguf(g)?;
        let kind = g.get_str("tokenizer.ggml.model").unwrap_or("");
        let model = match kind {
            "gpt2" => Model::Bpe(bpe::Bpe::from_gguf(g, &vocab)?),
            "llama" => Model::Spm(spm::Spm::new(&vocab)),
            other => {
                return Err(g
                    .meta_error(
                        "tokenizer.ggml.model",
                        format!("tokenizer model '{other}' is not supported (gpt2 and llama are)"),
                    )
                    .into())
            }
        };
        Ok(Tokenizer {
            inner: Inner::Gguf { vocab, model },
        })
    }

    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let t = hf::HfTokenizer::from_file(path).map_err(TokenizerError::Other)?;
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(t)),
        })
    }

    /// A short description: `gpt2 BPE (pre-tokenizer smollm)`, `SentencePiece`, `tokenizer.json`.
    pub fn kind(&self) -> String {
        match &self.inner {
            Inner::Gguf {
                model: Model::Bpe(b),
                ..
            } => format!(
                "gpt2 byte-level BPE (pre-tokenizer {})",
                b.pre_tokenizer().name()
            ),
            Inner::Gguf {
                model: Model::Spm(_),
                ..
            } => "llama SentencePiece BPE (scores, byte fallback)".to_string(),
            Inner::Hf(_) => "tokenizer.json (HF tokenizers)".to_string(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Gguf { vocab, .. } => vocab.len(),
            Inner::Hf(h) => h.vocab_size(),
        }
    }

    pub fn bos(&self) -> Option<u32> {
        match &self.inner {
            Inner::Gguf { vocab, .. } => vocab.bos,
            Inner::Hf(h) => h.bos,
        }
    }

    pub fn eos(&self) -> Option<u32> {
        match &self.inner {
            Inner::Gguf { vocab, .. } => vocab.eos,
            Inner::Hf(h) => h.eos,
        }
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        match &self.inner {
            Inner::Gguf { vocab, .. } => vocab.add_bos && vocab.bos.is_some(),
            Inner::Hf(h) => h.add_bos && h.bos.is_some(),
        }
    }

    /// Tokens that end generation: EOS, plus the end-of-turn tokens llama.cpp also treats as
    /// end of generation when the vocabulary has them.
    pub fn end_of_generation(&self) -> Vec<u32> {
        const EOG: [&str; 8] = [
            "<|im_end|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end|>",
            "<|end_of_text|>",
            "<EOT>",
        ];
        let mut ids: Vec<u32> = self.eos().into_iter().collect();
        for text in EOG {
            let id = match &self.inner {
                Inner::Gguf { vocab, .. } => vocab.id(text),
                Inner::Hf(h) => h.token_id(text),
            };
            if let Some(id) = id {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The token's text as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Gguf { vocab, .. } => vocab.tokens.get(id as usize).cloned(),
            Inner::Hf(h) => h.token_text(id),
        }
    }

    /// Tokenize. `add_special` adds BOS/EOS where the model asks for them; `parse_special`
    /// recognises control tokens written in the text.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        match &self.inner {
            Inner::Hf(h) => {
                if add_special && self.adds_bos() {
                    out.extend(h.bos);
                }
                out.extend(
                    h.encode(text, parse_special)
                        .map_err(TokenizerError::Other)?,
                );
            }
            Inner::Gguf { vocab, model } => {
                if add_special && vocab.add_bos {
                    out.extend(vocab.bos);
                }
                let mut prev_special = true;
                for frag in vocab::partition(vocab, text, parse_special) {
                    match (frag, model) {
                        (Fragment::Token(id), _) => {
                            out.push(id);
                            prev_special = true;
                        }
                        (Fragment::Text(t), Model::Bpe(b)) => b.encode(vocab, t, &mut out),
                        (Fragment::Text(t), Model::Spm(s)) => {
                            if vocab.add_space_prefix && prev_special {
                                s.encode(vocab, &format!(" {t}"), &mut out);
                            } else {
                                s.encode(vocab, t, &mut out);
                            }
                            prev_special = false;
                        }
                    }
                }
                if add_special && vocab.add_eos {
                    out.extend(vocab.eos);
                }
            }
        }
        Ok(out)
    }

    /// Append the bytes of one token. Control tokens contribute their text only when
    /// `render_special`; unknown ids contribute nothing.
    pub fn token_bytes(&self, id: u32, render_special: bool, out: &mut Vec<u8>) {
        match &self.inner {
            Inner::Hf(h) => {
                if render_special || !h.is_special(id) {
                    h.token_bytes(id, out)
                }
            }
            Inner::Gguf { vocab, model } => {
                let Some(ty) = vocab.types.get(id as usize).copied() else {
                    return;
                };
                let text = &vocab.tokens[id as usize];
                match ty {
                    TokenType::Control | TokenType::Unknown if !render_special => {}
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                        out.extend_from_slice(text.as_bytes())
                    }
                    TokenType::Unused => {}
                    TokenType::Normal | TokenType::Byte => match model {
                        Model::Bpe(b) => b.decode_token(text, out),
                        Model::Spm(s) => s.decode_token(vocab, id, out),
                    },
                }
            }
        }
    }

    /// An upper bound on the input bytes one token can cover, so that `text.len() / bound`
    /// tokens is a lower bound on `encode(text)`'s length, known without tokenizing. GGUF
    /// vocabularies decode to exactly the bytes they cover (byte-level BPE, SentencePiece's
    /// `▁` is one space of input): the longest token's bytes, plus one for a prefix space.
    /// A tokenizer.json may normalize (NFKC can shrink input several-fold): four times that.
    pub fn max_bytes_per_token(&self) -> usize {
        let mut longest = 1;
        let mut b = Vec::new();
        for id in 0..self.vocab_size() as u32 {
            b.clear();
            self.token_bytes(id, true, &mut b);
            longest = longest.max(b.len());
        }
        match &self.inner {
            Inner::Gguf { .. } => longest + 1,
            Inner::Hf(_) => 4 * (longest + 1),
        }
    }

    /// Ids → text (invalid UTF-8 becomes U+FFFD). Errors on ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Result<String, TokenizerError> {
        let n = self.vocab_size();
        let mut bytes = Vec::new();
        for &id in ids {
            if id as usize >= n {
                return Err(TokenizerError::Other(format!(
                    "token id {id} is outside the vocabulary (size {n})"
                )));
            }
            self.token_bytes(id, render_special, &mut bytes);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
