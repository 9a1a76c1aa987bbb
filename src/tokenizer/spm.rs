//! SentencePiece-style BPE over scores (GGUF `tokenizer.ggml.model = "llama"`, as Llama 2 and
//! Gemma use): spaces become `▁`, the text splits into code points, and the adjacent pair whose
//! concatenation is the highest-scoring vocabulary entry merges first (leftmost on ties). Code
//! points that end up outside the vocabulary fall back to `<0xXX>` byte tokens.

use super::vocab::{TokenType, Vocab};
use std::collections::BinaryHeap;

pub const SPACE: char = '\u{2581}';

#[derive(PartialEq)]
struct Pair {
    score: f32,
    left: usize,
    size: usize,
}

impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pair {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

pub struct Spm {
    byte_tokens: [Option<u32>; 256],
}

impl Spm {
    pub fn new(vocab: &Vocab) -> Self {
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<0x{b:02X}>")).or_else(|| {
                std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| vocab.id(s))
            });
        }
        Spm { byte_tokens }
    }

    /// Tokenize one text fragment (already prefixed with a space where wanted).
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let text: String = text
            .chars()
            .map(|c| if c == ' ' { SPACE } else { c })
            .collect();
        struct Sym {
            start: usize,
            end: usize,
            prev: usize,
            next: usize,
        }
        const NONE: usize = usize::MAX;
        let mut syms: Vec<Sym> = text
            .char_indices()
            .enumerate()
            .map(|(k, (i, c))| Sym {
                start: i,
                end: i + c.len_utf8(),
                prev: k.wrapping_sub(1), // NONE for the first
                next: k + 1,
            })
            .collect();
        let n = syms.len();
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        let mut heap = BinaryHeap::new();
        let try_pair = |heap: &mut BinaryHeap<Pair>, syms: &[Sym], l: usize| {
            if l == NONE || syms[l].next == NONE {
                return;
            }
            let r = syms[l].next;
            if let Some(id) = vocab.id(&text[syms[l].start..syms[r].end]) {
                let score = vocab.scores.get(id as usize).copied().unwrap_or(0.0);
                heap.push(Pair {
                    score,
                    left: l,
                    size: syms[r].end - syms[l].start,
                });
            }
        };
        for i in 0..n {
            try_pair(&mut heap, &syms, i);
        }
        while let Some(p) = heap.pop() {
            let l = p.left;
            let r = syms[l].next;
            let alive = syms[l].end > syms[l].start;
            if !alive || r == NONE || syms[r].end - syms[l].start != p.size {
                continue;
            }
            syms[l].end = syms[r].end;
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn != NONE {
                syms[rn].prev = l;
            }
            syms[r].end = syms[r].start;
            try_pair(&mut heap, &syms, syms[l].prev);
            try_pair(&mut heap, &syms, l);
        }
        let mut i = if n == 0 { NONE } else { 0 };
        while i != NONE {
            let piece = &text[syms[i].start..syms[i].end];
            match vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(vocab.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = syms[i].next;
        }
    }

    /// The bytes a token stands for.
    pub fn decode_token(&self, vocab: &Vocab, id: u32, out: &mut Vec<u8>) {
        let text = &vocab.tokens[id as usize];
        match vocab.types[id as usize] {
            TokenType::Byte => {
                let hex = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'));
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(text.as_bytes()),
                }
            }
            TokenType::Normal => {
                for c in text.chars() {
                    let c = if c == SPACE { ' ' } else { c };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            _ => out.extend_from_slice(text.as_bytes()),
        }
    }
}
