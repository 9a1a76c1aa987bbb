//! Chat templates: the model's own Jinja template rendered with minijinja, in the environment
//! Hugging Face transformers uses (`trim_blocks`, `lstrip_blocks`, loop controls), plus
//! Python's string methods (`.strip()`, `.startswith()`, ...), `raise_exception` and
//! `strftime_now`. A template that does not parse or fails while rendering is an error with the
//! template's line, never a panic.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

const NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
    /// The template writes tool calls itself in kojo's layout (`<tool_call>` tags, as Hermes-
    /// and Qwen-style templates do): tool requests render through it natively.
    pub native_tools: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    if let Some(line) = e.line() {
        if !msg.contains("line") {
            msg = format!("{msg} (line {line})");
        }
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {msg}"),
    ))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("bad strftime format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TemplateError(describe(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            native_tools: source.contains("<tool_call>") && source.contains("tools"),
        })
    }

    /// Render `messages` (OpenAI-style objects: role, content, ...). `extra` adds variables
    /// (tools, date, ...) on top of `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
    pub fn render<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, TemplateError> {
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| TemplateError(e.to_string()))?,
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        if let Some(extra) = extra {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError(describe(&e)))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| TemplateError(describe(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_string_methods_and_trim() {
        // expected output from Python's jinja2 with trim_blocks and lstrip_blocks
        let t = ChatTemplate::new(
            "  {% for m in messages %}\n{{ m['role'].upper() }}:{{ m['content'].strip() }}|\n  {% endfor %}{% if add_generation_prompt %}A:{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t
            .render(&json!([{"role": "user", "content": "  hi "}]), true, None)
            .unwrap();
        assert_eq!(out, "USER:hi|\nA:");
    }

    #[test]
    fn errors_are_errors() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = t.render(&json!([]), false, None).unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
