//! The one JSON document replicas share through `[store]` (at `PREFIX/table`): the mutable
//! state of the routing table (weights, rules, faults, mirroring) and the rollout's state.
//! Everything else (backends and their endpoints, listeners, timeouts) comes from each
//! replica's config file.
//!
//! A document is checked whole against the replica's config before anything of it is used:
//! faults and mirroring by the same checks as `PUT /admin/faults` and `/admin/mirror`, rules
//! as `[[rule]]`, weights as the admin API's. A document that fails is refused with a
//! message naming the field, and the table in force stays.
//!
//! ```json
//! {"format": 1,
//!  "weights": {"v1": 90, "v2": 10},
//!  "rules": [{"header": "x-canary", "equals": "always", "backend": "v2"}],
//!  "faults": [{"backend": "v2", "abort_percent": 5}],
//!  "mirror": null,
//!  "rollout": null,
//!  "written_by": "3f2a…", "written_at_ms": 1795745600000}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{fault_json, mirror_json};
use crate::config::{
    Config, FaultConfig, MAX_WEIGHT, MirrorConfig, RuleConfig, RuleMatcher, RuleSource,
    first_repeated_backend, rule,
};
use crate::routing::RoutingTable;

/// The document format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The document as stored: checked only for its shape until [`Document::check`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    pub format: u32,
    /// Weights by backend name. A backend of the config file the document does not name
    /// keeps the file's weight (a backend added to the files before any write names it); a
    /// name this replica's config does not have is left for the replicas that have it (a
    /// backend added to the other replicas' files first).
    pub weights: BTreeMap<String, u32>,
    /// `[[rule]]`s, with the file's keys, in order.
    #[serde(default)]
    pub rules: Vec<Value>,
    /// `[[fault]]`s, with the file's keys.
    #[serde(default)]
    pub faults: Vec<Value>,
    /// `[mirror]`, with the file's keys; `null`: off.
    #[serde(default)]
    pub mirror: Option<Value>,
    /// The rollout's state (its machine and evidence), as its leader last wrote it.
    #[serde(default)]
    pub rollout: Option<Value>,
    /// The replica that wrote this revision, for the log.
    #[serde(default)]
    pub written_by: String,
    /// When it was written (Unix ms, the writer's clock): a replica applying it reports the
    /// difference as `canary_store_watch_lag_seconds`.
    #[serde(default)]
    pub written_at_ms: u64,
}

/// What a checked document puts in force in the routing table.
#[derive(Debug, Clone)]
pub struct TableState {
    /// One weight per backend of the config, in its order.
    pub weights: Vec<u32>,
    pub rules: Vec<RuleConfig>,
    pub faults: Vec<FaultConfig>,
    pub mirror: Option<MirrorConfig>,
}

/// Why a document was refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DocumentError {
    pub field: String,
    pub message: String,
}

