use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;
use toml::de::DeTable;

use super::diagnostics::{
    FieldError, describe_unknown_key, key_path_at, key_path_from_line, line_around, one_line,
    unquoted_string_hint,
};

// ---------------------------------------------------------------------------------------------
// Stage 1: raw structs mirroring the file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a TOML document")]
pub(super) struct RawConfig {
    pub(super) proxy: Option<RawProxy>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) backend: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    pub(super) rule: Option<Vec<Spanned<RawRule>>>,
    pub(super) rollout: Option<Spanned<RawRollout>>,
    pub(super) fault: Option<Vec<Spanned<RawFault>>>,
    pub(super) mirror: Option<Spanned<RawMirror>>,
    pub(super) log: Option<RawLog>,
    pub(super) store: Option<Spanned<RawStore>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawStore {
    pub(super) etcd: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) snapshot: Option<Spanned<String>>,
    pub(super) lease_ttl: Option<Spanned<RawDuration>>,
    pub(super) timeout: Option<Spanned<RawDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawLog {
    pub(super) format: Option<Spanned<String>>,
    pub(super) access: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawMirror {
    pub(super) from: Option<Spanned<String>>,
    pub(super) backend: Option<Spanned<String>>,
    pub(super) percent: Option<Spanned<RawNumber>>,
    pub(super) methods: Option<Spanned<Vec<String>>>,
    pub(super) max_body: Option<Spanned<String>>,
    pub(super) max_in_flight: Option<Spanned<RawInt>>,
    pub(super) timeout: Option<Spanned<RawDuration>>,
    pub(super) compare: Option<Spanned<bool>>,
    pub(super) ignore_headers: Option<Spanned<Vec<String>>>,
    pub(super) ignore_fields: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawFault {
    pub(super) backend: Option<Spanned<String>>,
    pub(super) abort_percent: Option<Spanned<RawNumber>>,
    pub(super) abort_status: Option<Spanned<RawInt>>,
    pub(super) delay_percent: Option<Spanned<RawNumber>>,
    pub(super) delay: Option<Spanned<RawDuration>>,
    pub(super) header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawRollout {
    pub(super) baseline: Option<Spanned<String>>,
    pub(super) canary: Option<Spanned<String>>,
    pub(super) shadow: Option<Spanned<RawDuration>>,
    pub(super) steps: Option<Spanned<Vec<Spanned<RawInt>>>>,
    pub(super) step_time: Option<Spanned<RawDuration>>,
    pub(super) approve: Option<Vec<Spanned<RawInt>>>,
    pub(super) webhook: Option<Spanned<String>>,
    pub(super) analysis: Option<RawAnalysis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawAnalysis {
    pub(super) interval: Option<Spanned<RawDuration>>,
    pub(super) min_requests: Option<Spanned<RawInt>>,
    pub(super) max_step_time: Option<Spanned<RawDuration>>,
    pub(super) on_inconclusive: Option<Spanned<String>>,
    pub(super) error_tolerance: Option<Spanned<RawNumber>>,
    pub(super) latency_tolerance: Option<Spanned<RawNumber>>,
    pub(super) confidence: Option<Spanned<RawNumber>>,
    pub(super) max_diff_rate: Option<Spanned<RawNumber>>,
}

/// Any TOML number, integer or float, range-checked in stage 2.
pub(super) struct RawNumber(pub(super) f64);

impl<'de> Deserialize<'de> for RawNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NumberVisitor;
        impl Visitor<'_> for NumberVisitor {
            type Value = RawNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number such as 0.01")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawNumber, E> {
                Ok(RawNumber(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawNumber, E> {
                Ok(RawNumber(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawNumber, E> {
                Ok(RawNumber(v as f64))
            }
        }
        deserializer.deserialize_f64(NumberVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawProxy {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<RawDuration>>,
    pub(super) request_timeout: Option<Spanned<RawDuration>>,
    pub(super) client_body_timeout: Option<Spanned<RawDuration>>,
    pub(super) read_timeout: Option<Spanned<RawDuration>>,
    pub(super) send_timeout: Option<Spanned<RawDuration>>,
    pub(super) header_read_timeout: Option<Spanned<RawDuration>>,
    pub(super) upstream_idle_timeout: Option<Spanned<RawDuration>>,
    pub(super) shutdown_grace: Option<Spanned<RawDuration>>,
    pub(super) user_id_header: Option<Spanned<String>>,
    pub(super) user_id_cookie: Option<Spanned<String>>,
    pub(super) sticky_salt: Option<String>,
    pub(super) sticky_cookie: Option<Spanned<String>>,
    pub(super) sticky_cookie_max_age: Option<Spanned<RawDuration>>,
    pub(super) backend_header: Option<Spanned<String>>,
    pub(super) workers: Option<Spanned<RawInt>>,
    pub(super) tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTls {
    pub(super) cert: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) sni: Option<Vec<Spanned<RawSni>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawSni {
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) cert: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) token: Option<Spanned<String>>,
    pub(super) token_env: Option<Spanned<String>>,
    pub(super) allowed_hosts: Option<Vec<Spanned<String>>>,
    pub(super) max_connections: Option<Spanned<RawInt>>,
    pub(super) header_read_timeout: Option<Spanned<RawDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawBackend {
    pub(super) name: Option<Spanned<String>>,
    pub(super) urls: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) weight: Option<Spanned<RawInt>>,
    pub(super) protocol: Option<Spanned<String>>,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) outlier: Option<Spanned<RawOutlier>>,
    pub(super) tls: Option<Spanned<RawBackendTls>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawBackendTls {
    pub(super) ca: Option<Spanned<String>>,
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) insecure_skip_verify: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawHealth {
    pub(super) path: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<RawDuration>>,
    pub(super) timeout: Option<Spanned<RawDuration>>,
    pub(super) unhealthy_threshold: Option<Spanned<RawInt>>,
    pub(super) healthy_threshold: Option<Spanned<RawInt>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawOutlier {
    pub(super) consecutive_failures: Option<Spanned<RawInt>>,
    pub(super) base_ejection: Option<Spanned<RawDuration>>,
    pub(super) max_ejection: Option<Spanned<RawDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawRule {
    pub(super) header: Option<Spanned<String>>,
    pub(super) cookie: Option<Spanned<String>>,
    pub(super) equals: Option<Spanned<String>>,
    pub(super) matches: Option<Spanned<String>>,
    pub(super) present: Option<Spanned<bool>>,
    pub(super) backend: Option<Spanned<String>>,
}

/// A duration string, parsed in stage 2; its own type so a bare number gets a useful hint.
pub(super) struct RawDuration(pub(super) String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"2s\" or \"500ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Any TOML integer, range-checked in stage 2 so a negative weight gets a clear message
/// instead of "expected u32".
pub(super) struct RawInt(pub(super) i64);

impl<'de> Deserialize<'de> for RawInt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = RawInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawInt, E> {
                Ok(RawInt(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawInt, E> {
                i64::try_from(v)
                    .map(RawInt)
                    .map_err(|_| E::custom("integer is too large"))
            }
        }
        deserializer.deserialize_i64(IntVisitor)
    }
}

/// Stage 1: TOML syntax and shape. Errors are located by walking a span-carrying parse of the
/// same text for the deepest key whose span holds the error.
pub(super) fn deserialize(text: &str) -> Result<RawConfig, FieldError> {
    let tree = match DeTable::parse(text) {
        Ok(tree) => tree,
        Err(e) => {
            let (partial, _) = DeTable::parse_recoverable(text);
            let offset = e.span().map_or(0, |s| s.start);
            let key = key_path_at(&partial, offset)
                .or_else(|| key_path_from_line(&partial, text, offset))
                .unwrap_or_else(|| TOP_LEVEL.to_owned());
            let mut message = format!("invalid TOML: {}", one_line(e.message()));
            if let Some(hint) = unquoted_string_hint(line_around(text, offset).1) {
                message.push_str(&hint);
            }
            return Err(FieldError::new(key, offset..offset, message));
        }
    };
    RawConfig::deserialize(toml::Deserializer::from(tree.clone())).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let key = key_path_at(&tree, offset).unwrap_or_else(|| TOP_LEVEL.to_owned());
        let mut message =
            describe_unknown_key(e.message()).unwrap_or_else(|| one_line(e.message()).into_owned());
        if message.ends_with("expected a sequence") {
            if matches!(key.as_str(), "backend" | "rule" | "fault") {
                message.push_str(&format!("; write `[[{key}]]` (an array of tables)"));
            } else if message.starts_with("invalid type: string") {
                message.push_str("; write a list, e.g. [\"http://127.0.0.1:8081\"]");
            }
        }
        FieldError::new(key, offset..offset, message)
    })
}

/// Key shown when an error cannot be tied to any key.
const TOP_LEVEL: &str = "(top level)";
