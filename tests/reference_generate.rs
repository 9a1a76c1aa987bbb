//! Generation and perplexity on the real models against llama.cpp's outputs in tests/data.
//!
//! llama.cpp's numbers are one run of quantized arithmetic (activations rounded to 8 bits per
//! block), and these small models amplify rounding: flipping the rounding of the ~25 exact
//! ties in one forward pass moves SmolLM2's log-probabilities by 0.02 nats, and kojo's own
//! exact-f32 and integer paths differ by up to ~0.3 nats at a position. llama.cpp itself, same
//! build and machine, run with `-fa off` instead of its default, lands 0.07-0.68 nats from its
//! own reference over the first 8 positions and agrees for 32 tokens in 5 of the 12 SmolLM2
//! cases (docs/reference-matching.md). So: greedy ids must agree until the reference itself
//! was close to a tie (`NEAR_TIE`), and the log-probabilities of the reference's candidates
//! above 1 % within `LOGPROB_TOL` over the first 8 positions. (Less likely candidates move
//! most: kojo's own correct arithmetic variants differ by up to 0.6 nats on them. Before the
//! SIMD kernels a third of the cases also had to agree for 32 tokens; that count moves between
//! 2 and 5 of 12 with the rounding alone, kojo's exact f32 path scoring 3, so it is reported,
//! not asserted.) The tight checks of the forward pass are against float64 in
//! tests/forward_reference.rs, and perplexity (which averages the noise out) must be within 1%
//! of llama.cpp's.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// The reference's top-2 gap (nats) under which either token is a fair greedy choice.
const NEAR_TIE: f64 = 0.5;
/// Top-5 log-probabilities at the first 8 positions, while the ids agree (llama.cpp `-fa off`
/// vs its default: up to 0.68).
const LOGPROB_TOL: f64 = 0.75;
/// Reference candidates less likely than this (ln 0.01) are not compared.
const TAIL: f64 = -4.6;

struct Outcome {
    case: String,
    agreed: usize,
    first_tie: Option<usize>,
    worst_logprob: f64,
}

/// Run one completion case (`completion_raw` or `completion_templated`) and compare.
fn run_case(model: &Path, case: &Value, kind: &str) -> Outcome {
    let g = &case[kind];
    let want = ids_of(&g["tokens"]);
    let prompt = g["request"]["prompt"].as_str().unwrap();
    let n = want.len().to_string();
    let out: Value = serde_json::from_str(&kojo_ok(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        &n,
        "--temperature",
        "0",
        "--json",
    ]))
    .unwrap();
    let got = ids_of(&out["output_ids"]);
    let agreed = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    let positions = reference_positions(g);
    let first_tie = first_near_tie(g, NEAR_TIE);
    let ours = out["top_logprobs"].as_array().unwrap();
    let mut worst = 0f64;
    for &(pos, p) in positions.iter().take_while(|(t, _)| *t < 8 && *t <= agreed) {
        let mine: Vec<(u64, f64)> = serde_json::from_value(ours[pos].clone()).unwrap();
        let floor = mine.last().unwrap().1;
        for e in p["top"].as_array().unwrap() {
            let (id, lp) = (e["id"].as_u64().unwrap(), e["logprob"].as_f64().unwrap());
            if lp < TAIL {
                // below 1 %: these move the most with rounding, in llama.cpp's runs too
                continue;
            }
            let d = match mine.iter().find(|m| m.0 == id) {
                Some(m) => (m.1 - lp).abs(),
                None => (lp - floor).max(0.0),
            };
            worst = worst.max(d);
        }
    }
    Outcome {
        case: format!("{} {kind}", case["id"].as_str().unwrap()),
        agreed,
        first_tie,
        worst_logprob: worst,
    }
}

