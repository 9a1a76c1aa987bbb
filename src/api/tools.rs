//! Tool calling on the wire: `tools`, `tool_choice` and `parallel_tool_calls` validated into a
//! [`ToolSetup`], tool-call history in `messages` checked, and the messages given to the chat
//! template: natively when the template writes kojo's call layout (`<tool_call>`), through the
//! generic format otherwise (docs/structured.md).

use super::error::ApiError;
use crate::structured::tools::{generic_instructions, render_call, valid_name, Tool, ToolMode};
use serde_json::{json, Value};

/// The most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

#[derive(Debug, Clone)]
pub struct ToolSetup {
    pub tools: Vec<Tool>,
    /// the `tools` list as sent (what a template's `tools` variable gets)
    pub raw: Vec<Value>,
    /// `None`: `tool_choice: "none"` (no calls: the output is text, nothing parses it)
    pub mode: Option<ToolMode>,
    pub parallel: bool,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

/// `tools`, `tool_choice`, `parallel_tool_calls`; `None` when no tools are offered.
pub fn parse_tools(
    tools: &Option<Value>,
    choice: &Option<Value>,
    parallel: &Option<Value>,
) -> Result<Option<ToolSetup>, ApiError> {
    // off unless asked for, as llama.cpp's server has it: a small model asked for one call
    // tends to repeat it until it runs out of tokens
    let parallel = match parallel {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(bad(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be a boolean",
            ))
        }
    };
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad("tools", "`tools` must be a list")),
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(
            "tools",
            format!("at most {MAX_TOOLS} tools per request"),
        ));
    }
    let mut parsed = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let p = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(&p, format!("`{p}.type` must be \"function\"")));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| bad(&p, format!("`{p}.function` must be an object")))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        if !valid_name(name) {
            return Err(bad(
                &p,
                format!(
                    "`{p}.function.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -; got {name:?}"
                ),
            ));
        }
        if parsed.iter().any(|x: &Tool| x.name == name) {
            return Err(bad(&p, format!("two tools are named '{name}'")));
        }
        let parameters = match f.get("parameters") {
            // OpenAI: omitted parameters are an empty parameter list
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                return Err(bad(
                    &p,
                    format!("`{p}.function.parameters` must be a JSON schema object"),
                ))
            }
        };
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => {
                return Err(bad(
                    &p,
                    format!("`{p}.function.description` must be a string"),
                ))
            }
        };
        parsed.push(Tool {
            name: name.to_string(),
            description,
            parameters,
        });
    }
    let mode = match choice {
        None | Some(Value::Null) => (!parsed.is_empty()).then_some(ToolMode::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" | "required" if parsed.is_empty() => {
                return Err(bad(
                    "tool_choice",
                    format!("`tool_choice: \"{s}\"` needs `tools`"),
                ))
            }
            "auto" => Some(ToolMode::Auto),
            "required" => Some(ToolMode::Required),
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("`tool_choice` '{other}' is not one of none, auto, required"),
                ))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            let i = parsed.iter().position(|t| t.name == name).ok_or_else(|| {
                bad(
                    "tool_choice",
                    format!("`tool_choice` names '{name}', which is not in `tools`"),
                )
            })?;
            Some(ToolMode::Named(i))
        }
        Some(_) => {
            return Err(bad(
                "tool_choice",
                "`tool_choice` must be a string or an object",
            ))
        }
    };
    if parsed.is_empty() {
        return Ok(None);
    }
    Ok(Some(ToolSetup {
        tools: parsed,
        raw: list,
        mode,
        parallel,
    }))
}

/// An assistant message's `tool_calls` (history), checked: `[{id, type, function: {name,
/// arguments}}]`, arguments a JSON string.
pub fn history_calls(v: &Value, i: usize) -> Result<Value, ApiError> {
    let p = format!("messages[{i}].tool_calls");
    let calls = v
        .as_array()
        .ok_or_else(|| bad(&p, format!("`{p}` must be a list")))?;
    let mut out = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let f = c.get("function").filter(|f| f.is_object());
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let args = f.and_then(|f| f.get("arguments"));
        let (Some(name), Some(args)) = (name, args) else {
            return Err(bad(
                &p,
                format!("`{p}[{j}]` must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"),
            ));
        };
        let args = match args {
            Value::String(s) => s.clone(),
            // some clients send the object itself
            Value::Object(_) => args.to_string(),
            _ => {
                return Err(bad(
                    &p,
                    format!("`{p}[{j}].function.arguments` must be a JSON string"),
                ))
            }
        };
        out.push(json!({
            "id": c.get("id").cloned().unwrap_or(Value::Null),
            "type": "function",
            "function": {"name": name, "arguments": args},
        }));
    }
    Ok(Value::Array(out))
}

