//! Grammars over the real SmolLM2 tokenizer: random walks through the mask always end in
//! output that matches, and tool-call grammars accept what they should and nothing else.

use super::tools::{self, Tool, ToolMode};
use super::*;
use crate::formats::gguf::GgufFile;
use crate::sampling::Rng;
use serde_json::json;

fn grammars() -> Grammars {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(&path).expect("models/ (scripts/fetch-models)");
    let tok = Arc::new(Tokenizer::from_gguf(&g).unwrap());
    let n = tok.vocab_size();
    Grammars::new(tok, n, GrammarLimits::default())
}

/// Walk `c` choosing uniformly among allowed tokens; the text, and whether it ended (an
/// end-of-generation token or a stopped grammar) within `max` tokens.
fn walk(g: &Grammars, c: &mut Constraint, seed: u64, max: usize) -> (String, bool) {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::new();
    let eog = g.tok.end_of_generation();
    for _ in 0..max {
        if c.is_stopped() {
            return (g.tok.decode(&ids, false).unwrap(), true);
        }
        let m = c.mask().unwrap();
        let allowed: Vec<u32> = (0..g.n_vocab as u32)
            .filter(|&t| m[t as usize / 32] >> (t % 32) & 1 == 1)
            .collect();
        assert!(
            !allowed.is_empty(),
            "empty mask after {:?}",
            g.tok.decode(&ids, false)
        );
        // prefer ending when allowed half the time, so walks finish
        let t = if allowed.iter().any(|t| eog.contains(t)) && rng.next_f64() < 0.5 {
            eog[0]
        } else {
            allowed[(rng.next_u64() % allowed.len() as u64) as usize]
        };
        if eog.contains(&t) {
            return (g.tok.decode(&ids, false).unwrap(), true);
        }
        c.consume(t).unwrap();
        ids.push(t);
    }
    (g.tok.decode(&ids, false).unwrap(), false)
}

#[test]
fn random_walks_through_a_schema_match_it() {
    let g = grammars();
    let schema = json!({
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
            "owner": {"$ref": "#/$defs/owner"}
        },
        "required": ["kind", "age", "owner"],
        "additionalProperties": false,
        "$defs": {"owner": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,5}$"}},
                             "required": ["name"], "additionalProperties": false}}
    });
    let base = g.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
    for seed in 0..20 {
        let mut c = base.fork();
        let (text, ended) = walk(&g, &mut c, seed, 400);
        assert!(ended, "seed {seed}: no end in 400 tokens: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(
            ["cat", "dog"].contains(&v["kind"].as_str().unwrap()),
            "{text}"
        );
        let age = v["age"].as_i64().unwrap();
        assert!((0..=30).contains(&age), "{text}");
        let name = v["owner"]["name"].as_str().unwrap();
        assert!(
            (1..=5).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase()),
            "{text}"
        );
        for t in v
            .get("tags")
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            assert!(t.as_str().unwrap().chars().count() <= 4, "{text}");
        }
    }
}

#[test]
fn regex_choice_and_json_object() {
    let g = grammars();
    let mut c = g
        .compile(&GrammarSpec::Regex(r"[0-9]{3}-[a-z]{2}".into()))
        .unwrap();
    let (t, ended) = walk(&g, &mut c, 1, 50);
    assert!(ended && regex_syntax::parse(r"^[0-9]{3}-[a-z]{2}$").is_ok());
    assert!(t.len() == 6 && t.as_bytes()[3] == b'-', "{t}");
    for seed in 0..5 {
        let mut c = g
            .compile(&GrammarSpec::Choice(vec!["yes".into(), "no (.*)".into()]))
            .unwrap();
        let (t, ended) = walk(&g, &mut c, seed, 20);
        assert!(ended && (t == "yes" || t == "no (.*)"), "{t}");
        let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
        let (t, _) = walk(&g, &mut c, seed, 30);
        // a walk may not finish an arbitrary object in 30 tokens; what it wrote is a prefix
        assert!(t.starts_with('{'), "{t}");
    }
}

