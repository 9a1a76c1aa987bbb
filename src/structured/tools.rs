//! Tool calls: the grammar that constrains them and the parser that reads them back.
//!
//! kojo writes every call in one layout (the one Hermes- and Qwen-style chat templates use),
//! generated compactly so that its boundaries are unambiguous:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Tokyo"}}
//! </tool_call>
//! ```
//!
//! Calls follow one another separated by one newline. The arguments are JSON with no raw
//! newline in them (strings escape it), so `}\n</tool_call>` can only end a call.
//!
//! - `tool_choice: "required"`: the whole output is one or more calls (one, without
//!   `parallel_tool_calls`). Named: exactly one call of that function.
//! - `"auto"`: free text, and once `<tool_call>` appears the rest is calls, constrained like
//!   `required` (the free text itself can never contain the marker).
//!
//! [`ToolCallParser`] turns the output text, pushed in pieces of any size, into content and
//! tool-call deltas; whole responses are the same deltas summed, so a stream and a whole
//! response of the same output agree by construction.

use super::compact;
use serde_json::Value;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";
/// What starts a call's arguments, after its name.
const ARGS: &str = "\", \"arguments\": ";
/// What opens a call's body, after [`OPEN`].
const HEAD: &str = "\n{\"name\": \"";
/// What ends a call: the body's closing brace and [`CLOSE`].
const TERM: &str = "}\n</tool_call>";

/// The most calls one response may make: a small model asked for calls tends to repeat its
/// call until it runs out of tokens; the grammar ends the response after this many.
pub const MAX_CALLS: usize = 8;

/// One function a request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments object
    pub parameters: Value,
}

/// What `tool_choice` asks for, once validated against `tools`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Text or calls, the model's choice.
    Auto,
    /// At least one call.
    Required,
    /// Exactly one call of `tools[i]`.
    Named(usize),
}

/// A valid OpenAI function name: 1 to 64 of `[a-zA-Z0-9_-]`.
pub fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A Lark string literal of `s` (JSON's escapes are Lark's).
fn lit(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The Lark grammar of a tool-calling response.
pub fn grammar(tools: &[Tool], mode: &ToolMode, parallel: bool) -> String {
    let mut g = String::new();
    // body_i: one call of tool i after its `<tool_call>` marker
    for (i, t) in tools.iter().enumerate() {
        let schema = compact(t.parameters.clone());
        g += &format!(
            "body_{i}: {} {} %json {} {}\n",
            lit(HEAD),
            lit(&format!("{}{ARGS}", t.name)),
            schema,
            lit(TERM)
        );
    }
    let bodies: Vec<String> = match mode {
        ToolMode::Named(i) => vec![format!("body_{i}")],
        _ => (0..tools.len()).map(|i| format!("body_{i}")).collect(),
    };
    g += &format!("body: {}\n", bodies.join(" | "));
    g += &format!("call: {} body\n", lit(OPEN));
    let more = if parallel && !matches!(mode, ToolMode::Named(_)) {
        format!("(\"\\n\" call) ~ 0..{}", MAX_CALLS - 1)
    } else {
        String::new()
    };
    match mode {
        ToolMode::Required | ToolMode::Named(_) => {
            g += &format!("start: call {more}\n");
        }
        ToolMode::Auto => {
            // TEXT: anything without the marker; pre: text up to the first marker (lazy: it
            // ends as soon as the marker is complete)
            g += &format!("start: TEXT? | pre body {more}\n");
            g += "TEXT: /(?s:.+)/ & ~/(?s:.*)<tool_call>(?s:.*)/\n";
            g += "pre[lazy]: /(?s:.*)<tool_call>/\n";
        }
    }
    g
}

/// The tool-call instructions kojo puts in the system prompt when the model's chat template
/// has none of its own (see docs/structured.md).
pub fn generic_instructions(tools: &[Value]) -> String {
    let mut s = String::from(
        "You can call functions. Each function is described by one JSON object below:\n",
    );
    for t in tools {
        s += &t.to_string();
        s.push('\n');
    }
    s += "\nWhen a function call helps, answer with one line of JSON naming the function and \
          its arguments, between <tool_call> and </tool_call> lines, for example:\n\
          <tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n\
          </tool_call>\nOtherwise answer in plain text.";
    s
}

/// One call written the way kojo generates them (for tool-call history in prompts).
pub fn render_call(name: &str, arguments: &str) -> String {
    format!("{OPEN}{HEAD}{name}{ARGS}{arguments}{TERM}")
}

/// What the parser found in the next piece of output.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDelta {
    Content(String),
    /// Call `index` begins: its function's name.
    Start {
        index: usize,
        name: String,
    },
    /// More of call `index`'s arguments.
    Args {
        index: usize,
        fragment: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// free text (before any call), or separators between calls
    Outside,
    /// after `<tool_call>`, before the arguments
    Head,
    /// inside call's arguments
    Args,
}

/// Reads output text, in pieces of any size, into content and tool-call deltas.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    state: State,
    /// text not yet decided on
    buf: String,
    /// calls started so far
    calls: usize,
    /// calls whose end was seen
    complete: usize,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        Self::new()
    }
}

