//! The `openai` profile: what a model call is (chat completions and the
//! Responses API), and data-loss prevention on the prompt before it leaves.
//!
//! The record of a call carries the model, whether it streams, the tool
//! names offered, the prompt's keyed hash and size, and from the answer the
//! token usage and the names of the tools the model called with the shape
//! (keys, never values) of their arguments. Never the prompt text.
//!
//! Outbound DLP runs the value detectors over every string of the request
//! body; a hit is masked in place or refuses the call, as the resource says,
//! and the record names the detector and the JSON path, never the value.
//! Fails closed: a call body that is not JSON is refused.

use serde_json::{Value, json};

use super::body::{Masked, mask_json};
use crate::mask::MaskPolicy;

/// Is this request a model call the profile reads?
pub fn is_model_call(method: &str, path: &str) -> bool {
    method == "POST"
        && (path.ends_with("/chat/completions")
            || path.ends_with("/responses")
            || path.ends_with("/completions")
            || path.ends_with("/embeddings"))
}

/// A model call's request, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub model: Option<String>,
    pub stream: bool,
    pub tools: Vec<String>,
    pub prompt_hash: String,
    pub prompt_bytes: usize,
}

impl Call {
    pub fn record(&self) -> Value {
        json!({
            "model": self.model,
            "stream": self.stream,
            "tools_offered": self.tools,
            "prompt_hash": self.prompt_hash,
            "prompt_bytes": self.prompt_bytes,
        })
    }
}

/// Reads a call's request body (already parsed).
pub fn read_call(body: &Value, key: &[u8; 32]) -> Call {
    let prompt = ["messages", "input", "instructions", "prompt"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter_map(|t| {
                    t.pointer("/function/name")
                        .or_else(|| t.get("name"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .take(64)
                .collect()
        })
        .unwrap_or_default();
    Call {
        model: body.get("model").and_then(Value::as_str).map(str::to_owned),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        tools,
        prompt_hash: crate::audit::keyed_hash(key, prompt.as_bytes()),
        prompt_bytes: prompt.len(),
    }
}

/// Runs the detectors over every string of the body; masks in place.
pub fn scan_prompt(policy: &MaskPolicy, body: &mut Value) -> Masked {
    let mut masked = Masked::default();
    mask_json(policy, body, &mut masked);
    masked
}

/// What an answer says: model, usage, tool calls (names and argument keys).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Answer {
    pub model: Option<String>,
    pub usage: Option<Value>,
    pub tool_calls: Vec<Value>,
}

impl Answer {
    pub fn record(&self) -> Value {
        json!({ "model": self.model, "usage": self.usage, "tool_calls": self.tool_calls })
    }

    /// Takes what one JSON object (a whole answer, or one streamed event) says.
    pub fn absorb(&mut self, v: &Value) {
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            self.model = Some(m.to_owned());
        }
        // The Responses API nests the answer in `response` in its events.
        if let Some(r) = v.get("response") {
            self.absorb(r);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let pick = |k: &str| u.get(k).and_then(Value::as_u64);
            self.usage = Some(json!({
                "prompt_tokens": pick("prompt_tokens").or_else(|| pick("input_tokens")),
                "completion_tokens": pick("completion_tokens").or_else(|| pick("output_tokens")),
                "total_tokens": pick("total_tokens"),
            }));
        }
        let mut calls = Vec::new();
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for tc in c
                .pointer("/message/tool_calls")
                .or_else(|| c.pointer("/delta/tool_calls"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(name) = tc.pointer("/function/name").and_then(Value::as_str) {
                    let args = tc.pointer("/function/arguments").and_then(Value::as_str);
                    calls.push(tool_call(name, args));
                }
            }
        }
        for item in v
            .get("output")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if item.get("type").and_then(Value::as_str) == Some("function_call")
                && let Some(name) = item.get("name").and_then(Value::as_str)
            {
                calls.push(tool_call(
                    name,
                    item.get("arguments").and_then(Value::as_str),
                ));
            }
        }
        for c in calls {
            if self.tool_calls.len() < 64 {
                self.tool_calls.push(c);
            }
        }
    }
}

/// A tool call's name and the keys of its arguments (never their values).
fn tool_call(name: &str, args: Option<&str>) -> Value {
    let keys: Option<Vec<String>> = args
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .and_then(|v| v.as_object().map(|o| o.keys().take(32).cloned().collect()));
    json!({ "name": name, "argument_keys": keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{DetectorSet, Strategy};

    #[test]
    fn a_prompt_with_an_ssn_is_masked_and_the_record_names_only_detector_and_path() {
        let policy = MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact);
        let mut body = json!({
            "model": "gpt-x",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "content": "{\"ssn\": \"123-45-6789\"}"}
            ],
            "tools": [{"type": "function", "function": {"name": "query"}}]
        });
        let call = read_call(&body, &[1; 32]);
        assert_eq!(call.model.as_deref(), Some("gpt-x"));
        assert_eq!(call.tools, ["query"]);
        let hits = scan_prompt(&policy, &mut body);
        assert_eq!(hits.hits, [("us_ssn", "$.messages[1].content".to_owned())]);
        assert!(!body.to_string().contains("123-45-6789"));
        assert!(!hits.record().to_string().contains("6789"));
    }

    #[test]
    fn usage_and_tool_calls_from_both_apis() {
        let mut a = Answer::default();
        a.absorb(
            &json!({"model": "m", "choices": [{"message": {"tool_calls": [
            {"function": {"name": "query", "arguments": "{\"sql\": \"SELECT secret\"}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
        );
        assert_eq!(a.usage.as_ref().unwrap()["total_tokens"], 7);
        assert_eq!(
            a.tool_calls[0],
            json!({"name": "query", "argument_keys": ["sql"]})
        );
        assert!(!a.record().to_string().contains("SELECT"));
        let mut r = Answer::default();
        r.absorb(
            &json!({"type": "response.completed", "response": {"model": "m2",
            "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}}}),
        );
        assert_eq!(r.usage.unwrap()["prompt_tokens"], 5);
    }
}