fn check_model(model: &Path, reference_file: &str, kinds: &[&str]) {
    let r = reference(reference_file);
    let mut long_agreements = 0;
    let mut total = 0;
    for case in r["generation_cases"].as_array().unwrap() {
        for kind in kinds {
            let o = run_case(model, case, kind);
            let want_len = case[kind]["tokens"].as_array().unwrap().len();
            eprintln!(
                "{}: {} of {want_len} ids agree, reference near-tie at {:?}, worst log-prob gap {:.3}",
                o.case, o.agreed, o.first_tie, o.worst_logprob
            );
            let must = o.first_tie.unwrap_or(want_len).min(want_len);
            assert!(
                o.agreed >= must,
                "{}: ids diverge at {} before the reference's first near-tie at {must}",
                o.case,
                o.agreed
            );
            assert!(
                o.worst_logprob <= LOGPROB_TOL,
                "{}: log-probabilities {:.3} apart",
                o.case,
                o.worst_logprob
            );
            total += 1;
            if o.agreed >= 32.min(want_len) {
                long_agreements += 1;
            }
        }
    }
    // Reported, not asserted: how far past the first near-tie a case agrees is rounding luck.
    // Measured on SmolLM2's 12 cases: kojo's exact f32 matmul agrees for 32 tokens in 3,
    // its portable integer path in 4, the SIMD row kernels in 5, the x8 kernels in 2, and
    // llama.cpp itself with -fa off in 5 (docs/reference-matching.md).
    eprintln!("{long_agreements} of {total} cases agree for 32 tokens (or the whole reference)");
}

#[test]
fn smollm2_greedy_matches_llamacpp() {
    check_model(
        &smollm2(),
        "llamacpp-smollm2-reference.json",
        &["completion_raw", "completion_templated"],
    );
}

#[test]
fn gemma3_greedy_matches_llamacpp() {
    // a base model without a chat template: only the raw cases are meaningful
    check_model(
        &gemma3(),
        "llamacpp-gemma3-270m-reference.json",
        &["completion_raw"],
    );
}

/// `--chat` renders the template and tokenizes it exactly as llama.cpp's server did.
#[test]
fn chat_flag_uses_the_template() {
    let r = reference("llamacpp-smollm2-reference.json");
    for case in r["generation_cases"].as_array().unwrap() {
        let msgs = case["messages"].as_array().unwrap();
        if msgs.len() != 1 {
            continue;
        }
        let user = msgs[0]["content"].as_str().unwrap();
        let out: Value = serde_json::from_str(&kojo_ok(&[
            "generate",
            "-m",
            smollm2().to_str().unwrap(),
            "--chat",
            "-p",
            user,
            "-n",
            "1",
            "--temperature",
            "0",
            "--json",
        ]))
        .unwrap();
        assert_eq!(
            out["prompt_ids"], case["templated_prompt_ids"],
            "{}",
            case["id"]
        );
    }
}

fn perplexity(model: &Path) -> (f64, f64) {
    let text = reference_dir().join("ppl-tempest.txt");
    let out = kojo_ok(&[
        "perplexity",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "512",
    ]);
    let last = out.lines().last().unwrap();
    // "Final estimate: PPL = 32.1737 +/- 2.07157"
    let rest = last
        .strip_prefix("Final estimate: PPL = ")
        .unwrap_or_else(|| panic!("last line: {last}"));
    let (ppl, err) = rest.split_once(" +/- ").unwrap();
    (ppl.parse().unwrap(), err.parse().unwrap())
}

fn check_perplexity(model: &Path, model_name: &str) {
    let r = reference("perplexity-reference.json");
    let case = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["model"] == model_name)
        .unwrap();
    let want = case["ppl"].as_f64().unwrap();
    let (ppl, err) = perplexity(model);
    eprintln!("{model_name}: PPL {ppl} +/- {err}, llama.cpp {want}");
    assert!(
        (ppl / want - 1.0).abs() < 0.01,
        "{model_name}: PPL {ppl} vs llama.cpp {want}"
    );
    let want_err = case["ppl_stderr"].as_f64().unwrap();
    assert!(
        (err / want_err - 1.0).abs() < 0.05,
        "{model_name}: +/- {err} vs {want_err}"
    );
}

#[test]
fn smollm2_perplexity_matches_llamacpp() {
    check_perplexity(&smollm2(), "SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn gemma3_perplexity_matches_llamacpp() {
    check_perplexity(&gemma3(), "gemma-3-270m-q4_k_m.gguf");
}