impl DocumentError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        DocumentError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Document {
    /// The document of `table`'s mutable state and the rollout's `rollout`.
    pub fn of(table: &RoutingTable, rollout: Option<Value>, written_by: &str) -> Document {
        let name = |index: usize| table.backends[index].name.as_str();
        Document {
            format: FORMAT,
            weights: table
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.weight))
                .collect(),
            rules: table
                .rules
                .iter()
                .map(|rule| shared_rule(&rule.source, &rule.matcher, name(rule.backend)))
                .collect(),
            faults: super::faults_of(table)
                .iter()
                .map(fault_json::fault_json)
                .collect(),
            mirror: table
                .mirror
                .as_ref()
                .map(|m| mirror_json::config_json(&m.config)),
            rollout,
            written_by: written_by.to_owned(),
            written_at_ms: crate::utc::unix_ms(),
        }
    }

    /// The document of a config file's weights, rules, faults and mirroring.
    pub fn from_config(config: &Config) -> Document {
        let name = |index: usize| config.backends[index].name.as_str();
        Document {
            format: FORMAT,
            weights: config
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.weight))
                .collect(),
            rules: config
                .rules
                .iter()
                .map(|rule| shared_rule(&rule.source, &rule.matcher, name(rule.backend)))
                .collect(),
            faults: config.faults.iter().map(fault_json::fault_json).collect(),
            mirror: config.mirror.as_ref().map(mirror_json::config_json),
            rollout: None,
            written_by: String::new(),
            written_at_ms: 0,
        }
    }

    /// The document a reload of `new` (over `old`, the file before) puts in force over this
    /// one: what the file changed is taken from it, the rest stays as shared. Backends the
    /// new file no longer has (and the old one had) drop out of the weights.
    pub fn merged_with_reload(&self, old: &Config, new: &Config) -> Document {
        let (old, new) = (Document::from_config(old), Document::from_config(new));
        let mut merged = self.clone();
        // A backend the file had and no longer has leaves; one neither file had is another
        // replica's, and stays.
        merged
            .weights
            .retain(|name, _| new.weights.contains_key(name) || !old.weights.contains_key(name));
        for (name, weight) in &new.weights {
            if old.weights.get(name) != Some(weight) {
                merged.weights.insert(name.clone(), *weight);
            }
        }
        if old.rules != new.rules {
            merged.rules = new.rules;
        }
        if old.faults != new.faults {
            merged.faults = new.faults;
        }
        if old.mirror != new.mirror {
            merged.mirror = new.mirror;
        }
        merged
    }

    /// Parses stored bytes (shape only).
    pub fn parse(bytes: &[u8]) -> Result<Document, DocumentError> {
        let document: Document = serde_json::from_slice(bytes)
            .map_err(|e| DocumentError::new("document", e.to_string()))?;
        if document.format != FORMAT {
            return Err(DocumentError::new(
                "format",
                format!(
                    "this build reads format {FORMAT}, the document is format {}",
                    document.format
                ),
            ));
        }
        Ok(document)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // A document of strings, numbers and JSON values always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether `other` puts the same state in the table (rollout and writer aside).
    pub fn same_table(&self, other: &Document) -> bool {
        self.weights == other.weights
            && self.rules == other.rules
            && self.faults == other.faults
            && self.mirror == other.mirror
    }

    /// Checks the document against the replica's `config`: every name it uses must be one
    /// of the config's backends, every value valid, some weight above 0.
    pub fn check(&self, config: &Config) -> Result<TableState, DocumentError> {
        let index_of = |field: String, name: &str| {
            config.backend_index(name).ok_or_else(|| {
                let known: Vec<&str> = config.backends.iter().map(|b| b.name.as_str()).collect();
                DocumentError::new(
                    field,
                    format!(
                        "unknown backend {name:?}; this replica's config declares {}",
                        known.join(", ")
                    ),
                )
            })
        };
        let mut weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
        for (name, &weight) in &self.weights {
            let Some(index) = config.backend_index(name) else {
                continue;
            };
            if weight > MAX_WEIGHT {
                return Err(DocumentError::new(
                    format!("weights.{name}"),
                    format!("must be an integer from 0 to {MAX_WEIGHT}, got {weight}"),
                ));
            }
            weights[index] = weight;
        }
        if weights.iter().all(|&w| w == 0) {
            return Err(DocumentError::new(
                "weights",
                "all weights are 0; at least one backend must keep a weight above 0",
            ));
        }
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| check_rule(i, rule, config))
            .collect::<Result<Vec<_>, _>>()?;
        let faults = self
            .faults
            .iter()
            .enumerate()
            .map(|(i, fault)| {
                let fault = fault_json::parse_one(i, fault)
                    .map_err(|e| DocumentError::new(format!("faults[{i}]"), e.to_string()))?;
                index_of(format!("faults[{i}].backend"), &fault.backend)?;
                Ok(fault)
            })
            .collect::<Result<Vec<_>, DocumentError>>()?;
        if let Some(i) = first_repeated_backend(&faults) {
            return Err(DocumentError::new(
                format!("faults[{i}].backend"),
                format!(
                    "backend {:?} is given two faults; one fault per backend",
                    faults[i].backend
                ),
            ));
        }
        let mirror = match &self.mirror {
            None | Some(Value::Null) => None,
            Some(value) => {
                let mirror = mirror_json::from_value(value)
                    .map_err(|e| DocumentError::new("mirror", e.to_string()))?;
                index_of("mirror.backend".into(), &mirror.backend)?;
                if let Some(from) = &mirror.from {
                    index_of("mirror.from".into(), from)?;
                }
                Some(mirror)
            }
        };
        Ok(TableState {
            weights,
            rules,
            faults,
            mirror,
        })
    }
}

/// A rule as the document holds it: the keys of `[[rule]]`, `backend` by name.
fn shared_rule(source: &RuleSource, matcher: &RuleMatcher, backend: &str) -> Value {
    let mut value = rule_json(source, matcher);
    value["backend"] = json!(backend);
    value
}

/// A rule as JSON, with the keys of `[[rule]]` (without `backend`).
pub fn rule_json(source: &RuleSource, matcher: &RuleMatcher) -> Value {
    let mut rule = match source {
        RuleSource::Header(name) => json!({"header": name.as_str()}),
        RuleSource::Cookie(name) => json!({"cookie": name}),
    };
    match matcher {
        RuleMatcher::Equals(v) => rule["equals"] = json!(v),
        RuleMatcher::Matches(re) => rule["matches"] = json!(re.as_str()),
        RuleMatcher::Present => rule["present"] = json!(true),
    }
    rule
}

