//! GGUF reader (versions 2 and 3): header, metadata of every value type (arrays nest), tensor
//! infos, alignment and memory-mapped tensor data.
//!
//! Layout: `magic "GGUF" | version u32 | tensor_count u64 | kv_count u64 | kv* | tensor_info* |
//! padding to alignment | tensor data`. A kv is `key: string, type: u32, value`; a tensor info is
//! `name: string, n_dims: u32, ne: [u64; n_dims], type: u32, offset: u64` (offset relative to the
//! start of the data section, a multiple of the alignment).
//!
//! Hostile-input rule: every count, length and offset is checked against the bytes that remain
//! and against a sane limit before it is used; a bad file is a [`FormatError`] naming the file,
//! the field and the byte offset. A tensor of an unknown type is accepted at open and is an error
//! only when its data is asked for.

use super::cursor::Cursor;
use super::error::{FormatError, Result};
use super::quant::{self, GgmlType};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAX_TENSORS: u64 = 1 << 20;
pub const MAX_KV: u64 = 1 << 20;
pub const MAX_ARRAY_DEPTH: usize = 8;
pub const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// One tensor's description; its data is reached through [`GgufFile::tensor_data`].
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Where this tensor's info record starts in the file (for error messages).
    pub info_offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

impl Storage {
    /// `madvise(MADV_DONTNEED)` over the whole pages inside `data`, if it lies in the map.
    fn release(&self, data: &[u8]) {
        let Storage::Mmap(m) = self else { return };
        let base = m.as_ptr() as usize;
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        if start < base || end > base + m.len() {
            return;
        }
        let page = 4096;
        let (lo, hi) = (
            (start - base).div_ceil(page) * page,
            (end - base) / page * page,
        );
        if lo < hi {
            // SAFETY: the map is a read-only private file mapping; dropped pages are read
            // back from the file, unchanged, at the next access.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }
}

/// An opened GGUF file. Metadata keeps file order.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    meta_index: HashMap<String, usize>,
    /// File offset of each metadata record (for error messages).
    meta_offsets: Vec<u64>,
    tensor_index: HashMap<String, usize>,
    storage: Storage,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Lets the resident pages under `data` (a slice of this file) go; see
    /// [`crate::model::ModelSource::release`].
    pub fn release(&self, data: &[u8]) {
        self.storage.release(data)
    }

    /// Open and validate a GGUF file, memory-mapping its data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path)
            .map_err(|e| FormatError::new(path, "file", 0, format!("cannot open: {e}")))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let storage = if len == 0 {
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only; kojo never writes model files. Like every
            // mmap-based loader, it assumes no other process truncates the file while mapped.
            let map = unsafe { Mmap::map(&file) }
                .map_err(|e| FormatError::new(path, "file", 0, format!("cannot mmap: {e}")))?;
            Storage::Mmap(map)
        };
        Self::parse(storage, path)
    }

