//! Tokenization, detokenization and chat templates against llama.cpp's outputs for the two real
//! models (tests/data), through the `kojo` CLI.

mod common;
use common::*;

fn raw_prompts(model: &std::path::Path, ref_file: &str) {
    let r = reference(ref_file);
    for g in r["generation_cases"].as_array().unwrap() {
        let raw = g["raw_prompt"].as_str().unwrap();
        assert_eq!(
            tokenize(model, raw, false),
            ids_of(&g["raw_prompt_ids"]),
            "raw prompt of {}",
            g["id"]
        );
        // the completion's own record of generated ids detokenizes to its content
        let done = &g["completion_raw"];
        let text = detokenize_with(model, &ids_of(&done["tokens"]), &["--skip-special"]);
        // the server's content leaves out control tokens such as the final EOS
        assert_eq!(
            text,
            done["content"].as_str().unwrap(),
            "completion of {}",
            g["id"]
        );
    }
}

#[test]
fn smollm2_tokenize_matches_llama_cpp() {
    check_tokenize_cases(&smollm2(), "llamacpp-smollm2-reference.json");
}

#[test]
fn gemma3_tokenize_matches_llama_cpp() {
    check_tokenize_cases(&gemma3(), "llamacpp-gemma3-270m-reference.json");
}

#[test]
fn smollm2_raw_prompts_match_llama_cpp() {
    raw_prompts(&smollm2(), "llamacpp-smollm2-reference.json");
}

#[test]
fn gemma3_raw_prompts_match_llama_cpp() {
    raw_prompts(&gemma3(), "llamacpp-gemma3-270m-reference.json");
}

#[test]
fn smollm2_chat_template_matches_llama_cpp() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let r = reference("llamacpp-smollm2-reference.json");
    let dir = tempfile::tempdir().unwrap();
    for g in r["generation_cases"].as_array().unwrap() {
        let f = dir
            .path()
            .join(format!("{}.json", g["id"].as_str().unwrap()));
        std::fs::write(&f, g["messages"].to_string()).unwrap();
        let rendered = kojo_ok(&["chat-template", "-m", m, f.to_str().unwrap()]);
        assert_eq!(
            rendered,
            g["templated_prompt"].as_str().unwrap(),
            "template of {}",
            g["id"]
        );
        assert_eq!(
            tokenize(&model, &rendered, true),
            ids_of(&g["templated_prompt_ids"]),
            "templated ids of {}",
            g["id"]
        );
    }
}

#[test]
fn gemma3_has_no_template_and_says_so() {
    let model = gemma3();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.json");
    std::fs::write(&f, r#"[{"role":"user","content":"hi"}]"#).unwrap();
    let out = kojo(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn inspect_both_models() {
    let s = kojo_ok(&["inspect", "--json", smollm2().to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["config"]["arch"], "llama");
    assert_eq!(v["config"]["n_layers"], 30);
    assert_eq!(v["config"]["hidden"], 576);
    assert_eq!(v["config"]["n_heads"], 9);
    assert_eq!(v["config"]["n_kv_heads"], 3);
    assert_eq!(v["config"]["head_dim"], 64);
    assert_eq!(v["config"]["vocab_size"], 49152);
    assert_eq!(v["config"]["rope_base"], 100000.0);
    assert_eq!(v["config"]["tied_embeddings"], true);
    assert_eq!(v["tensor_types"]["Q4_1"], 210);
    assert_eq!(v["tokenizer"]["adds_bos"], false);
    assert!(v["tokenizer"]["kind"].as_str().unwrap().contains("smollm"));
    assert!(v["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    let s = kojo_ok(&["inspect", "--json", gemma3().to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["config"]["arch"], "gemma3");
    assert_eq!(v["config"]["n_layers"], 18);
    assert_eq!(v["config"]["head_dim"], 256);
    assert_eq!(v["config"]["n_kv_heads"], 1);
    assert_eq!(v["config"]["sliding_window"], 512);
    assert_eq!(v["tensor_types"]["Q4_K"], 27);
    assert_eq!(v["tokenizer"]["vocab_size"], 262144);
    assert_eq!(v["tokenizer"]["adds_bos"], true);
    assert!(v["tokenizer"]["kind"]
        .as_str()
        .unwrap()
        .contains("SentencePiece"));
    // the text form works too
    let text = kojo_ok(&["inspect", gemma3().to_str().unwrap()]);
    assert!(text.contains("architecture:   gemma3"), "{text}");
}

#[test]
fn gemma3_adds_bos_when_asked() {
    let m = gemma3();
    let out = kojo_ok(&[
        "tokenize",
        "-m",
        m.to_str().unwrap(),
        "--add-special",
        "The capital of France is",
    ]);
    let ids: Vec<u64> = serde_json::from_str(&out).unwrap();
    assert_eq!(ids, vec![2, 818, 5279, 529, 7001, 563]);
}

/// Japanese and emoji come out of the streaming detokenizer as whole characters: llama.cpp's
/// ids for these strings split characters across tokens, and no piece is ever a fragment.
/// `extra` texts are tokenized by kojo itself (for characters the vocabulary lacks, which fall
/// back to byte tokens).
fn stream_whole_characters(model: &std::path::Path, ref_file: &str, extra: &[&str]) {
    let r = reference(ref_file);
    let mut held_back = 0;
    let mut cases: Vec<(String, Vec<u64>)> = r["tokenize_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["text"].as_str().unwrap().to_string(), ids_of(&c["ids"])))
        .collect();
    cases.extend(
        extra
            .iter()
            .map(|t| (t.to_string(), tokenize(model, t, false))),
    );
    for (text, ids) in &cases {
        let pieces = detokenize_stream(model, ids);
        assert_eq!(pieces.len(), ids.len() + 1);
        assert_eq!(&pieces.concat(), text, "stream of {text:?}");
        assert!(!pieces.concat().contains('\u{FFFD}'));
        held_back += pieces[..ids.len()].iter().filter(|p| p.is_empty()).count();
    }
    // the cases do split characters across tokens, so some pushes must have held bytes back
    assert!(
        held_back > 0,
        "no token ended inside a character: the test would prove nothing"
    );
}

#[test]
fn smollm2_streams_whole_characters() {
    stream_whole_characters(&smollm2(), "llamacpp-smollm2-reference.json", &[]);
}

#[test]
fn gemma3_streams_whole_characters() {
    // Egyptian hieroglyphs and a rare emoji sequence are not in Gemma's vocabulary: byte fallback
    stream_whole_characters(
        &gemma3(),
        "llamacpp-gemma3-270m-reference.json",
        &["𓀀𓀁 工場 🫨🪿"],
    );
}
