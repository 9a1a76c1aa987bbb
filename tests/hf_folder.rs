//! A Hugging Face folder (safetensors + config.json + tokenizer.json + tokenizer_config.json),
//! written from the SmolLM2 GGUF by scripts/gguf_to_hf.py with the `gguf`, `safetensors` and
//! `tokenizers` packages, reads the same as the GGUF: hyperparameters, weights, llama.cpp's token
//! ids and chat template.

mod common;
use common::*;
use kojo::formats::safetensors::SafetensorsModel;
use kojo::formats::GgufFile;
use std::path::Path;
use std::process::Command;

/// One test (one 270 MB folder, removed at the end) for the three checks.
#[test]
fn hf_folder_reads_like_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python())
        .arg(root().join("scripts/gguf_to_hf.py"))
        .arg(smollm2())
        .arg(dir.path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "gguf_to_hf.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hf_folder_matches_gguf(dir.path());
    tokenizer_json_matches_llama_cpp(dir.path());
    tokenizer_config_template_matches_llama_cpp(dir.path());
}

fn hf_folder_matches_gguf(dir: &Path) {
    let hf: serde_json::Value =
        serde_json::from_str(&kojo_ok(&["inspect", "--json", dir.to_str().unwrap()])).unwrap();
    let gg: serde_json::Value = serde_json::from_str(&kojo_ok(&[
        "inspect",
        "--json",
        smollm2().to_str().unwrap(),
    ]))
    .unwrap();
    for k in [
        "arch",
        "n_layers",
        "hidden",
        "ffn",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "vocab_size",
        "context_length",
        "rope_base",
        "tied_embeddings",
    ] {
        assert_eq!(hf["config"][k], gg["config"][k], "{k}");
    }
    assert_eq!(hf["format"], "safetensors");
    assert_eq!(hf["tensors"], 272);
    assert_eq!(hf["parameters"], gg["parameters"]);
    assert_eq!(hf["tensor_types"]["F16"], 272);
    assert_eq!(hf["chat_template"], gg["chat_template"]);

    // weights: the GGUF tensor rounded to f16 is exactly what the safetensors file holds
    let st = SafetensorsModel::open(dir).unwrap();
    let g = GgufFile::open(smollm2()).unwrap();
    for (hf_name, gguf_name) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        let a = st.tensor_f32(hf_name).unwrap();
        let b: Vec<f32> = g
            .tensor_f32(gguf_name)
            .unwrap()
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{hf_name}"
        );
    }
}

fn tokenizer_json_matches_llama_cpp(dir: &Path) {
    check_tokenize_cases(dir, "llamacpp-smollm2-reference.json");
    let r = reference("llamacpp-smollm2-reference.json");
    for c in r["tokenize_cases"].as_array().unwrap() {
        let pieces = detokenize_stream(dir, &ids_of(&c["ids"]));
        assert_eq!(pieces.concat(), c["text"].as_str().unwrap());
    }
}

fn tokenizer_config_template_matches_llama_cpp(dir: &Path) {
    let r = reference("llamacpp-smollm2-reference.json");
    let tmp = tempfile::tempdir().unwrap();
    for g in r["generation_cases"].as_array().unwrap() {
        let f = tmp.path().join("m.json");
        std::fs::write(
            &f,
            serde_json::json!({"messages": g["messages"]}).to_string(),
        )
        .unwrap();
        let rendered = kojo_ok(&[
            "chat-template",
            "-m",
            dir.to_str().unwrap(),
            f.to_str().unwrap(),
        ]);
        assert_eq!(
            rendered,
            g["templated_prompt"].as_str().unwrap(),
            "{}",
            g["id"]
        );
        assert_eq!(
            tokenize(dir, &rendered, true),
            ids_of(&g["templated_prompt_ids"])
        );
    }
}