/// The length of the longest suffix of `s` that is a proper prefix of `pat` (on char
/// boundaries of `s`).
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && pat.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

impl ToolCallParser {
    pub fn new() -> Self {
        ToolCallParser {
            state: State::Outside,
            buf: String::new(),
            calls: 0,
            complete: 0,
        }
    }

    /// Calls whose end was seen.
    pub fn complete_calls(&self) -> usize {
        self.complete
    }

    /// Take `text`; the deltas it decides.
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        self.buf += text;
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Outside => {
                    if let Some(p) = self.buf.find(OPEN) {
                        let before: String = self.buf.drain(..p + OPEN.len()).collect();
                        let before = &before[..p];
                        if self.calls == 0 && !before.is_empty() {
                            out.push(ToolDelta::Content(before.to_string()));
                        }
                        self.state = State::Head;
                        continue;
                    }
                    let keep = partial_suffix(&self.buf, OPEN);
                    let sure: String = self.buf.drain(..self.buf.len() - keep).collect();
                    // after the first call, only separators come between calls
                    if self.calls == 0 && !sure.is_empty() {
                        out.push(ToolDelta::Content(sure));
                    }
                    break;
                }
                State::Head => {
                    let Some(p) = self.buf.find(ARGS) else { break };
                    let head: String = self.buf.drain(..p + ARGS.len()).collect();
                    let name = head[..p].trim_start_matches(HEAD).to_string();
                    out.push(ToolDelta::Start {
                        index: self.calls,
                        name,
                    });
                    self.calls += 1;
                    self.state = State::Args;
                }
                State::Args => {
                    let index = self.calls - 1;
                    if let Some(p) = self.buf.find(TERM) {
                        let args: String = self.buf.drain(..p + TERM.len()).collect();
                        let args = &args[..p];
                        if !args.is_empty() {
                            out.push(ToolDelta::Args {
                                index,
                                fragment: args.to_string(),
                            });
                        }
                        self.complete += 1;
                        self.state = State::Outside;
                        continue;
                    }
                    let keep = partial_suffix(&self.buf, TERM);
                    let sure: String = self.buf.drain(..self.buf.len() - keep).collect();
                    if !sure.is_empty() {
                        out.push(ToolDelta::Args {
                            index,
                            fragment: sure,
                        });
                    }
                    break;
                }
            }
        }
        out
    }

    /// The output ended: what was held back. Text held back outside a call is content; inside
    /// an unfinished call, the rest of its arguments as they are.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Outside if self.calls == 0 && !rest.is_empty() => {
                vec![ToolDelta::Content(rest)]
            }
            State::Args if !rest.is_empty() => vec![ToolDelta::Args {
                index: self.calls - 1,
                fragment: rest,
            }],
            _ => Vec::new(),
        }
    }
}

/// Calls and content summed from deltas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolOutput {
    pub content: String,
    /// (name, arguments)
    pub calls: Vec<(String, String)>,
}

impl ToolOutput {
    pub fn apply(&mut self, d: &ToolDelta) {
        match d {
            ToolDelta::Content(t) => self.content += t,
            ToolDelta::Start { name, .. } => self.calls.push((name.clone(), String::new())),
            ToolDelta::Args { index, fragment } => self.calls[*index].1 += fragment,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &str, piece: usize) -> ToolOutput {
        let mut p = ToolCallParser::new();
        let mut out = ToolOutput::default();
        let chars: Vec<char> = text.chars().collect();
        for c in chars.chunks(piece) {
            for d in p.push(&c.iter().collect::<String>()) {
                out.apply(&d);
            }
        }
        for d in p.finish() {
            out.apply(&d);
        }
        out
    }

    #[test]
    fn calls_parse_the_same_whatever_the_pieces() {
        let text = format!(
            "Let me check. {}\n{}",
            render_call(
                "get_weather",
                r#"{"city": "東京", "nested": {"a": [1, {"b": "}"}]}}"#
            ),
            render_call("get_time", r#"{}"#)
        );
        let whole = parse_in_pieces(&text, text.len());
        assert_eq!(whole.content, "Let me check. ");
        assert_eq!(
            whole.calls,
            vec![
                (
                    "get_weather".to_string(),
                    r#"{"city": "東京", "nested": {"a": [1, {"b": "}"}]}}"#.to_string()
                ),
                ("get_time".to_string(), "{}".to_string())
            ]
        );
        for piece in [1, 2, 3, 7, 13] {
            assert_eq!(parse_in_pieces(&text, piece), whole, "pieces of {piece}");
        }
    }

    #[test]
    fn text_without_calls_is_content() {
        for t in ["plain text", "a < b and <tool", "<tool_cal"] {
            let o = parse_in_pieces(t, 1);
            assert_eq!(o.content, t);
            assert!(o.calls.is_empty());
        }
    }
}