#[test]
fn bad_grammars_are_errors() {
    let g = grammars();
    for spec in [
        GrammarSpec::Regex("(unclosed".into()),
        GrammarSpec::Lark("start: nothing_defined".into()),
        GrammarSpec::JsonSchema(
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}),
        ),
        GrammarSpec::JsonSchema(json!({"type": "no-such-type"})),
        GrammarSpec::Choice(vec![]),
    ] {
        assert!(g.compile(&spec).is_err(), "{spec:?} compiled");
    }
    let small = Grammars::new(g.tok.clone(), g.n_vocab, GrammarLimits { max_bytes: 10 });
    let e = small
        .compile(&GrammarSpec::Regex("a".repeat(11)))
        .err()
        .unwrap();
    assert!(e.contains("--max-grammar-bytes"), "{e}");
}

fn weather_tools() -> Vec<Tool> {
    vec![
        Tool {
            name: "get_weather".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                               "required": ["city"], "additionalProperties": false}),
        },
        Tool {
            name: "get_time".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        },
    ]
}

fn accepts(g: &Grammars, lark: &str, text: &str) -> bool {
    let mut c = g.compile(&GrammarSpec::Lark(lark.to_string())).unwrap();
    let ids = g.tok.encode(text, false, false).unwrap();
    ids.iter().all(|&t| {
        let m = c.mask().unwrap();
        m[t as usize / 32] >> (t % 32) & 1 == 1 && c.consume(t).is_ok()
    }) && {
        let eog = g.tok.end_of_generation()[0];
        c.is_stopped() || c.mask().unwrap()[eog as usize / 32] >> (eog % 32) & 1 == 1
    }
}

#[test]
fn tool_grammars_accept_calls_and_only_calls() {
    let g = grammars();
    let tl = weather_tools();
    let call = tools::render_call("get_weather", r#"{"city": "Paris"}"#);
    let time = tools::render_call("get_time", "{}");
    let req = tools::grammar(&tl, &ToolMode::Required, true);
    assert!(accepts(&g, &req, &call), "{req}");
    assert!(accepts(&g, &req, &format!("{call}\n{time}")));
    assert!(!accepts(&g, &req, "Sure, here you go."));
    let many = |n: usize| vec![time.clone(); n].join("\n");
    assert!(accepts(&g, &req, &many(tools::MAX_CALLS)));
    assert!(!accepts(&g, &req, &many(tools::MAX_CALLS + 1)));
    assert!(!accepts(
        &g,
        &req,
        &tools::render_call("get_wetter", r#"{"city": "Paris"}"#)
    ));
    assert!(!accepts(
        &g,
        &req,
        &tools::render_call("get_weather", r#"{"town": "Paris"}"#)
    ));
    let single = tools::grammar(&tl, &ToolMode::Required, false);
    assert!(accepts(&g, &single, &call));
    assert!(!accepts(&g, &single, &format!("{call}\n{time}")));
    let named = tools::grammar(&tl, &ToolMode::Named(1), true);
    assert!(accepts(&g, &named, &time));
    assert!(!accepts(&g, &named, &call));
    let auto = tools::grammar(&tl, &ToolMode::Auto, true);
    assert!(accepts(&g, &auto, "Just text, no calls."), "{auto}");
    assert!(accepts(&g, &auto, ""));
    assert!(accepts(&g, &auto, &format!("Let me look. {call}")));
    assert!(accepts(&g, &auto, &call));
    assert!(!accepts(
        &g,
        &auto,
        &format!("Let me look. {}", tools::render_call("nope", "{}"))
    ));
    assert!(!accepts(&g, &auto, "text <tool_call> free text"));
}

#[test]
fn random_walks_through_required_tools_parse() {
    let g = grammars();
    let tl = weather_tools();
    let base = g
        .compile(&GrammarSpec::Lark(tools::grammar(
            &tl,
            &ToolMode::Required,
            true,
        )))
        .unwrap();
    for seed in 0..10 {
        let mut c = base.fork();
        let (text, ended) = walk(&g, &mut c, seed, 300);
        assert!(ended, "{text}");
        let mut p = tools::ToolCallParser::new();
        let mut out = tools::ToolOutput::default();
        for d in p.push(&text).into_iter().chain(p.finish()) {
            out.apply(&d);
        }
        assert!(out.content.is_empty() && !out.calls.is_empty(), "{text}");
        for (name, args) in &out.calls {
            let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {text}"));
            match name.as_str() {
                "get_weather" => assert!(v["city"].as_str().unwrap().chars().count() <= 12),
                "get_time" => assert_eq!(v, json!({})),
                other => panic!("unknown tool {other}"),
            }
        }
    }
}
