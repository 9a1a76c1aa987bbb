//! Pre-tokenizers: split text into words before byte-level BPE, as `tokenizer.ggml.pre` says.
//!
//! Each splitter implements one well-known regex as a hand-written scanner over code points
//! (no backtracking regex engine, linear time on any input):
//!
//! - `Gpt2`:   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! - `Smollm`: first isolate every `\p{N}` code point, then `Gpt2` inside each piece
//!   (StarCoder-style; also refact, codeshell, command-r)
//! - `Llama3`: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//!   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
//! - `Qwen2`: `Llama3` with single digits (`\p{N}` instead of `\p{N}{1,3}`)
//!
//! Text that no alternative matches becomes a piece of its own, one code point long.

use unicode_general_category::{get_general_category, GeneralCategory as G};

/// Which pre-tokenizer a BPE vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    Gpt2,
    Smollm,
    Llama3,
    Qwen2,
}

impl PreTokenizer {
    /// From GGUF `tokenizer.ggml.pre`; `None` for names kojo does not implement.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::Smollm,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gpt2 => "gpt2",
            Self::Smollm => "smollm",
            Self::Llama3 => "llama3",
            Self::Qwen2 => "qwen2",
        }
    }

    /// Split `text` into pieces (byte ranges that tile `text`).
    pub fn split<'a>(self, text: &'a str) -> Vec<&'a str> {
        let cps: Vec<(usize, char)> = text.char_indices().collect();
        let mut bounds = Vec::new(); // end index (in code points) of each piece
        match self {
            Self::Gpt2 => gpt2(&cps, 0, cps.len(), &mut bounds),
            Self::Llama3 => llama3(&cps, 0, cps.len(), 3, &mut bounds),
            Self::Qwen2 => llama3(&cps, 0, cps.len(), 1, &mut bounds),
            Self::Smollm => {
                let mut start = 0;
                for i in 0..cps.len() {
                    if flags(cps[i].1).number {
                        gpt2(&cps, start, i, &mut bounds);
                        bounds.push(i + 1);
                        start = i + 1;
                    }
                }
                gpt2(&cps, start, cps.len(), &mut bounds);
            }
        }
        let byte_at = |i: usize| if i < cps.len() { cps[i].0 } else { text.len() };
        let mut out = Vec::with_capacity(bounds.len());
        let mut prev = 0;
        for end in bounds {
            if end > prev {
                out.push(&text[byte_at(prev)..byte_at(end)]);
                prev = end;
            }
        }
        out
    }
}

#[derive(Clone, Copy, Default)]
struct Flags {
    letter: bool,
    number: bool,
    whitespace: bool,
    /// Unassigned code points (and out-of-range positions) match no class.
    defined: bool,
}

fn flags(c: char) -> Flags {
    let cat = get_general_category(c);
    Flags {
        letter: matches!(
            cat,
            G::UppercaseLetter
                | G::LowercaseLetter
                | G::TitlecaseLetter
                | G::ModifierLetter
                | G::OtherLetter
        ),
        number: matches!(cat, G::DecimalNumber | G::LetterNumber | G::OtherNumber),
        whitespace: c.is_whitespace(),
        defined: cat != G::Unassigned,
    }
}

/// Code points `[lo, hi)` of `cps`, with out-of-range reads as "nothing".
struct Span<'a> {
    cps: &'a [(usize, char)],
    lo: usize,
    hi: usize,
}