/// The messages and extra template variables for a chat template. `native`: the template
/// writes tool calls in kojo's layout itself (it gets `tools`, and `tool_calls` with their
/// arguments as objects, as Hugging Face templates expect). Otherwise the generic format:
/// the tools described in the system message, past calls written into the assistant's
/// content, tool results as user messages in `<tool_response>` tags.
pub fn template_messages(
    messages: Vec<Value>,
    tools: Option<&ToolSetup>,
    native: bool,
) -> (Vec<Value>, Option<serde_json::Map<String, Value>>) {
    let offered = tools.filter(|t| t.mode.is_some());
    if native {
        let messages = messages
            .into_iter()
            .map(|mut m| {
                if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
                    for c in calls {
                        let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                        if let Ok(obj) = serde_json::from_str::<Value>(args) {
                            c["function"]["arguments"] = obj;
                        }
                    }
                }
                m
            })
            .collect();
        let extra = offered.map(|t| {
            let mut m = serde_json::Map::new();
            m.insert("tools".into(), Value::Array(t.raw.clone()));
            m
        });
        return (messages, extra);
    }
    let has_history = messages
        .iter()
        .any(|m| m.get("tool_calls").is_some() || m["role"] == "tool");
    if offered.is_none() && !has_history {
        return (messages, None);
    }
    let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = offered {
        let functions: Vec<Value> = t.raw.iter().map(|x| x["function"].clone()).collect();
        let text = generic_instructions(&functions);
        match messages.first() {
            Some(m) if m["role"] == "system" => {
                let content = m["content"].as_str().unwrap_or("");
                out.push(json!({"role": "system", "content": format!("{content}\n\n{text}")}));
            }
            _ => out.push(json!({"role": "system", "content": text})),
        }
    }
    for (k, m) in messages.into_iter().enumerate() {
        if k == 0 && offered.is_some() && m["role"] == "system" {
            continue; // merged above
        }
        if m["role"] == "tool" {
            let content = m["content"].as_str().unwrap_or("");
            out.push(json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")}));
            continue;
        }
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            let mut content = m["content"].as_str().unwrap_or("").to_string();
            for c in calls {
                if !content.is_empty() {
                    content.push('\n');
                }
                let name = c["function"]["name"].as_str().unwrap_or("");
                let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                // written compactly, as kojo generates calls
                let args = serde_json::from_str::<Value>(args)
                    .map(|v| compact_json(&v))
                    .unwrap_or_else(|_| args.to_string());
                content += &render_call(name, &args);
            }
            out.push(json!({"role": "assistant", "content": content}));
            continue;
        }
        out.push(m);
    }
    (out, None)
}

/// JSON written with `", "` and `": "` separators (the layout kojo's grammars generate).
pub fn compact_json(v: &Value) -> String {
    match v {
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(compact_json).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), compact_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ChatTemplate;

    fn setup() -> ToolSetup {
        let raw = vec![
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
        ];
        parse_tools(&Some(Value::Array(raw)), &None, &None)
            .unwrap()
            .unwrap()
    }

    fn history() -> Vec<Value> {
        vec![
            json!({"role": "user", "content": "Weather in Oslo?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "{\"deg\": 3}"}),
        ]
    }

    /// A template that writes `<tool_call>` itself gets `tools` and the calls' arguments as
    /// objects, as Hugging Face templates expect (this one is written for the test in the
    /// style of Hermes/Qwen templates).
    #[test]
    fn native_templates_get_tools_and_argument_objects() {
        let src = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}\
            {% for m in messages %}[{{ m.role }}]{{ m.content }}\
            {% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}:{{ c.function.arguments.city }}</tool_call>{% endfor %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert!(t.native_tools);
        let (msgs, extra) = template_messages(history(), Some(&setup()), true);
        let out = t.render(&msgs, false, extra.as_ref()).unwrap();
        assert_eq!(
            out,
            // (trim_blocks eats the newline after each block tag)
            "TOOLS:get_weather;[user]Weather in Oslo?[assistant]<tool_call>get_weather:Oslo</tool_call>[tool]{\"deg\": 3}"
        );
    }

    /// Without tool support in the template: the tools in the system message, past calls in
    /// kojo's layout, results as user messages.
    #[test]
    fn the_generic_format() {
        let (msgs, extra) = template_messages(history(), Some(&setup()), false);
        assert!(extra.is_none());
        assert_eq!(msgs[0]["role"], "system");
        assert!(msgs[0]["content"]
            .as_str()
            .unwrap()
            .contains("\"name\":\"get_weather\""));
        assert_eq!(
            msgs[2]["content"],
            render_call("get_weather", "{\"city\": \"Oslo\"}")
        );
        assert_eq!(msgs[3]["role"], "user");
        assert_eq!(
            msgs[3]["content"],
            "<tool_response>\n{\"deg\": 3}\n</tool_response>"
        );
        // tool_choice none: no instructions, the history still rendered
        let mut none = setup();
        none.mode = None;
        let (msgs, _) = template_messages(history(), Some(&none), false);
        assert_eq!(msgs[0]["role"], "user");
        assert_eq!(msgs[2]["role"], "user");
    }
}
