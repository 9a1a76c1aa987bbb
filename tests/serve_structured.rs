//! Structured outputs and tool calls through `kojo serve` on SmolLM2: the clients users run
//! (tests/clients/structured.py: the openai SDK, `.parse()` with Pydantic, LangChain, litellm,
//! outputs checked with `jsonschema`), llm-comply's tool-calling case, and every bad grammar a
//! 400 with the server still serving.

mod common;

use common::server::*;
use serde_json::{json, Value};
use std::process::Command;

/// 50 sampled outputs under a nested schema, n > 1, json_object, regex, choice, Lark,
/// guided_json, and the SDK's `.parse()`.
#[test]
fn schemas_and_grammars_through_the_openai_sdk() {
    let s = Server::start(&[]);
    s.python_client("structured.py", &["schema", "formats", "sdk_parse"]);
}

/// Tool calls: required, named, parallel off and on, stream == whole, auto, history in the
/// generic format, LangChain and litellm.
#[test]
fn tool_calls_through_the_sdk_langchain_and_litellm() {
    let s = Server::start(&[]);
    s.python_client("structured.py", &["tools", "langchain", "litellm"]);
}

#[test]
fn llm_comply_tool_calling() {
    let s = Server::start(&[]);
    let out = Command::new("llm-comply")
        .args([
            "--format",
            "openai-chat",
            "-u",
            &s.url("/v1"),
            "-k",
            "x",
            "-m",
            MODEL_ID,
            "-f",
            "chat-tool-calling",
            "--json",
            "--timeout",
            "120",
        ])
        .output()
        .expect("llm-comply (pip install llm-comply; scripts/test does)");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["summary"]["passed"], 1, "{v:#}");
}

fn chat_body(extra: Value) -> String {
    let mut b = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

#[test]
fn bad_grammars_are_400s_naming_the_problem() {
    let s = Server::start(&["--max-grammar-bytes", "4000"]);
    let tool =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let schema = |sch: Value| json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": sch}}});
    let big: Value = (0..400)
        .map(|i| (format!("field_{i}"), json!({"type": "integer"})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "/v1/chat/completions",
            schema(json!({"type": "no-such-type"})),
            "response_format",
            "does not compile",
        ),
        (
            "/v1/chat/completions",
            schema(
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}),
            ),
            "response_format",
            "does not compile",
        ),
        (
            "/v1/chat/completions",
            schema(json!({"type": "object", "properties": big})),
            "response_format",
            "--max-grammar-bytes",
        ),
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "xml"}}),
            "response_format",
            "not supported",
        ),
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "json_schema"}}),
            "response_format",
            "json_schema",
        ),
        (
            "/v1/completions",
            json!({"guided_regex": "(unclosed"}),
            "guided_regex",
            "does not compile",
        ),
        (
            "/v1/completions",
            json!({"guided_grammar": "start: missing_rule"}),
            "guided_grammar",
            "does not compile",
        ),
        (
            "/v1/chat/completions",
            json!({"guided_choice": []}),
            "guided_choice",
            "list",
        ),
        (
            "/v1/chat/completions",
            json!({"structured_outputs": {"xml": "x"}}),
            "structured_outputs",
            "not supported",
        ),
        (
            "/v1/chat/completions",
            json!({"guided_json": {"type": "object"}, "guided_regex": "a"}),
            "guided_regex",
            "one grammar",
        ),
        (
            "/v1/chat/completions",
            json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
            "not in `tools`",
        ),
        (
            "/v1/chat/completions",
            json!({"tool_choice": "required"}),
            "tool_choice",
            "needs `tools`",
        ),
        (
            "/v1/chat/completions",
            json!({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}),
            "tools[0]",
            "name",
        ),
        (
            "/v1/chat/completions",
            json!({"tools": [tool, tool]}),
            "tools[1]",
            "two tools",
        ),
        (
            "/v1/chat/completions",
            json!({"tools": [tool], "tool_choice": "required", "guided_regex": "a"}),
            "tool_choice",
            "cannot be combined",
        ),
        ("/v1/completions", json!({"tools": [tool]}), "tools", "chat"),
    ];
    for (path, extra, param, msg) in cases {
        let body = if path == "/v1/completions" {
            let mut b = json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 8});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b.to_string()
        } else {
            chat_body(extra.clone())
        };
        let (code, v) = s.post(path, &body);
        assert_eq!(code, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{extra}: {m}");
    }
    // a tool-call history that is malformed
    let (code, v) = s.post("/v1/chat/completions", &json!({"model": MODEL_ID, "messages": [
        {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f"}}]}]}).to_string());
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages[0].tool_calls");
    // still serving, and a good grammar still compiles
    let (code, v) = s.post(
        "/v1/chat/completions",
        &chat_body(json!({"guided_choice": ["yes", "no"]})),
    );
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "yes" || text == "no", "{text}");
}

/// A grammar that takes longer than `--grammar-timeout` to compile is a 400, and neither
/// stalls the engine nor the other requests.
#[test]
fn slow_grammars_time_out_without_stalling_others() {
    let s = Server::start(&["--grammar-timeout", "0.001"]);
    let (code, v) = s.post(
        "/v1/chat/completions",
        &chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--grammar-timeout"),
        "{v}"
    );
    let r = s.chat("hi", 4);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
}