    /// Parse a GGUF image held in memory (`path` only names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<Self> {
        Self::parse(Storage::Owned(bytes), path.as_ref())
    }

    fn parse(storage: Storage, path: &Path) -> Result<Self> {
        let data = storage.bytes();
        let mut c = Cursor::new(data, path);
        let magic = c.bytes(4, "magic")?;
        if magic != b"GGUF" {
            return Err(c.error(
                "magic",
                0,
                format!("not a GGUF file (magic {:02x?}, want \"GGUF\")", magic),
            ));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(c.error(
                "version",
                4,
                format!("GGUF version {version} is not supported (only 2 and 3)"),
            ));
        }
        // a tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes
        let n_tensors = c.count("tensor_count", 24, MAX_TENSORS)?;
        // a kv is at least 8 (key len) + 4 (type) + 1 (smallest value) bytes
        let n_kv = c.count("kv_count", 13, MAX_KV)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        let mut meta_offsets = Vec::with_capacity(n_kv);
        for i in 0..n_kv {
            let at = c.pos();
            meta_offsets.push(at);
            let key = c.string(&format!("metadata[{i}].key"))?.to_string();
            let field = format!("metadata '{key}'");
            let ty = c.u32(&format!("{field}.type"))?;
            let value = read_value(&mut c, ty, &field, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.error(&field, at, "duplicate metadata key"));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(c.error(
                    "metadata 'general.alignment'",
                    0,
                    format!("must be a power-of-two u32, got {v:?}"),
                ))
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let info_offset = c.pos();
            let name = c.string(&format!("tensor[{i}].name"))?.to_string();
            let field = format!("tensor '{name}'");
            let dims_at = c.pos();
            let n_dims = c.u32(&format!("{field}.n_dims"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.error(
                    &format!("{field}.n_dims"),
                    dims_at,
                    format!("{n_dims} dimensions (must be 1..={MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut total: u64 = 1;
            for d in 0..n_dims {
                let at = c.pos();
                let ne = c.u64(&format!("{field}.ne[{d}]"))?;
                if ne == 0 || ne > i64::MAX as u64 {
                    return Err(c.error(
                        &format!("{field}.ne[{d}]"),
                        at,
                        format!("dimension {ne} out of range"),
                    ));
                }
                total = total
                    .checked_mul(ne)
                    .filter(|&t| t <= i64::MAX as u64)
                    .ok_or_else(|| {
                        c.error(&format!("{field}.ne[{d}]"), at, "element count overflows")
                    })?;
                dims.push(ne);
            }
            let ty = GgmlType::from_id(c.u32(&format!("{field}.type"))?);
            let off_at = c.pos();
            let offset = c.u64(&format!("{field}.offset"))?;
            if offset % alignment != 0 {
                return Err(c.error(
                    &format!("{field}.offset"),
                    off_at,
                    format!("offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.error(&field, info_offset, "duplicate tensor name"));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                info_offset,
            });
        }

        let data_offset = c.pos().div_ceil(alignment) * alignment;
        let file_len = data.len() as u64;
        if n_tensors > 0 && data_offset > file_len {
            return Err(c.error("tensor data", c.pos(), format!("data section starts at {data_offset}, past the end of the file ({file_len} bytes)")));
        }
        let gguf = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            meta_index,
            meta_offsets,
            tensor_index,
            storage,
        };
        // Every tensor of a known type must lie inside the file; unknown types are checked on use.
        for t in &gguf.tensors {
            if t.ty.is_supported() {
                gguf.tensor_range(t)?;
            }
        }
        Ok(gguf)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// An error about metadata, naming this file.
    pub fn meta_error(&self, key: &str, message: impl Into<String>) -> FormatError {
        let offset = self
            .meta_index
            .get(key)
            .map(|&i| self.meta_offsets[i])
            .unwrap_or(0);
        FormatError::new(&self.path, format!("metadata '{key}'"), offset, message)
    }

    fn tensor_range(&self, t: &TensorInfo) -> Result<std::ops::Range<usize>> {
        let field = format!("tensor '{}'", t.name);
        let n = t.n_elements();
        let row_ok =
            t.ty.block_size()
                .is_none_or(|bs| t.dims[0] % bs as u64 == 0);
        if !row_ok {
            return Err(FormatError::new(
                &self.path,
                format!("{field}.ne[0]"),
                t.info_offset,
                format!(
                    "row length {} is not a multiple of the {} block size",
                    t.dims[0],
                    t.ty.name()
                ),
            ));
        }
        let nbytes = t
            .ty
            .bytes_for(n)
            .map_err(|m| FormatError::new(&self.path, format!("{field}.type"), t.info_offset, m))?;
        let len = self.storage.bytes().len() as u64;
        let start = self.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= len => Ok(s as usize..e as usize),
            _ => Err(FormatError::new(
                &self.path,
                format!("{field}.offset"),
                t.info_offset,
                format!(
                    "data [{} + {}, {} bytes) runs past the end of the file ({len} bytes)",
                    self.data_offset, t.offset, nbytes
                ),
            )),
        }
    }

    /// The raw bytes of a tensor (whole blocks of its type).
    pub fn tensor_data(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let t = self.tensor(name).ok_or_else(|| {
            FormatError::new(&self.path, format!("tensor '{name}'"), 0, "no such tensor")
        })?;
        let r = self.tensor_range(t)?;
        Ok((t, &self.storage.bytes()[r]))
    }

    /// A tensor dequantized to f32, in ggml order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (t, data) = self.tensor_data(name)?;
        let n = usize::try_from(t.n_elements()).map_err(|_| {
            FormatError::new(
                &self.path,
                format!("tensor '{name}'"),
                t.info_offset,
                "too large for this machine",
            )
        })?;
        quant::dequantize_to_vec(t.ty, data, n).map_err(|e| {
            FormatError::new(&self.path, format!("tensor '{name}'"), t.info_offset, e.0)
        })
    }
}

fn read_value(c: &mut Cursor<'_>, ty: u32, field: &str, depth: usize) -> Result<Value> {
    let at = c.pos();
    Ok(match ty {
        0 => Value::U8(c.u8(field)?),
        1 => Value::I8(c.i8(field)?),
        2 => Value::U16(c.u16(field)?),
        3 => Value::I16(c.i16(field)?),
        4 => Value::U32(c.u32(field)?),
        5 => Value::I32(c.i32(field)?),
        6 => Value::F32(c.f32(field)?),
        7 => match c.u8(field)? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(c.error(field, at, format!("bool byte must be 0 or 1, got {b}"))),
        },
        8 => Value::String(c.string(field)?.to_string()),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(c.error(
                    field,
                    at,
                    format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                ));
            }
            let elem_ty = c.u32(&format!("{field}.array_type"))?;
            let min = min_value_size(elem_ty).ok_or_else(|| {
                c.error(
                    &format!("{field}.array_type"),
                    at,
                    format!("unknown value type {elem_ty}"),
                )
            })?;
            let n = c.count(&format!("{field}.array_len"), min, u32::MAX as u64)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(c, elem_ty, field, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(c.u64(field)?),
        11 => Value::I64(c.i64(field)?),
        12 => Value::F64(c.f64(field)?),
        other => {
            return Err(c.error(
                &format!("{field}.type"),
                at.saturating_sub(4),
                format!("unknown value type {other}"),
            ))
        }
    })
}

/// The fewest bytes a value of this type takes (for bounding array allocations).
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4 | 5 | 6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        _ => return None,
    })
}
