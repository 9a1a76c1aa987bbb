//! Weights by their GGUF names (`blk.3.attn_q.weight`), whatever file they come from.
//! Hugging Face names are mapped to GGUF's for the llama family.

use super::ModelSource;
use crate::backend::HostWeight;
use crate::formats::GgmlType;
use anyhow::{bail, Result};
use safetensors::tensor::Dtype;
use std::borrow::Cow;

impl ModelSource {
    /// Whether the file has a tensor of this GGUF name.
    pub fn has_weight(&self, name: &str) -> bool {
        match self {
            ModelSource::Gguf(g) => g.tensor(name).is_some(),
            ModelSource::Hf { weights, .. } => {
                hf_name(name).is_some_and(|n| weights.tensor(&n).is_some())
            }
            ModelSource::Random(m, _) => m.tensors().iter().any(|(n, _)| n == name),
        }
    }

    /// The tensor of this GGUF name, checked to have the expected GGUF dims `[cols, rows]`.
    pub fn weight(&self, name: &str, dims: &[usize]) -> Result<HostWeight<'_>> {
        let (ty, got, data): (GgmlType, Vec<usize>, Cow<[u8]>) = match self {
            ModelSource::Gguf(g) => {
                let (info, data) = g.tensor_data(name)?;
                (
                    info.ty,
                    info.dims.iter().map(|&d| d as usize).collect(),
                    Cow::Borrowed(data),
                )
            }
            ModelSource::Hf { weights, .. } => {
                let Some(hf) = hf_name(name) else {
                    bail!("tensor {name} has no Hugging Face name");
                };
                let (t, data) = weights.tensor_bytes(&hf)?;
                let ty = match t.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    other => bail!("tensor {hf}: dtype {other:?} is not supported"),
                };
                // safetensors shapes are [rows, cols]; GGUF's are [cols, rows]
                (
                    ty,
                    t.shape.iter().rev().copied().collect(),
                    Cow::Borrowed(data),
                )
            }
            ModelSource::Random(m, _) => {
                let (ty, dims, data) = m.tensor(name)?;
                (ty, dims, Cow::Owned(data))
            }
        };
        // trailing 1s are the same shape
        let trim = |d: &[usize]| {
            let mut v = d.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if trim(&got) != trim(dims) {
            bail!(
                "{}: tensor {name} has shape {got:?}, the model's hyperparameters need {dims:?}",
                self.path().display()
            );
        }
        Ok(HostWeight {
            name: name.to_string(),
            ty,
            dims: dims.to_vec(),
            data,
        })
    }
}

/// GGUF tensor name → Hugging Face (llama family) name.
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hf_names() {
        assert_eq!(
            super::hf_name("blk.12.attn_q.bias").unwrap(),
            "model.layers.12.self_attn.q_proj.bias"
        );
        assert_eq!(super::hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(super::hf_name("blk.1.attn_q_norm.weight").is_none());
    }
}
