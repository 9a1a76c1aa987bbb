//! Byte-level BPE (GPT-2 style): bytes map to printable code points, words from the
//! pre-tokenizer are merged by rank (lowest rank first, leftmost on ties) until no merge applies.

use super::pretok::PreTokenizer;
use super::vocab::Vocab;
use crate::formats::{FormatError, GgufFile};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's reversible byte → code point map: printable Latin-1 bytes map to themselves, the
/// rest to U+0100 upwards in byte order.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let keep = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if keep {
            b as char
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

pub struct Bpe {
    pre: PreTokenizer,
    /// Whole-word lookup before merging (Llama 3's `ignore_merges`).
    ignore_merges: bool,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    /// Symbol strings: ids `< vocab.len()` are tokens; larger ids are merge parts that are not
    /// tokens themselves.
    sym_id: HashMap<String, u32>,
    /// (left symbol, right symbol) → (rank, merged symbol)
    merges: HashMap<(u32, u32), (u32, u32)>,
}

impl Bpe {
    pub fn from_gguf(g: &GgufFile, vocab: &Vocab) -> Result<Self, FormatError> {
        let pre_name = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre = PreTokenizer::from_gguf_name(pre_name).ok_or_else(|| {
            g.meta_error("tokenizer.ggml.pre", format!("pre-tokenizer '{pre_name}' is not supported (the gpt2, smollm, llama3 and qwen2 families are)"))
        })?;
        let merges = super::vocab::string_array(g, "tokenizer.ggml.merges")?.ok_or_else(|| {
            g.meta_error(
                "tokenizer.ggml.merges",
                "missing (a gpt2 tokenizer needs merges)",
            )
        })?;
        Self::new(vocab, pre, &merges).map_err(|m| g.meta_error("tokenizer.ggml.merges", m))
    }

    pub fn new(vocab: &Vocab, pre: PreTokenizer, merges: &[String]) -> Result<Self, String> {
        let byte_char = byte_to_char_table();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut sym_id: HashMap<String, u32> = vocab.token_to_id.clone();
        let mut next = vocab.len() as u32;
        let mut intern = |s: &str, sym_id: &mut HashMap<String, u32>| -> u32 {
            if let Some(&id) = sym_id.get(s) {
                return id;
            }
            sym_id.insert(s.to_string(), next);
            next += 1;
            next - 1
        };
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // "left right": split at the first space that is not the first character
            let split = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            let Some(at) = split else {
                return Err(format!(
                    "merge {rank} ({m:?}) is not two symbols separated by a space"
                ));
            };
            let (l, r) = (&m[..at], &m[at + 1..]);
            if r.is_empty() {
                return Err(format!("merge {rank} ({m:?}) has an empty right side"));
            }
            let li = intern(l, &mut sym_id);
            let ri = intern(r, &mut sym_id);
            let merged = format!("{l}{r}");
            let mi = intern(&merged, &mut sym_id);
            table.entry((li, ri)).or_insert((rank as u32, mi));
        }
        Ok(Bpe {
            pre,
            ignore_merges: pre == PreTokenizer::Llama3,
            byte_char,
            char_byte,
            sym_id,
            merges: table,
        })
    }

    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Tokenize plain text (no special tokens) and append ids to `out`.
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        for piece in self.pre.split(text) {
            word.clear();
            word.extend(piece.bytes().map(|b| self.byte_char[b as usize]));
            self.encode_word(vocab, &word, out);
        }
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(id) = vocab.id(word) {
                out.push(id);
                return;
            }
        }
        // symbols: (byte start, byte end, symbol id or u32::MAX if unknown), linked list
        struct Sym {
            start: usize,
            end: usize,
            id: u32,
            prev: usize,
            next: usize,
        }
        const NONE: usize = usize::MAX;
        let mut syms: Vec<Sym> = word
            .char_indices()
            .enumerate()
            .map(|(k, (i, c))| {
                let end = i + c.len_utf8();
                Sym {
                    start: i,
                    end,
                    id: self.sym_id.get(&word[i..end]).copied().unwrap_or(u32::MAX),
                    prev: k.wrapping_sub(1), // NONE for the first
                    next: k + 1,
                }
            })
            .collect();
        let n = syms.len();
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        // heap of (rank, left index) with the pair's expected symbol ids for validation
        let mut heap: BinaryHeap<Reverse<(u32, usize, u32, u32)>> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: usize| {
            if l == NONE || syms[l].next == NONE {
                return;
            }
            let r = syms[l].next;
            if let Some(&(rank, _)) = self.merges.get(&(syms[l].id, syms[r].id)) {
                heap.push(Reverse((rank, l, syms[l].id, syms[r].id)));
            }
        };
        for i in 0..n {
            push(&mut heap, &syms, i);
        }
        while let Some(Reverse((_, l, lid, rid))) = heap.pop() {
            let r = syms[l].next;
            if syms[l].id != lid || r == NONE || syms[r].id != rid || syms[l].end == syms[l].start {
                continue; // stale: one side has changed since this pair was queued
            }
            let (_, merged) = self.merges[&(lid, rid)];
            syms[l].end = syms[r].end;
            syms[l].id = merged;
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn != NONE {
                syms[rn].prev = l;
            }
            syms[r].start = syms[r].end; // dead
            syms[r].id = u32::MAX;
            push(&mut heap, &syms, syms[l].prev);
            push(&mut heap, &syms, l);
        }
        let mut i = if n == 0 { NONE } else { 0 };
        while i != NONE {
            let s = &syms[i];
            if (s.id as usize) < vocab.len() {
                out.push(s.id);
            } else {
                // not a token: fall back to single-byte tokens of its text, skipping what has none
                for b in word[s.start..s.end].bytes() {
                    if let Some(id) = std::str::from_utf8(&[b]).ok().and_then(|t| vocab.id(t)) {
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
    }

    /// The bytes a normal token stands for.
    pub fn decode_token(&self, text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            match self.char_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}