impl Span<'_> {
    fn cp(&self, i: usize) -> Option<char> {
        (i >= self.lo && i < self.hi).then(|| self.cps[i].1)
    }
    fn fl(&self, i: usize) -> Flags {
        self.cp(i).map(flags).unwrap_or_default()
    }
    fn is_punct(&self, i: usize) -> bool {
        let f = self.fl(i);
        f.defined && !(f.whitespace || f.letter || f.number)
    }
    /// Length of a contraction (`'s`, `'ll`, ...) starting at `i`, 0 if none.
    fn contraction(&self, i: usize, ignore_case: bool) -> usize {
        if self.cp(i) != Some('\'') {
            return 0;
        }
        let low = |c: Option<char>| {
            c.map(|c| {
                if ignore_case {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
        };
        let (a, b) = (low(self.cp(i + 1)), low(self.cp(i + 2)));
        match (a, b) {
            (Some('s' | 't' | 'm' | 'd'), _) => 2,
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
            _ => 0,
        }
    }
    fn whitespace_run(&self, i: usize) -> usize {
        let mut n = 0;
        while self.fl(i + n).whitespace {
            n += 1;
        }
        n
    }
    /// `\s+(?!\S)|\s+`, or one unmatched code point: where the piece starting at `pos` ends.
    fn whitespace_piece(&self, pos: usize) -> usize {
        let ws = self.whitespace_run(pos);
        if ws > 1 && pos + ws < self.hi {
            pos + ws - 1 // leave the last space to lead the next word
        } else {
            pos + ws.max(1)
        }
    }
}

fn gpt2(cps: &[(usize, char)], lo: usize, hi: usize, out: &mut Vec<usize>) {
    let s = Span { cps, lo, hi };
    let mut pos = lo;
    while pos < hi {
        let n = s.contraction(pos, false);
        if n > 0 {
            pos += n;
            out.push(pos);
            continue;
        }
        // optional leading space, then a run of one class
        let lead = usize::from(s.cp(pos) == Some(' '));
        let f = s.fl(pos + lead);
        let class: Option<fn(&Span, usize) -> bool> = if f.letter {
            Some(|s, i| s.fl(i).letter)
        } else if f.number {
            Some(|s, i| s.fl(i).number)
        } else if s.is_punct(pos + lead) {
            Some(|s, i| s.is_punct(i))
        } else {
            None
        };
        if let Some(class) = class {
            pos += lead;
            while class(&s, pos) {
                pos += 1;
            }
            out.push(pos);
            continue;
        }
        pos = s.whitespace_piece(pos);
        out.push(pos);
    }
}

/// Llama 3's regex; digits are grouped up to `max_digits` (3; Qwen2: 1).
fn llama3(cps: &[(usize, char)], lo: usize, hi: usize, max_digits: usize, out: &mut Vec<usize>) {
    let s = Span { cps, lo, hi };
    let mut pos = lo;
    while pos < hi {
        let n = s.contraction(pos, true);
        if n > 0 {
            pos += n;
            out.push(pos);
            continue;
        }
        let c = s.cp(pos);
        let f = s.fl(pos);
        let crlf = |c: Option<char>| matches!(c, Some('\r' | '\n'));
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(crlf(c) || f.number) && (f.letter || s.fl(pos + 1).letter) {
            pos += 1;
            while s.fl(pos).letter {
                pos += 1;
            }
            out.push(pos);
            continue;
        }
        // \p{N}{1,max_digits}
        if f.number {
            let mut k = 0;
            while k < max_digits && s.fl(pos).number {
                pos += 1;
                k += 1;
            }
            out.push(pos);
            continue;
        }
        // ' '?[^\s\p{L}\p{N}]+[\r\n]*
        let lead = usize::from(c == Some(' '));
        if s.is_punct(pos + lead) {
            pos += lead;
            while s.is_punct(pos) {
                pos += 1;
            }
            while crlf(s.cp(pos)) {
                pos += 1;
            }
            out.push(pos);
            continue;
        }
        // \s*[\r\n]+ : the longest whitespace run that ends in \r or \n
        let ws = s.whitespace_run(pos);
        if let Some(last_nl) = (0..ws).rev().find(|&k| crlf(s.cp(pos + k))) {
            pos += last_nl + 1;
            out.push(pos);
            continue;
        }
        pos = s.whitespace_piece(pos);
        out.push(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_splits_like_the_regex() {
        let p = PreTokenizer::Gpt2.split("Hello world's  end 123!! \n x");
        assert_eq!(
            p,
            vec!["Hello", " world", "'s", " ", " end", " 123", "!!", " \n", " x"]
        );
    }

    #[test]
    fn smollm_isolates_digits() {
        let p = PreTokenizer::Smollm.split("x 1234");
        assert_eq!(p, vec!["x", " ", "1", "2", "3", "4"]);
    }

    #[test]
    fn qwen2_splits_single_digits() {
        assert_eq!(
            PreTokenizer::Qwen2.split("abc 1234\n\n  def"),
            ["abc", " ", "1", "2", "3", "4", "\n\n", " ", " def"]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three_and_newlines() {
        let p = PreTokenizer::Llama3.split("abc 1234567\n\n  def");
        assert_eq!(p, vec!["abc", " ", "123", "456", "7", "\n\n", " ", " def"]);
        let p = PreTokenizer::Llama3.split("I'M here");
        assert_eq!(p, vec!["I", "'M", " here"]);
    }

    #[test]
    fn pieces_tile_the_input() {
        for pt in [
            PreTokenizer::Gpt2,
            PreTokenizer::Smollm,
            PreTokenizer::Llama3,
            PreTokenizer::Qwen2,
        ] {
            for t in [
                "",
                " ",
                "日本語 テキスト",
                "a\u{0378}b",
                "  \t\n",
                "'",
                "x'",
            ] {
                assert_eq!(pt.split(t).concat(), t, "{pt:?} {t:?}");
            }
        }
    }
}
