//! Opening a model path: a GGUF file, or a Hugging Face folder (`config.json`,
//! `*.safetensors`, `tokenizer.json`, `tokenizer_config.json`).

use super::config::ModelConfig;
use super::random::RandomModel;
use crate::formats::safetensors::SafetensorsModel;
use crate::formats::GgufFile;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

pub enum ModelSource {
    Gguf(GgufFile),
    Hf {
        dir: PathBuf,
        weights: SafetensorsModel,
        config: ModelConfig,
    },
    /// `random:<shape>[:<type>[:<seed>]]`: weights generated when asked for, no file.
    Random(RandomModel, PathBuf),
}

impl ModelSource {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(spec) = path.to_str().filter(|s| s.starts_with("random:")) {
            if !path.exists() {
                return Ok(ModelSource::Random(
                    RandomModel::parse(spec)?,
                    path.to_path_buf(),
                ));
            }
        }
        if !path.exists() {
            bail!("{}: no such file or folder", path.display());
        }
        if path.is_dir() {
            let config = ModelConfig::from_hf_config(&path.join("config.json"))?;
            let weights = SafetensorsModel::open(path)?;
            return Ok(ModelSource::Hf {
                dir: path.to_path_buf(),
                weights,
                config,
            });
        }
        Ok(ModelSource::Gguf(GgufFile::open(path)?))
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::Gguf(g) => Ok(ModelConfig::from_gguf(g)?),
            ModelSource::Hf { config, .. } => Ok(config.clone()),
            ModelSource::Random(m, _) => Ok(m.cfg.clone()),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            ModelSource::Gguf(g) => Ok(Tokenizer::from_gguf(g)?),
            ModelSource::Hf { dir, .. } => {
                let p = dir.join("tokenizer.json");
                Ok(Tokenizer::from_tokenizer_json(&p)
                    .with_context(|| format!("loading {}", p.display()))?)
            }
            ModelSource::Random(m, _) => {
                bail!("{}: a random-weight model has no tokenizer", m.spec)
            }
        }
    }

    /// The template source, if the model ships one.
    pub fn chat_template_source(&self) -> Result<Option<String>> {
        match self {
            ModelSource::Gguf(g) => Ok(g.get_str("tokenizer.chat_template").map(str::to_string)),
            ModelSource::Random(..) => Ok(None),
            ModelSource::Hf { dir, .. } => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    return Ok(Some(
                        std::fs::read_to_string(&jinja)
                            .with_context(|| format!("reading {}", jinja.display()))?,
                    ));
                }
                let cfg = dir.join("tokenizer_config.json");
                let Ok(text) = std::fs::read_to_string(&cfg) else {
                    return Ok(None);
                };
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", cfg.display()))?;
                Ok(match v.get("chat_template") {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    // a list of named templates: take "default"
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                    _ => None,
                })
            }
        }
    }

    /// The model's chat template, ready to render.
    pub fn chat_template(&self, tok: &Tokenizer) -> Result<ChatTemplate> {
        self.chat_template_with(tok, None)
    }

    /// The chat template `given` (`--chat-template`: a file, or the template itself), else
    /// the model's own.
    pub fn chat_template_with(&self, tok: &Tokenizer, given: Option<&str>) -> Result<ChatTemplate> {
        let src = match given {
            Some(arg) => template_arg(arg)?,
            None => self.chat_template_source()?.ok_or_else(|| {
                anyhow!(
                    "{}: the model has no chat template (give one with --chat-template)",
                    self.path().display()
                )
            })?,
        };
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
        ChatTemplate::new(&src, &text(tok.bos()), &text(tok.eos())).map_err(|e| match given {
            Some(arg) if arg.len() < 256 && !arg.contains('\n') => {
                anyhow!("--chat-template {arg}: {e}")
            }
            Some(_) => anyhow!("--chat-template: {e}"),
            None => anyhow!("{}: {e}", self.path().display()),
        })
    }

    /// Drops this process's resident pages of the mapped file under `data` (a tensor slice
    /// that was copied out); later reads fault them back in from the file.
    pub fn release(&self, data: &[u8]) {
        if let ModelSource::Gguf(g) = self {
            g.release(data);
        }
    }

    /// Number of weights over all tensors.
    pub fn n_params(&self) -> u64 {
        match self {
            ModelSource::Gguf(g) => g.tensors.iter().map(|t| t.n_elements()).sum(),
            ModelSource::Hf { weights, .. } => weights
                .tensors
                .values()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum(),
            ModelSource::Random(m, _) => m.n_params(),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(g) => &g.path,
            ModelSource::Hf { dir, .. } => dir,
            ModelSource::Random(_, p) => p,
        }
    }
}

/// A `--chat-template` argument as vLLM and llama-server take it: the path of a file holding a
/// Jinja template, or the template itself (it has `{{` or `{%`).
pub fn template_arg(arg: &str) -> Result<String> {
    let p = Path::new(arg);
    if p.is_file() {
        return std::fs::read_to_string(p).with_context(|| format!("reading {arg}"));
    }
    if arg.contains("{{") || arg.contains("{%") {
        return Ok(arg.to_string());
    }
    bail!("--chat-template {arg}: no such file, and not a template (no `{{{{` or `{{%`)")
}
