//! Faults as JSON: what a `PUT /admin/faults` sends (a list of faults, with the keys of
//! `[[fault]]`), checked by the same rules as the config file, and what every answer shows.
//! The store's shared document holds them in the same form.

use serde_json::{Value, json};

use crate::config::{FaultConfig, FaultFields};
use crate::control::ControlError;

const KEYS: [&str; 6] = [
    "backend",
    "abort_percent",
    "abort_status",
    "delay_percent",
    "delay",
    "header",
];

/// The faults of a `PUT` body: a JSON list of objects, or `{"faults": [...]}` (what `GET`
/// answers, so it can be sent back edited), with the `version` it was read at if it says
/// one (the write then goes through only at that version, as with `If-Match`). Each fault
/// is checked as a `[[fault]]` is; whether the backends exist, and only one fault each, is
/// for the control plane to check.
pub fn parse(body: &[u8]) -> Result<(Vec<FaultConfig>, Option<u64>), ControlError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ControlError::MalformedJson(e.to_string()))?;
    let (list, version) = match value {
        Value::Array(list) => (list, None),
        Value::Object(mut map)
            if map.contains_key("faults")
                && map.keys().all(|k| k == "faults" || k == "version") =>
        {
            let version = match map.remove("version") {
                None => None,
                Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
                Some(_) => return Err(malformed("\"version\" must be a table version")),
            };
            match map.remove("faults") {
                Some(Value::Array(list)) => (list, version),
                _ => return Err(malformed("\"faults\" must be a list")),
            }
        }
        _ => {
            return Err(malformed(
                "expected a list of faults, e.g. [{\"backend\": \"v2\", \"abort_percent\": 5}]",
            ));
        }
    };
    let faults = list
        .iter()
        .enumerate()
        .map(|(index, item)| parse_one(index, item))
        .collect::<Result<_, _>>()?;
    Ok((faults, version))
}

pub fn parse_one(index: usize, item: &Value) -> Result<FaultConfig, ControlError> {
    let invalid = |field: &'static str, message: String| ControlError::InvalidFault {
        index,
        field,
        message,
    };
    let Value::Object(map) = item else {
        return Err(malformed(&format!("faults[{index}] must be an object")));
    };
    if let Some(unknown) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(malformed(&format!(
            "faults[{index}]: unknown key {unknown:?}; expected one of {}",
            KEYS.join(", ")
        )));
    }
    let text = |field: &'static str| match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(invalid(field, format!("must be a string, got {other}"))),
    };
    let number = |field: &'static str| match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(invalid(field, format!("must be a number, got {other}"))),
    };
    let status = match map.get("abort_status") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .ok_or_else(|| invalid("abort_status", format!("must be an integer, got {n}")))?,
        ),
        Some(other) => {
            return Err(invalid(
                "abort_status",
                format!("must be an integer, got {other}"),
            ));
        }
    };
    let fields = FaultFields {
        backend: text("backend")?,
        abort_percent: number("abort_percent")?,
        abort_status: status,
        delay_percent: number("delay_percent")?,
        delay: text("delay")?,
        header: text("header")?,
    };
    fields.check().map_err(|e| invalid(e.field, e.message))
}

fn malformed(message: &str) -> ControlError {
    ControlError::MalformedJson(message.to_owned())
}

/// The faults in force, as every `/admin/faults` answer shows them.
pub fn to_json(version: u64, faults: &[FaultConfig]) -> Value {
    let faults: Vec<Value> = faults.iter().map(fault_json).collect();
    json!({"version": version, "faults": faults})
}

/// One fault, with the keys of `[[fault]]` (`delay` null when nothing is delayed).
pub fn fault_json(fault: &FaultConfig) -> Value {
    let delay = (fault.delay_percent > 0.0).then(|| crate::duration::format_duration(fault.delay));
    json!({
        "backend": fault.backend,
        "abort_percent": fault.abort_percent,
        "abort_status": fault.abort_status.as_u16(),
        "delay_percent": fault.delay_percent,
        "delay": delay,
        "header": fault.header.as_ref().map(|h| h.as_str()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> String {
        parse(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn a_list_or_what_get_answers() {
        let list = r#"[{"backend": "v2", "abort_percent": 20, "abort_status": 500},
                       {"backend": "v1", "delay_percent": 5.5, "delay": "100ms", "header": "x-drill"}]"#;
        let (faults, version) = parse(list.as_bytes()).unwrap();
        assert_eq!(version, None);
        assert_eq!(faults.len(), 2);
        assert_eq!(faults[0].abort_status.as_u16(), 500);
        assert_eq!(faults[1].delay_percent, 5.5);
        let shown = to_json(7, &faults);
        assert_eq!(shown["version"], 7);
        assert_eq!(shown["faults"][1]["delay"], "100ms");
        assert_eq!(shown["faults"][0]["delay"], Value::Null);
        // What GET answers goes back in as it is.
        assert_eq!(
            parse(shown.to_string().as_bytes()).unwrap(),
            (faults, Some(7))
        );
        assert_eq!(parse(b"[]").unwrap(), (vec![], None));
        assert!(refused(r#"{"faults": [], "version": "7"}"#).contains("table version"));
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        assert!(refused("{").contains("malformed JSON"));
        assert!(refused(r#"{"v2": 5}"#).contains("list of faults"));
        assert!(refused(r#"[5]"#).contains("faults[0] must be an object"));
        assert!(refused(r#"[{"backend": "v2", "abort": 5}]"#).contains("unknown key \"abort\""));
        assert_eq!(
            refused(
                r#"[{"backend": "v2", "abort_percent": 5}, {"backend": "v1", "abort_percent": 150}]"#
            ),
            "faults[1].abort_percent: must be a percentage from 0 to 100, got 150"
        );
        assert!(
            refused(r#"[{"backend": "v2", "abort_percent": "5"}]"#).contains("must be a number")
        );
        assert!(refused(r#"[{"backend": 2, "abort_percent": 5}]"#).contains("faults[0].backend"));
        assert!(
            refused(r#"[{"backend": "v2", "abort_percent": 5, "abort_status": 503.5}]"#)
                .contains("faults[0].abort_status")
        );
        assert!(refused(r#"[{"backend": "v2"}]"#).contains("injects nothing"));
        assert!(refused(r#"[{"backend": "v2", "delay_percent": 5}]"#).contains("faults[0].delay"));
    }
}
