//! Streaming detokenization that never emits part of a UTF-8 character.
//!
//! Token bytes accumulate in a small buffer; each push emits the longest prefix that is complete
//! UTF-8. Bytes that can never become valid (an invalid lead byte, a broken sequence) are emitted
//! as U+FFFD at once rather than held, so a bad token cannot stall the stream; an incomplete
//! character still pending at the end comes out as U+FFFD from [`StreamDecoder::finish`].

use super::Tokenizer;

pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    render_special: bool,
    pending: Vec<u8>,
    scratch: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer, render_special: bool) -> Self {
        Self {
            tok,
            render_special,
            pending: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Add one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.scratch.clear();
        self.tok
            .token_bytes(id, self.render_special, &mut self.scratch);
        self.pending.extend_from_slice(&self.scratch);
        drain_utf8(&mut self.pending)
    }

    /// Whatever is left (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Bytes held back because they end in an unfinished character.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// Take the longest complete-UTF-8 prefix out of `buf`; invalid bytes become U+FFFD, an
/// unfinished character at the end stays in `buf`.
pub fn drain_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = buf.len();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // SAFETY-free: from_utf8 just validated this prefix
                out.push_str(std::str::from_utf8(&buf[start..start + valid]).unwrap_or_default());
                start += valid;
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        start += bad;
                    }
                    None => break, // unfinished character at the end: wait for more bytes
                }
            }
        }
    }
    buf.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::drain_utf8;

    #[test]
    fn holds_back_partial_characters() {
        let bytes = "日本🤖".as_bytes();
        let mut buf = Vec::new();
        let mut out = String::new();
        for &b in bytes {
            buf.push(b);
            let s = drain_utf8(&mut buf);
            assert!(s.is_empty() || "日本🤖".contains(&s));
            out += &s;
        }
        assert_eq!(out, "日本🤖");
        assert!(buf.is_empty());
    }

    #[test]
    fn invalid_bytes_do_not_stall() {
        let mut buf = vec![b'a', 0xFF, b'b', 0xE6];
        assert_eq!(drain_utf8(&mut buf), "a\u{FFFD}b");
        assert_eq!(buf, vec![0xE6]);
    }
}
