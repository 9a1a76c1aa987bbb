//! A bounds-checked little-endian reader over a byte slice.
//!
//! Every read checks the remaining length first and fails with a [`FormatError`] naming the
//! field and its byte offset; nothing here can panic or read out of bounds. Lengths that decide
//! an allocation are checked against the bytes that remain before anything is allocated.

use super::error::{FormatError, Result};
use std::path::Path;

pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8], file: &'a Path) -> Self {
        Self { data, pos: 0, file }
    }

    pub fn pos(&self) -> u64 {
        self.pos as u64
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub fn error(&self, field: &str, offset: u64, message: impl Into<String>) -> FormatError {
        FormatError::new(self.file, field, offset, message)
    }

    pub fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(
                field,
                self.pos(),
                format!(
                    "needs {n} bytes but the file ends after {} (truncated?)",
                    self.remaining()
                ),
            ));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    pub fn i8(&mut self, field: &str) -> Result<i8> {
        Ok(self.array::<1>(field)?[0] as i8)
    }
    pub fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub fn i16(&mut self, field: &str) -> Result<i16> {
        Ok(i16::from_le_bytes(self.array(field)?))
    }
    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub fn i32(&mut self, field: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(field)?))
    }
    pub fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    pub fn i64(&mut self, field: &str) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array(field)?))
    }
    pub fn f32(&mut self, field: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }
    pub fn f64(&mut self, field: &str) -> Result<f64> {
        Ok(f64::from_le_bytes(self.array(field)?))
    }

    /// A count of items, each at least `min_item_bytes` long, that must fit in what remains.
    pub fn count(&mut self, field: &str, min_item_bytes: usize, limit: u64) -> Result<usize> {
        let at = self.pos();
        let n = self.u64(field)?;
        if n > limit {
            return Err(self.error(field, at, format!("count {n} exceeds the limit {limit}")));
        }
        let need = (n as u128) * (min_item_bytes as u128);
        if need > self.remaining() as u128 {
            return Err(self.error(
                field,
                at,
                format!(
                    "count {n} needs at least {need} bytes but only {} remain (truncated or corrupt)",
                    self.remaining()
                ),
            ));
        }
        Ok(n as usize)
    }

    /// A GGUF string: u64 length then UTF-8 bytes.
    pub fn string(&mut self, field: &str) -> Result<&'a str> {
        let at = self.pos();
        let n = self.count(field, 1, u32::MAX as u64)?;
        let b = self.bytes(n, field)?;
        std::str::from_utf8(b)
            .map_err(|e| self.error(field, at, format!("string is not valid UTF-8 ({e})")))
    }
}