const RULE_KEYS: [&str; 6] = [
    "header", "cookie", "equals", "matches", "present", "backend",
];

fn check_rule(i: usize, value: &Value, config: &Config) -> Result<RuleConfig, DocumentError> {
    let field = |name: &str| format!("rules[{i}].{name}");
    let Value::Object(map) = value else {
        return Err(DocumentError::new(
            format!("rules[{i}]"),
            "must be an object",
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !RULE_KEYS.contains(&k.as_str())) {
        return Err(DocumentError::new(
            format!("rules[{i}]"),
            format!("unknown key {unknown:?}; expected {}", RULE_KEYS.join(", ")),
        ));
    }
    let text = |name: &'static str| match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(DocumentError::new(
            field(name),
            format!("must be a string, got {other}"),
        )),
    };
    let source = match (text("header")?, text("cookie")?) {
        (Some(_), Some(_)) => {
            return Err(DocumentError::new(
                format!("rules[{i}]"),
                rule::BOTH_SOURCES,
            ));
        }
        (None, None) => return Err(DocumentError::new(format!("rules[{i}]"), rule::NO_SOURCE)),
        (Some(header), None) => RuleSource::Header(
            rule::header_name(header).map_err(|m| DocumentError::new(field("header"), m))?,
        ),
        (None, Some(cookie)) => {
            rule::cookie_name(cookie).map_err(|m| DocumentError::new(field("cookie"), m))?;
            RuleSource::Cookie(cookie.to_owned())
        }
    };
    let present = match map.get("present") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(true)) => Some(()),
        Some(Value::Bool(false)) => {
            return Err(DocumentError::new(field("present"), rule::PRESENT_FALSE));
        }
        Some(other) => {
            return Err(DocumentError::new(
                field("present"),
                format!("must be true, got {other}"),
            ));
        }
    };
    let equals = text("equals")?;
    let matches = text("matches")?;
    let given: Vec<&str> = [
        equals.map(|_| "equals"),
        matches.map(|_| "matches"),
        present.map(|()| "present"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let [first, second, ..] = given[..] {
        return Err(DocumentError::new(field(second), rule::two_matchers(first)));
    }
    let matcher = match (equals, matches, present) {
        (Some(value), _, _) => RuleMatcher::Equals(value.to_owned()),
        (_, Some(pattern), _) => RuleMatcher::Matches(
            rule::pattern(pattern).map_err(|m| DocumentError::new(field("matches"), m))?,
        ),
        (_, _, Some(())) => RuleMatcher::Present,
        (None, None, None) => {
            return Err(DocumentError::new(format!("rules[{i}]"), rule::NO_MATCHER));
        }
    };
    let backend = text("backend")?
        .ok_or_else(|| DocumentError::new(field("backend"), "a rule needs `backend`"))?;
    let backend = config.backend_index(backend).ok_or_else(|| {
        DocumentError::new(field("backend"), format!("unknown backend {backend:?}"))
    })?;
    Ok(RuleConfig {
        source,
        matcher,
        backend,
        line: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn config() -> Config {
        crate::config::parse(
            "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 90\n\
             [[backend]]\nname = \"v2\"\nurls = [\"http://127.0.0.1:2\"]\nweight = 10\n\
             [[rule]]\nheader = \"x-canary\"\nequals = \"always\"\nbackend = \"v2\"\n\
             [[rule]]\ncookie = \"beta\"\nmatches = \"^y\"\nbackend = \"v2\"\n\
             [[fault]]\nbackend = \"v2\"\nabort_percent = 5\n\
             [mirror]\nbackend = \"v2\"\nfrom = \"v1\"\npercent = 50\n",
            "canary.toml",
        )
        .unwrap()
    }

    fn document() -> Document {
        let config = config();
        let table = RoutingTable::from_config(&config, 1, None, &Metrics::new());
        Document::of(&table, Some(json!({"state": "idle"})), "a")
    }

    #[test]
    fn a_table_goes_round_through_its_document() {
        let config = config();
        let document = document();
        let parsed = Document::parse(&document.to_bytes()).unwrap();
        assert_eq!(parsed, document);
        let state = parsed.check(&config).unwrap();
        assert_eq!(state.weights, [90, 10]);
        assert_eq!(state.rules.len(), 2);
        assert!(matches!(&state.rules[1].source, RuleSource::Cookie(c) if c == "beta"));
        assert!(matches!(&state.rules[1].matcher, RuleMatcher::Matches(r) if r.as_str() == "^y"));
        assert_eq!(state.faults, config.faults);
        assert_eq!(state.mirror, config.mirror);
        assert_eq!(parsed.rollout, Some(json!({"state": "idle"})));
        assert!(parsed.same_table(&document));
    }

    #[test]
    fn backends_the_document_does_not_name_keep_the_files_weight() {
        let mut document = document();
        document.weights.remove("v1");
        document.weights.insert("v2".into(), 30);
        assert_eq!(document.check(&config()).unwrap().weights, [90, 30]);
    }

    #[test]
    fn bad_documents_name_the_field() {
        let config = config();
        type Change = Box<dyn Fn(&mut Document)>;
        let cases: Vec<(Change, &str)> = vec![
            // Cleared weights keep the file's: not an error.
            (Box::new(|d| d.weights.clear()), ""),
            (
                Box::new(|d| {
                    // Left for the replicas whose config has v3: not an error here.
                    d.weights.insert("v3".into(), 1);
                }),
                "",
            ),
            (
                Box::new(|d| {
                    d.weights.insert("v1".into(), MAX_WEIGHT + 1);
                }),
                "weights.v1",
            ),
            (
                Box::new(|d| {
                    d.weights.insert("v1".into(), 0);
                    d.weights.insert("v2".into(), 0);
                }),
                "weights",
            ),
            (
                Box::new(|d| d.rules[1]["matches"] = json!("(")),
                "rules[1].matches",
            ),
            (
                Box::new(|d| d.rules[0]["backend"] = json!("v9")),
                "rules[0].backend",
            ),
            (Box::new(|d| d.rules[0]["cookie"] = json!("c")), "rules[0]"),
            (
                Box::new(|d| d.rules[0]["present"] = json!(true)),
                "rules[0].present",
            ),
            (
                Box::new(|d| d.rules[0]["header"] = json!("a b")),
                "rules[0].header",
            ),
            (Box::new(|d| d.rules[0]["extra"] = json!(1)), "rules[0]"),
            (
                Box::new(|d| d.faults[0]["abort_percent"] = json!(101)),
                "faults[0]",
            ),
            (
                Box::new(|d| d.faults[0]["backend"] = json!("v9")),
                "faults[0].backend",
            ),
            (
                Box::new(|d| {
                    let again = d.faults[0].clone();
                    d.faults.push(again);
                }),
                "faults[1].backend",
            ),
            (
                Box::new(|d| d.mirror.as_mut().unwrap()["percent"] = json!(-1)),
                "mirror",
            ),
            (
                Box::new(|d| d.mirror.as_mut().unwrap()["backend"] = json!("v9")),
                "mirror.backend",
            ),
        ];
        for (i, (change, field)) in cases.iter().enumerate() {
            let mut document = document();
            change(&mut document);
            match document.check(&config) {
                Ok(_) if field.is_empty() => {}
                Ok(_) => panic!("case {i}: accepted, expected an error at {field}"),
                Err(e) => assert_eq!(e.field, *field, "case {i}: {e}"),
            }
        }
    }

    #[test]
    fn a_reload_publishes_only_what_the_file_changed() {
        let old = config();
        let mut shared = Document::from_config(&old);
        // Set through the API, and another replica's backend.
        shared.weights.insert("v1".into(), 40);
        shared.weights.insert("v3".into(), 7);
        let unchanged = shared.merged_with_reload(&old, &old);
        assert!(unchanged.same_table(&shared), "{unchanged:?}");
        // The file's v2 weight and rules changed: those are published, the rest stays.
        let mut new = old.clone();
        new.backends[1].weight = 33;
        new.rules.truncate(1);
        let merged = shared.merged_with_reload(&old, &new);
        assert_eq!(merged.weights["v1"], 40);
        assert_eq!(merged.weights["v2"], 33);
        assert_eq!(merged.weights["v3"], 7);
        assert_eq!(merged.rules.len(), 1);
        assert_eq!(merged.faults, shared.faults);
        // A backend the file had and dropped leaves the weights.
        let mut dropped = old.clone();
        dropped.backends.truncate(1);
        dropped.rules.clear();
        dropped.faults.clear();
        dropped.mirror = None;
        let merged = shared.merged_with_reload(&old, &dropped);
        assert!(!merged.weights.contains_key("v2"));
        assert_eq!(merged.weights["v3"], 7);
    }

    #[test]
    fn unreadable_bytes_are_refused() {
        for bytes in [
            &b"not json"[..],
            br#"{"format": 1}"#,
            br#"{"format": 2, "weights": {}}"#,
            br#"{"format": 1, "weights": {"v1": -1}}"#,
            br#"{"format": 1, "weights": {}, "surprise": 1}"#,
        ] {
            assert!(
                Document::parse(bytes).is_err(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(Document::parse(br#"{"format": 1, "weights": {"v1": 5}}"#).is_ok());
    }
}
