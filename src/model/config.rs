//! Hyperparameters of a decoder-only transformer, from GGUF metadata (`{arch}.*` keys) or a
//! Hugging Face `config.json`. Every value is checked: present where required, non-zero, within
//! sane limits, and consistent (heads divide evenly).

use crate::formats::{FormatError, GgufFile};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// `llama`, `gemma3`, `qwen2`, ...
    pub arch: String,
    pub name: Option<String>,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub tied_embeddings: bool,
    /// Sliding-window attention span, where the architecture has one.
    pub sliding_window: Option<usize>,
    /// Rotated dimensions per head (partial rotary); `None` = all of `head_dim`.
    pub rope_dim: Option<usize>,
    /// Linear RoPE scaling factor (positions are divided by it); 1 = none.
    pub rope_scale: f64,
    /// RoPE base of sliding-window layers, where it differs (gemma3: 10,000).
    pub rope_base_swa: Option<f64>,
    /// Every `n`-th layer is global, the others use the sliding window (gemma3: 6).
    pub swa_pattern: Option<usize>,
}

const LIMIT: u64 = 1 << 24;

impl ModelConfig {
    fn check(self, err: impl Fn(&str, String) -> FormatError) -> Result<Self, FormatError> {
        for (field, v) in [
            ("n_layers", self.n_layers),
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if v == 0 || v as u64 > LIMIT {
                return Err(err(field, format!("{v} is out of range (1..={LIMIT})")));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(err(
                "n_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return Err(err(
                "rope_base",
                format!("{} must be a positive number", self.rope_base),
            ));
        }
        if let Some(d) = self.rope_dim {
            if d == 0 || d > self.head_dim || d % 2 != 0 {
                return Err(err(
                    "rope_dim",
                    format!("{d} must be even and in 1..={}", self.head_dim),
                ));
            }
        }
        if !(self.rope_scale.is_finite() && self.rope_scale > 0.0) {
            return Err(err(
                "rope_scale",
                format!("{} must be a positive number", self.rope_scale),
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return Err(err(
                "rms_eps",
                format!("{} must be in (0, 1)", self.rms_eps),
            ));
        }
        Ok(self)
    }

    /// From GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, FormatError> {
        let arch = g
            .get_str("general.architecture")
            .ok_or_else(|| g.meta_error("general.architecture", "missing (required)"))?
            .to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, FormatError> {
            let full = key(k);
            let v = g
                .get_u64(&full)
                .ok_or_else(|| g.meta_error(&full, "missing or not an integer (required)"))?;
            usize::try_from(v).map_err(|_| g.meta_error(&full, "too large"))
        };
        let n_heads = req("attention.head_count")?;
        let hidden = req("embedding_length")?;
        let n_kv_heads = match g.get(&key("attention.head_count_kv")) {
            None => n_heads,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| g.meta_error(&key("attention.head_count_kv"), "not an integer"))?
                as usize,
        };
        let head_dim = match g.get_u64(&key("attention.key_length")) {
            Some(v) => v as usize,
            None => {
                if n_heads == 0 || hidden % n_heads != 0 {
                    return Err(g.meta_error(
                        &key("embedding_length"),
                        format!("{hidden} is not divisible by {n_heads} heads"),
                    ));
                }
                hidden / n_heads
            }
        };
        let vocab_size = match g.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .unwrap_or(0),
        };
        let tied_embeddings = g.tensor("output.weight").is_none();
        let default_eps = if arch.starts_with("gemma") {
            1e-6
        } else {
            1e-5
        };
        let cfg = ModelConfig {
            name: g.get_str("general.name").map(str::to_string),
            n_layers: req("block_count")?,
            hidden,
            ffn: req("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length: req("context_length")?,
            rope_base: g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: g
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(default_eps),
            tied_embeddings,
            sliding_window: g
                .get_u64(&key("attention.sliding_window"))
                .map(|v| v as usize),
            rope_dim: g.get_u64(&key("rope.dimension_count")).map(|v| v as usize),
            rope_scale: match g.get_str(&key("rope.scaling.type")) {
                None | Some("linear") => g
                    .get_f64(&key("rope.scaling.factor"))
                    .or_else(|| g.get_f64(&key("rope.scale_linear")))
                    .filter(|f| *f != 0.0)
                    .unwrap_or(1.0),
                Some("none") => 1.0,
                Some(other) => {
                    return Err(g.meta_error(
                        &key("rope.scaling.type"),
                        format!("RoPE scaling '{other}' is not supported (linear only)"),
                    ))
                }
            },
            rope_base_swa: g.get_f64(&key("rope.freq_base_swa")),
            swa_pattern: g
                .get_u64(&key("attention.sliding_window_pattern"))
                .map(|v| v as usize),
            arch,
        };
        cfg.check(|field, msg| FormatError::new(&g.path, format!("hyperparameter {field}"), 0, msg))
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self, FormatError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FormatError::new(path, "file", 0, format!("cannot read: {e}")))?;
        Self::from_hf_json(&text, path)
    }

    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self, FormatError> {
        let c: HfConfig = serde_json::from_str(text).map_err(|e| {
            FormatError::new(
                path,
                format!("json line {} column {}", e.line(), e.column()),
                0,
                format!("invalid config: {e}"),
            )
        })?;
        let arch = match c.model_type.as_deref() {
            Some("llama") | Some("mistral") => "llama".to_string(),
            Some(other) => other.to_string(),
            None => {
                return Err(FormatError::new(
                    path,
                    "model_type",
                    0,
                    "missing (required)",
                ))
            }
        };
        let n_heads = c.num_attention_heads;
        let head_dim = match c.head_dim {
            Some(d) => d,
            None if n_heads > 0 && c.hidden_size % n_heads == 0 => c.hidden_size / n_heads,
            None => {
                return Err(FormatError::new(
                    path,
                    "hidden_size",
                    0,
                    format!(
                        "{} is not divisible by num_attention_heads {n_heads}",
                        c.hidden_size
                    ),
                ))
            }
        };
        let cfg = ModelConfig {
            arch,
            name: c.name_or_path,
            n_layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            ffn: c.intermediate_size,
            n_heads,
            n_kv_heads: c.num_key_value_heads.unwrap_or(n_heads),
            head_dim,
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings.unwrap_or(2048),
            rope_base: c.rope_theta.unwrap_or(10_000.0),
            rms_eps: c.rms_norm_eps.unwrap_or(1e-5),
            tied_embeddings: c.tie_word_embeddings.unwrap_or(false),
            sliding_window: c.sliding_window,
            rope_dim: None,
            rope_scale: hf_rope_scale(&c.rope_scaling, path)?,
            rope_base_swa: None,
            swa_pattern: None,
        };
        cfg.check(|field, msg| FormatError::new(path, field, 0, msg))
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    rope_scaling: Option<serde_json::Value>,
}

/// `rope_scaling` of a Hugging Face config: linear (or none) is supported; the others change
/// the frequencies in ways kojo does not implement yet, so they are an error, not a silent
/// mistake.
fn hf_rope_scale(v: &Option<serde_json::Value>, path: &Path) -> Result<f64, FormatError> {
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else {
        return Ok(1.0);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match kind {
        "linear" => v.get("factor").and_then(|f| f.as_f64()).ok_or_else(|| {
            FormatError::new(path, "rope_scaling.factor", 0, "missing or not a number")
        }),
        "default" => Ok(1.0),
        other => Err(FormatError::new(
            path,
            "rope_scaling",
            0,
            format!("RoPE scaling '{other}' is not supported (linear only)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_checks_values() {
        let p = Path::new("config.json");
        let ok = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}"#;
        let c = ModelConfig::from_hf_json(ok, p).unwrap();
        assert_eq!((c.head_dim, c.n_kv_heads), (16, 2));
        let bad = ok.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        let e = ModelConfig::from_hf_json(&bad, p).unwrap_err();
        assert!(e.to_string().contains("n_kv_heads"), "{e}");
        let zero = ok.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":0");
        assert!(ModelConfig::from_hf_json(&zero, p).is_err());
        let missing = ok.replace("\"vocab_size\":100", "\"x\":1");
        assert!(ModelConfig::from_hf_json(&missing, p)
            .unwrap_err()
            .to_string()
            .contains("vocab_size"));
    }
}
