//! The evidence package's model-channel section: what the identities' agents
//! sent to model APIs (resources with `profile = "openai"`), read from the
//! HTTP handler's records: calls, models, tokens, and prompts masked or
//! refused by prompt DLP, by detector. It answers "no privileged data
//! extracted" for the model channel with counts and citations, never with
//! prompt text (the records hold none).
//!
//! Bounded like the rest of the report: at most [`MAX_MODELS`] models and
//! [`super::model::LIST_CAP`] cited refusals; more are counted.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::audit::{Kind, Record};

/// Models itemised at most; more are counted in `models_omitted`.
pub const MAX_MODELS: usize = 64;

/// Calls, tokens and DLP outcomes for one model.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ModelEntry {
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A prompt DLP outcome, cited.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DlpEvent {
    pub seq: u64,
    pub time: String,
    pub resource: Option<String>,
    /// `masked` or `refused`.
    pub outcome: &'static str,
    /// Detector names that fired (never values).
    pub detectors: Vec<String>,
}

/// The section.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ModelChannel {
    /// Model calls completed (answers recorded).
    pub calls: u64,
    pub models: BTreeMap<String, ModelEntry>,
    pub models_omitted: u64,
    /// Prompts sent with values masked, and refused, by detector.
    pub prompts_masked: BTreeMap<String, u64>,
    pub prompts_refused: BTreeMap<String, u64>,
    pub dlp_events: Vec<DlpEvent>,
    pub dlp_events_omitted: u64,
}

impl ModelChannel {
    /// Takes one record in scope (an identity's, in the period).
    pub fn observe(&mut self, seq: u64, rec: &Record) {
        if rec.kind != Kind::Statement {
            return;
        }
        let Some(action) = rec.action.as_ref() else {
            return;
        };
        let Some(llm) = action.get("llm") else {
            return;
        };
        if let Some(dlp) = action.get("dlp") {
            let refused = rec
                .decision
                .as_ref()
                .and_then(|d| d.get("rule"))
                .and_then(Value::as_str)
                == Some("agentgate:prompt-dlp");
            let detectors: Vec<String> = dlp
                .get("masked")
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let counts = if refused {
                &mut self.prompts_refused
            } else {
                &mut self.prompts_masked
            };
            for d in &detectors {
                *counts.entry(d.clone()).or_default() += 1;
            }
            if self.dlp_events.len() < super::model::LIST_CAP {
                self.dlp_events.push(DlpEvent {
                    seq,
                    time: rec.time.clone(),
                    resource: rec.resource.clone(),
                    outcome: if refused { "refused" } else { "masked" },
                    detectors,
                });
            } else {
                self.dlp_events_omitted += 1;
            }
        }
        // The completion record carries the answer's usage.
        if rec.result.is_some() {
            self.calls += 1;
            let model = llm
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("(unknown)")
                .to_owned();
            if !self.models.contains_key(&model) && self.models.len() >= MAX_MODELS {
                self.models_omitted += 1;
                return;
            }
            let e = self.models.entry(model).or_default();
            e.calls += 1;
            let tokens = |k: &str| {
                llm.pointer(&format!("/usage/{k}"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            };
            e.prompt_tokens += tokens("prompt_tokens");
            e.completion_tokens += tokens("completion_tokens");
        }
    }
}

impl ModelChannel {
    /// The section of `index.html`.
    pub fn html(&self) -> String {
        use super::html::esc;
        use std::fmt::Write as _;
        let mut h = format!(
            "<section id=model-channel><h2>Model channel</h2><p>{} model call(s). Prompts sent with values masked: {}. Prompts refused: {}. No prompt text is recorded.</p><table><tr><th>Model</th><th>Calls</th><th>Prompt tokens</th><th>Completion tokens</th></tr>",
            self.calls,
            esc(&kv(&self.prompts_masked)),
            esc(&kv(&self.prompts_refused)),
        );
        for (m, e) in &self.models {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(m),
                e.calls,
                e.prompt_tokens,
                e.completion_tokens
            );
        }
        h.push_str("</table><table><tr><th>Record</th><th>Time</th><th>Resource</th><th>Prompt</th><th>Detectors</th></tr>");
        for d in &self.dlp_events {
            let _ = write!(
                h,
                "<tr><td>#{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                d.seq,
                esc(&d.time),
                esc(d.resource.as_deref().unwrap_or("")),
                d.outcome,
                esc(&d.detectors.join(", "))
            );
        }
        h.push_str("</table></section>");
        h
    }
}

fn kv(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[allow(clippy::needless_pass_by_value)]
    fn rec(action: Value, decision: Option<Value>, result: Option<Value>) -> Record {
        serde_json::from_value(json!({
            "v": 1, "seq": 1, "time": "2026-12-07T00:00:00.000000000Z", "host": "h",
            "kind": "statement", "session_id": null, "connection_id": 1, "identity": null,
            "workload": null, "resource": "model", "action": action, "decision": decision,
            "transform": null, "approval": null, "result": result, "prev": "00"
        }))
        .unwrap()
    }

    #[test]
    fn calls_tokens_and_dlp_by_detector() {
        let mut m = ModelChannel::default();
        m.observe(
            1,
            &rec(
                json!({"llm": {"model": "gpt"}, "dlp": {"masked": {"us_ssn": 1}}}),
                Some(json!({"verdict": "allow", "rule": "r"})),
                None,
            ),
        );
        m.observe(2, &rec(json!({"llm": {"model": "gpt", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}}), None, Some(json!({"status": "ok"}))));
        m.observe(
            3,
            &rec(
                json!({"llm": {"model": "gpt"}, "dlp": {"masked": {"card_pan": 2}}}),
                Some(json!({"verdict": "deny", "rule": "agentgate:prompt-dlp"})),
                None,
            ),
        );
        m.observe(
            4,
            &rec(
                json!({"method": "GET"}),
                None,
                Some(json!({"status": "ok"})),
            ),
        );
        assert_eq!(m.calls, 1);
        assert_eq!(
            m.models["gpt"],
            ModelEntry {
                calls: 1,
                prompt_tokens: 3,
                completion_tokens: 4
            }
        );
        assert_eq!(m.prompts_masked["us_ssn"], 1);
        assert_eq!(m.prompts_refused["card_pan"], 1);
        assert_eq!(m.dlp_events.len(), 2);
    }
}
