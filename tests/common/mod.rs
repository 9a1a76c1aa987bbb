//! Helpers shared by the integration tests: the `kojo` binary, the real models, the references.
#![allow(dead_code)]

pub mod server;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A real model fetched by scripts/fetch-models; a missing model fails the test loudly.
pub fn model(file: &str) -> PathBuf {
    let p = root().join("models").join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models first",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn gemma3() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf")
}

/// The reference data folder: `tests/data` (see its README), or `$KOJO_REFERENCE_DIR`.
pub fn reference_dir() -> PathBuf {
    std::env::var("KOJO_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("tests/data"))
}

/// A JSON file of the reference data.
pub fn reference(file: &str) -> serde_json::Value {
    let p = reference_dir().join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn kojo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kojo"))
        .args(args)
        .output()
        .expect("run kojo")
}

/// Run kojo and return stdout; panics with stderr when it fails.
pub fn kojo_ok(args: &[&str]) -> String {
    let out = kojo(args);
    assert!(
        out.status.success(),
        "kojo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

pub fn tokenize(model: &Path, text: &str, special: bool) -> Vec<u64> {
    let m = model.to_str().unwrap();
    let mut args = vec!["tokenize", "-m", m];
    if special {
        args.push("--special");
    }
    args.push("--");
    args.push(text);
    serde_json::from_str(&kojo_ok(&args)).unwrap()
}

pub fn detokenize(model: &Path, ids: &[u64]) -> String {
    detokenize_with(model, ids, &[])
}

/// `kojo detokenize FLAGS -m MODEL -- IDS...`, stdout.
pub fn detokenize_with(model: &Path, ids: &[u64], flags: &[&str]) -> String {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut args = vec!["detokenize"];
    args.extend_from_slice(flags);
    args.extend(["-m", model.to_str().unwrap(), "--"]);
    args.extend(ids.iter().map(String::as_str));
    kojo_ok(&args)
}

/// The pieces `kojo detokenize --stream` releases, one per id plus the final flush.
pub fn detokenize_stream(model: &Path, ids: &[u64]) -> Vec<String> {
    serde_json::from_str(&detokenize_with(model, ids, &["--stream"])).unwrap()
}

pub fn python() -> String {
    std::env::var("KOJO_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Every tokenize case of a reference file: ids with and without `--special`, and the round
/// trip through detokenize.
pub fn check_tokenize_cases(model: &std::path::Path, ref_file: &str) {
    let r = reference(ref_file);
    let cases = r["tokenize_cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        let with_special: Vec<u64> = c["parse_special_true"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect();
        assert_eq!(want, with_special);
        assert_eq!(
            tokenize(model, text, true),
            want,
            "tokenize --special {text:?}"
        );
        if let Some(plain) = c.get("parse_special_false") {
            let plain: Vec<u64> = plain
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_u64().unwrap())
                .collect();
            assert_eq!(
                tokenize(model, text, false),
                plain,
                "tokenize (no --special) {text:?}"
            );
        }
        assert_eq!(
            detokenize(model, &want),
            c["detokenize_roundtrip"].as_str().unwrap(),
            "detokenize {want:?}"
        );
        assert_eq!(c["detokenize_roundtrip"].as_str().unwrap(), text);
    }
}

/// A reference completion's top-5 entries, each at the position of its token: llama.cpp
/// reports one entry per whole UTF-8 character, with the distribution at the character's last
/// token.
pub fn reference_positions(g: &serde_json::Value) -> Vec<(usize, &serde_json::Value)> {
    let want = ids_of(&g["tokens"]);
    let mut positions = Vec::new();
    let mut cursor = 0;
    for e in g["top5_all_positions"].as_array().unwrap() {
        let id = e["chosen_id"].as_u64().unwrap();
        let Some(t) = (cursor..want.len()).find(|&t| want[t] == id) else {
            break;
        };
        positions.push((t, e));
        cursor = t + 1;
    }
    positions
}

/// The first position where the reference's top two candidates are under `margin` nats
/// apart: a correct implementation with other rounding may pick either from there on.
pub fn first_near_tie(g: &serde_json::Value, margin: f64) -> Option<usize> {
    reference_positions(g)
        .iter()
        .find(|(_, p)| {
            let t = p["top"].as_array().unwrap();
            t.len() > 1
                && t[0]["logprob"].as_f64().unwrap() - t[1]["logprob"].as_f64().unwrap() < margin
        })
        .map(|(t, _)| *t)
}
