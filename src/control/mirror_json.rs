//! Mirroring as JSON: what a `PUT /admin/mirror` sends (the keys of `[mirror]`), checked by
//! the same rules as the config file, and what every answer shows. The store's shared
//! document holds it in the same form.

use serde_json::{Value, json};

use crate::config::{MirrorConfig, MirrorFields, format_size};
use crate::control::ControlError;
use crate::mirror::copy::Mirror;

const KEYS: [&str; 10] = [
    "backend",
    "from",
    "percent",
    "methods",
    "max_body",
    "max_in_flight",
    "timeout",
    "compare",
    "ignore_headers",
    "ignore_fields",
];

/// Mirroring as a `PUT` body asks for it: a JSON object with the keys of `[mirror]`.
pub fn parse(body: &[u8]) -> Result<MirrorConfig, ControlError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ControlError::MalformedJson(e.to_string()))?;
    from_value(&value)
}

/// Mirroring from a JSON object with the keys of `[mirror]`, checked as [`parse`] does.
pub fn from_value(value: &Value) -> Result<MirrorConfig, ControlError> {
    let Value::Object(map) = value else {
        return Err(malformed(
            "expected an object with the keys of [mirror], e.g. {\"backend\": \"v2\"}",
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(malformed(&format!(
            "unknown key {unknown:?}; expected one of {}",
            KEYS.join(", ")
        )));
    }
    let invalid = |field: &'static str, what: &str, got: &Value| ControlError::InvalidMirror {
        field,
        message: format!("must be {what}, got {got}"),
    };
    let text = |field: &'static str| match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(invalid(field, "a string", other)),
    };
    let texts = |field: &'static str| match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| invalid(field, "a list of strings", item))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(invalid(field, "a list of strings", other)),
    };
    let percent = match map.get("percent") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(other) => return Err(invalid("percent", "a number", other)),
    };
    let max_in_flight = match map.get("max_in_flight") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        Some(other) => return Err(invalid("max_in_flight", "an integer", other)),
    };
    let compare = match map.get("compare") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => return Err(invalid("compare", "true or false", other)),
    };
    let fields = MirrorFields {
        backend: text("backend")?,
        from: text("from")?,
        percent,
        methods: texts("methods")?,
        max_body: text("max_body")?,
        max_in_flight,
        timeout: text("timeout")?,
        compare,
        ignore_headers: texts("ignore_headers")?,
        ignore_fields: texts("ignore_fields")?,
    };
    fields.check().map_err(|e| ControlError::InvalidMirror {
        field: e.field,
        message: e.message,
    })
}

fn malformed(message: &str) -> ControlError {
    ControlError::MalformedJson(message.to_owned())
}

/// The config as `GET /admin/mirror` shows it, with the keys of `[mirror]`.
pub fn config_json(config: &MirrorConfig) -> Value {
    json!({
        "backend": config.backend,
        "from": config.from,
        "percent": config.percent,
        "methods": config.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        "max_body": format_size(config.max_body),
        "max_in_flight": config.max_in_flight,
        "timeout": crate::duration::format_duration(config.timeout),
        "compare": config.compare,
        "ignore_headers": config.ignore_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
        "ignore_fields": config.ignore_fields,
    })
}

/// Every `/admin/mirror` answer: the config (null when mirroring is off) and the report.
pub fn to_json(version: u64, mirror: Option<&Mirror>) -> Value {
    match mirror {
        None => json!({"version": version, "config": null}),
        Some(mirror) => {
            let mut shown = mirror.report.to_json();
            shown["version"] = json!(version);
            shown["config"] = config_json(&mirror.config);
            shown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_get_shows_goes_back_in() {
        let config =
            parse(br#"{"backend": "v2", "percent": 50, "max_body": "1MiB", "methods": ["GET"]}"#)
                .unwrap();
        assert_eq!(config.percent, 50.0);
        let shown = config_json(&config);
        assert_eq!(shown["max_body"], "1MiB");
        assert_eq!(shown["timeout"], "5s");
        assert_eq!(parse(shown.to_string().as_bytes()).unwrap(), config);
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let refused = |body: &str| parse(body.as_bytes()).unwrap_err().to_string();
        assert!(refused("[1]").contains("expected an object"));
        assert!(refused(r#"{"backend": "v2", "percnt": 5}"#).contains("unknown key \"percnt\""));
        assert!(refused(r#"{"percent": 5}"#).contains("mirror.backend"));
        assert!(refused(r#"{"backend": "v2", "percent": "5"}"#).contains("mirror.percent"));
        assert!(refused(r#"{"backend": "v2", "methods": "GET"}"#).contains("mirror.methods"));
        assert!(refused(r#"{"backend": "v2", "max_body": "64"}"#).contains("mirror.max_body"));
        assert!(refused(r#"{"backend": "v2", "compare": 1}"#).contains("mirror.compare"));
    }
}
