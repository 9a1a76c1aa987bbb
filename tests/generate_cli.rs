//! `kojo generate` and `kojo perplexity` as a user drives them: streaming text, stop strings,
//! seeds, sampling settings and bad arguments.

mod common;

use common::*;
use serde_json::Value;

fn gen_json(args: &[&str]) -> Value {
    let m = smollm2();
    let mut all = vec!["generate", "-m", m.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&kojo_ok(&all)).unwrap()
}

#[test]
fn streamed_text_is_the_json_text() {
    let m = smollm2();
    let args = [
        "generate",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "日本の首都は",
        "-n",
        "24",
        "--temperature",
        "0",
    ];
    let streamed = kojo_ok(&args);
    let j = gen_json(&["-p", "日本の首都は", "-n", "24", "--temperature", "0"]);
    assert_eq!(streamed.trim_end_matches('\n'), j["text"].as_str().unwrap());
    assert_eq!(j["output_ids"].as_array().unwrap().len(), 24);
    assert_eq!(j["finish_reason"], "length");
    // the text is the detokenized ids
    assert_eq!(
        detokenize_with(&m, &ids_of(&j["output_ids"]), &["--skip-special"]),
        j["text"].as_str().unwrap()
    );
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() {
    let free = gen_json(&[
        "-p",
        "Count: one, two, three,",
        "-n",
        "12",
        "--temperature",
        "0",
    ]);
    let text = free["text"].as_str().unwrap().to_string();
    // a stop string from the middle of the free-running text, spanning a token boundary
    // (", " then the next word's first letter), whatever words the model chose
    let at = text[1..].find(", ").expect("the model counts on") + 1;
    let stop: String = text[at..].chars().take(3).collect();
    assert_eq!(stop.chars().count(), 3, "free text {text:?}");
    let stopped = gen_json(&[
        "-p",
        "Count: one, two, three,",
        "-n",
        "12",
        "--temperature",
        "0",
        "--stop",
        &stop,
    ]);
    assert_eq!(
        stopped["text"].as_str().unwrap(),
        &text[..at],
        "stop {stop:?}"
    );
    assert_eq!(stopped["finish_reason"], "stop");
    assert_eq!(stopped["stop"], stop.as_str());
}

#[test]
fn seeds_reproduce_and_differ() {
    let run = |seed: &str| {
        gen_json(&[
            "-p",
            "Once upon a time",
            "-n",
            "16",
            "--temperature",
            "1.0",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--seed",
            seed,
        ])["output_ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
    // top-k 1 is greedy whatever the temperature
    let greedy = gen_json(&["-p", "Once upon a time", "-n", "8", "--temperature", "0"]);
    let k1 = gen_json(&[
        "-p",
        "Once upon a time",
        "-n",
        "8",
        "--temperature",
        "1.5",
        "--top-k",
        "1",
        "--seed",
        "5",
    ]);
    assert_eq!(greedy["output_ids"], k1["output_ids"]);
}

#[test]
fn repetition_penalty_changes_a_looping_greedy_output() {
    // SmolLM2 loops on this prompt under greedy decoding (see the llama.cpp reference)
    let plain = gen_json(&[
        "-p",
        "The capital of France is",
        "-n",
        "40",
        "--temperature",
        "0",
    ]);
    let pen = gen_json(&[
        "-p",
        "The capital of France is",
        "-n",
        "40",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1.5",
    ]);
    assert_ne!(plain["output_ids"], pen["output_ids"]);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let m = smollm2();
    let m = m.to_str().unwrap();
    for (args, needle) in [
        (vec!["-p", "hi", "--temperature", "-1"], "temperature"),
        (vec!["-p", "hi", "--top-p", "1.5"], "top_p"),
        (vec!["-p", "hi", "--min-p", "2"], "min_p"),
        (
            vec!["-p", "hi", "--repeat-penalty", "0"],
            "repetition_penalty",
        ),
        (vec!["-p", "", "-n", "4"], "empty"),
        (vec!["-p", "a b c d e f g h", "--ctx-size", "4"], "context"),
        (vec!["-p", "hi", "--matmul", "fast"], "quantized, exact"),
    ] {
        let mut all = vec!["generate", "-m", m];
        all.extend_from_slice(&args);
        let out = kojo(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let out = kojo(&["generate", "-m", "/nonexistent.gguf", "-p", "hi"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.gguf"));
}

#[test]
fn perplexity_refuses_text_shorter_than_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("short.txt");
    std::fs::write(&f, "Only a few words.").unwrap();
    let m = smollm2();
    let out = kojo(&[
        "perplexity",
        "-m",
        m.to_str().unwrap(),
        "-f",
        f.to_str().unwrap(),
        "--ctx",
        "512",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fewer than one window"));
    let bin = dir.path().join("bin.txt");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00]).unwrap();
    let out = kojo(&[
        "perplexity",
        "-m",
        m.to_str().unwrap(),
        "-f",
        bin.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));
}

/// `kojo bench`: llama-bench's tests as JSON, on the real model and on a random-weight model
/// (no file, no tokenizer) with batched decoding over a cached context.
#[test]
fn bench_reports_each_test() {
    let real = smollm2();
    let out = kojo_ok(&[
        "bench",
        "-m",
        real.to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tests: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp16", "tg4"]);
    let out = kojo_ok(&[
        "bench",
        "-m",
        "random:tiny:q4_k:5",
        "-p",
        "16",
        "-n",
        "4",
        "--parallel",
        "1,3",
        "-d",
        "20",
        "-r",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v.as_array().unwrap();
    let tests: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["pp16", "tg4 @ d20", "tg4 x3 @ d20"]);
    for r in rows {
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["samples_ts"].as_array().unwrap().len(), 2);
    }
    assert_eq!(rows[2]["parallel"], 3);
    assert_eq!(rows[2]["depth"], 20);
    // a random model has no tokenizer to generate text with
    let out = kojo(&["generate", "-m", "random:tiny", "-p", "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tokenizer"));
}

/// `kojo generate` runs the server's logits pipeline: a grammar (JSON schema file, regex, Lark
/// file), min_tokens and logit bias; a grammar that does not compile names its file.
#[test]
fn grammars_min_tokens_and_bias_in_generate() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("city.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"city":{"type":"string","maxLength":15},"rank":{"type":"integer","minimum":1,"maximum":5}},"required":["city","rank"],"additionalProperties":false}"#,
    )
    .unwrap();
    for seed in ["1", "2", "3"] {
        let j = gen_json(&[
            "--chat",
            "-p",
            "A city as JSON",
            "--json-schema",
            schema.to_str().unwrap(),
            "--seed",
            seed,
            "-n",
            "100",
        ]);
        assert_eq!(j["finish_reason"], "stop", "{j}");
        let v: Value = serde_json::from_str(j["text"].as_str().unwrap()).unwrap();
        let rank = v["rank"].as_i64().unwrap();
        assert!(
            (1..=5).contains(&rank) && v["city"].as_str().unwrap().chars().count() <= 15,
            "{v}"
        );
    }
    let j = gen_json(&[
        "-p",
        "Phone:",
        "--regex",
        "[0-9]{3}-[0-9]{4}",
        "--seed",
        "4",
    ]);
    let t = j["text"].as_str().unwrap();
    assert!(
        t.len() == 8 && t.as_bytes()[3] == b'-' && j["finish_reason"] == "stop",
        "{t}"
    );
    let lark = dir.path().join("g.lark");
    std::fs::write(&lark, "start: \"yes\" | \"no\"\n").unwrap();
    let j = gen_json(&["-p", "Answer:", "--grammar", lark.to_str().unwrap()]);
    assert!(["yes", "no"].contains(&j["text"].as_str().unwrap()), "{j}");
    // min_tokens: no end of generation before 40 tokens (greedy SmolLM2 ends a short answer
    // much earlier)
    let short = gen_json(&["--chat", "-p", "Say hi.", "--temperature", "0", "-n", "60"]);
    let n_short = short["output_ids"].as_array().unwrap().len();
    assert!(n_short < 40, "{short}");
    let long = gen_json(&[
        "--chat",
        "-p",
        "Say hi.",
        "--temperature",
        "0",
        "-n",
        "60",
        "--min-tokens",
        "40",
    ]);
    assert!(long["output_ids"].as_array().unwrap().len() >= 40, "{long}");
    // a bias of -100 on the greedy first token moves the choice
    let first = short["output_ids"][0].as_u64().unwrap();
    let bias = format!("{first}=-100");
    let moved = gen_json(&[
        "--chat",
        "-p",
        "Say hi.",
        "--temperature",
        "0",
        "-n",
        "3",
        "--logit-bias",
        &bias,
    ]);
    assert_ne!(moved["output_ids"][0].as_u64().unwrap(), first);
    // errors name the file
    let bad = dir.path().join("bad.lark");
    std::fs::write(&bad, "start: undefined_rule\n").unwrap();
    let m = smollm2();
    let out = kojo(&[
        "generate",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "x",
        "--grammar",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.lark") && err.contains("does not compile"),
        "{err}"
    );
}
