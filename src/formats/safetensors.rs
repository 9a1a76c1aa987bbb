//! Hugging Face safetensors checkpoints (one file, or shards listed in
//! `model.safetensors.index.json`), memory-mapped.
//!
//! Layout of one file: `header_len: u64 LE | JSON header {name: {dtype, shape, data_offsets}} |
//! data`. The `safetensors` crate validates the header (size limit, UTF-8, JSON, offsets that tile
//! the data exactly, sizes that match dtype × shape); kojo wraps its errors with the file name and
//! checks every data range again before slicing. F32, F16 and BF16 tensors convert to f32; any
//! other dtype is an error only when that tensor is used.

use super::error::{FormatError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor of a checkpoint.
#[derive(Debug, Clone)]
pub struct StTensor {
    pub name: String,
    pub dtype: Dtype,
    /// Row-major (PyTorch order): the last dimension is contiguous.
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: Option<Mmap>,
    bytes: Vec<u8>,
}

impl Shard {
    fn data(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&self.bytes)
    }
}

/// A (possibly sharded) safetensors checkpoint.
pub struct SafetensorsModel {
    shards: Vec<Shard>,
    /// Sorted by name.
    pub tensors: BTreeMap<String, StTensor>,
}

fn st_error(path: &Path, e: safetensors::SafeTensorError) -> FormatError {
    FormatError::new(
        path,
        "header",
        0,
        format!("invalid safetensors header: {e}"),
    )
}

impl SafetensorsModel {
    /// Open `path`: a `.safetensors` file, an `.index.json`, or a folder holding
    /// `model.safetensors` or `model.safetensors.index.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (index, single) = if path.is_dir() {
            let idx = path.join("model.safetensors.index.json");
            if idx.exists() {
                (Some(idx), None)
            } else {
                (None, Some(path.join("model.safetensors")))
            }
        } else if path.to_string_lossy().ends_with(".json") {
            (Some(path.to_path_buf()), None)
        } else {
            (None, Some(path.to_path_buf()))
        };
        let files = match (index, single) {
            (Some(idx), _) => shard_files(&idx)?,
            (None, Some(f)) => vec![f],
            (None, None) => unreachable!(),
        };
        let mut model = SafetensorsModel {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for f in files {
            let file = File::open(&f)
                .map_err(|e| FormatError::new(&f, "file", 0, format!("cannot open: {e}")))?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let map =
                if len == 0 {
                    None
                } else {
                    // SAFETY: read-only map of a model file that kojo never writes.
                    Some(unsafe { Mmap::map(&file) }.map_err(|e| {
                        FormatError::new(&f, "file", 0, format!("cannot mmap: {e}"))
                    })?)
                };
            model.add_shard(Shard {
                path: f,
                map,
                bytes: Vec::new(),
            })?;
        }
        Ok(model)
    }

    /// Parse one safetensors image held in memory (`path` only names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<Self> {
        let mut model = SafetensorsModel {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        model.add_shard(Shard {
            path: path.as_ref().to_path_buf(),
            map: None,
            bytes,
        })?;
        Ok(model)
    }

    fn add_shard(&mut self, shard: Shard) -> Result<()> {
        let idx = self.shards.len();
        let data = shard.data();
        let (header_len, meta): (usize, Metadata) =
            SafeTensors::read_metadata(data).map_err(|e| st_error(&shard.path, e))?;
        let base = 8usize
            .checked_add(header_len)
            .ok_or_else(|| FormatError::new(&shard.path, "header_len", 0, "overflows"))?;
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let start = base.checked_add(s);
            let end = base.checked_add(e);
            let (start, end) = match (start, end) {
                (Some(a), Some(b)) if a <= b && b <= data.len() => (a, b),
                _ => {
                    return Err(FormatError::new(
                        &shard.path,
                        format!("tensor '{name}'.data_offsets"),
                        8,
                        format!("[{s}, {e}) lies outside the data section"),
                    ))
                }
            };
            if self.tensors.contains_key(&name) {
                return Err(FormatError::new(
                    &shard.path,
                    format!("tensor '{name}'"),
                    8,
                    "appears in more than one shard",
                ));
            }
            let t = StTensor {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                shard: idx,
                start,
                end,
            };
            self.tensors.insert(name, t);
        }
        self.shards.push(shard);
        Ok(())
    }

    pub fn tensor(&self, name: &str) -> Option<&StTensor> {
        self.tensors.get(name)
    }

    pub fn shard_path(&self, t: &StTensor) -> &Path {
        &self.shards[t.shard].path
    }

    /// Raw bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&StTensor, &[u8])> {
        let t = self.tensor(name).ok_or_else(|| {
            let file = self
                .shards
                .first()
                .map(|s| s.path.as_path())
                .unwrap_or(Path::new("?"));
            FormatError::new(file, format!("tensor '{name}'"), 0, "no such tensor")
        })?;
        let data = self.shards[t.shard].data();
        Ok((t, &data[t.start..t.end]))
    }

    /// A tensor converted to f32 (row-major).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (t, b) = self.tensor_bytes(name)?;
        let out = match t.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(FormatError::new(
                    self.shard_path(t),
                    format!("tensor '{name}'.dtype"),
                    8,
                    format!("dtype {other:?} is not supported (F32, F16, BF16 are)"),
                ))
            }
        };
        Ok(out)
    }
}

/// The shard files named by a `model.safetensors.index.json`, in first-use order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| FormatError::new(index, "file", 0, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| FormatError::new(index, "json", 0, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| FormatError::new(index, "weight_map", 0, "missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| {
            FormatError::new(index, format!("weight_map['{name}']"), 0, "not a string")
        })?;
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(FormatError::new(
                index,
                format!("weight_map['{name}']"),
                0,
                format!("shard name '{f}' must be a plain file name"),
            ));
        }
        let p = dir.join(f);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    Ok(files)
}
