//! Faults (`[[fault]]`, and `PUT /admin/faults` at runtime): answers and delays the proxy
//! injects into one backend's requests, to prove that ejection and rollback work before a
//! real failure does. One set of checks serves the file and the admin API, so a fault is
//! refused for the same reasons, with the same words, on both paths.

use std::time::Duration;

use http::{HeaderName, StatusCode};

use crate::duration::parse_duration;

/// The longest `delay` a fault may add.
pub const MAX_FAULT_DELAY: Duration = Duration::from_secs(3600);

/// One fault, checked: what is injected into which backend's requests.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// The backend whose requests get it, by name.
    pub backend: String,
    /// Share of those requests answered with `abort_status` and not forwarded, 0 to 100.
    pub abort_percent: f64,
    /// 400 to 599, default 503: an answer a client takes for a failure (5xx ones count as
    /// errors in the rollout's analysis).
    pub abort_status: StatusCode,
    /// Share of those requests delayed by `delay` before they are forwarded, 0 to 100.
    pub delay_percent: f64,
    /// Zero when `delay_percent` is 0.
    pub delay: Duration,
    /// Only requests carrying this header (drills on test traffic); `None`: every request.
    pub header: Option<HeaderName>,
}

/// A fault's fields as given, before they are checked; a field left out is `None`.
#[derive(Debug, Default)]
pub struct FaultFields<'a> {
    pub backend: Option<&'a str>,
    pub abort_percent: Option<f64>,
    pub abort_status: Option<i64>,
    pub delay_percent: Option<f64>,
    pub delay: Option<&'a str>,
    pub header: Option<&'a str>,
}

/// A field refused (of a fault, of mirroring), as named in the file and the JSON, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldProblem {
    pub field: &'static str,
    pub message: String,
}

impl FieldProblem {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldProblem {
            field,
            message: message.into(),
        }
    }
}

impl FaultFields<'_> {
    /// Checks the fields of one fault. Whether `backend` names a backend is the caller's to
    /// check (the file's backends, or the running table's).
    pub fn check(&self) -> Result<FaultConfig, FieldProblem> {
        let backend = self
            .backend
            .ok_or_else(|| FieldProblem::new("backend", "a fault needs `backend`"))?;
        let abort_percent = percent("abort_percent", self.abort_percent)?;
        let delay_percent = percent("delay_percent", self.delay_percent)?;
        let abort_status = match self.abort_status {
            None => StatusCode::SERVICE_UNAVAILABLE,
            Some(code) => u16::try_from(code)
                .ok()
                .filter(|code| (400..=599).contains(code))
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or_else(|| {
                    FieldProblem::new(
                        "abort_status",
                        format!("must be a status code from 400 to 599, got {code}"),
                    )
                })?,
        };
        let delay = match self.delay {
            None if delay_percent > 0.0 => {
                return Err(FieldProblem::new(
                    "delay",
                    "`delay_percent` needs `delay`, e.g. delay = \"200ms\"",
                ));
            }
            None => Duration::ZERO,
            Some(text) => {
                let delay = parse_duration(text).map_err(|e| FieldProblem::new("delay", e))?;
                if delay.is_zero() || delay > MAX_FAULT_DELAY {
                    return Err(FieldProblem::new(
                        "delay",
                        format!("must be from 1ms to 1h, got {text:?}"),
                    ));
                }
                delay
            }
        };
        if abort_percent == 0.0 && delay_percent == 0.0 {
            return Err(FieldProblem::new(
                "abort_percent",
                "a fault injects nothing: set `abort_percent` or `delay_percent` above 0",
            ));
        }
        let header = self
            .header
            .map(|name| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    FieldProblem::new("header", format!("{name:?} is not a header name"))
                })
            })
            .transpose()?;
        Ok(FaultConfig {
            backend: backend.to_owned(),
            abort_percent,
            abort_status,
            delay_percent,
            delay,
            header,
        })
    }
}

/// What the fault injects, as the audit log and `check` show it: `abort 5% (503) delay 10%
/// (200ms) if x-fault`.
impl std::fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.abort_percent > 0.0 {
            parts.push(format!(
                "abort {}% ({})",
                self.abort_percent,
                self.abort_status.as_u16()
            ));
        }
        if self.delay_percent > 0.0 {
            parts.push(format!(
                "delay {}% ({})",
                self.delay_percent,
                crate::duration::format_duration(self.delay)
            ));
        }
        if let Some(header) = &self.header {
            parts.push(format!("if {header}"));
        }
        f.write_str(&parts.join(" "))
    }
}

fn percent(field: &'static str, value: Option<f64>) -> Result<f64, FieldProblem> {
    let value = value.unwrap_or(0.0);
    if !(0.0..=100.0).contains(&value) {
        return Err(FieldProblem::new(
            field,
            format!("must be a percentage from 0 to 100, got {value}"),
        ));
    }
    Ok(value)
}

/// The faults of a set, checked together: at most one per backend. Returns the index of the
/// first fault that repeats a backend.
pub fn first_repeated_backend(faults: &[FaultConfig]) -> Option<usize> {
    (1..faults.len()).find(|&i| faults[..i].iter().any(|f| f.backend == faults[i].backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> FaultFields<'static> {
        FaultFields {
            backend: Some("v2"),
            abort_percent: Some(5.0),
            ..FaultFields::default()
        }
    }

    fn refused(fields: FaultFields<'_>) -> (&'static str, String) {
        let error = fields.check().unwrap_err();
        (error.field, error.message)
    }

    #[test]
    fn defaults_and_a_full_fault() {
        let fault = fields().check().unwrap();
        assert_eq!(fault.abort_status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!((fault.delay_percent, fault.delay), (0.0, Duration::ZERO));
        assert_eq!(fault.header, None);
        let full = FaultFields {
            backend: Some("v2"),
            abort_percent: Some(2.5),
            abort_status: Some(500),
            delay_percent: Some(10.0),
            delay: Some("200ms"),
            header: Some("X-Fault"),
        }
        .check()
        .unwrap();
        assert_eq!(full.abort_status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(full.delay, Duration::from_millis(200));
        assert_eq!(
            full.to_string(),
            "abort 2.5% (500) delay 10% (200ms) if x-fault"
        );
        assert_eq!(full.header.unwrap(), "x-fault");
    }

    #[test]
    fn bad_fields_are_named() {
        let no_backend = FaultFields {
            backend: None,
            ..fields()
        };
        assert_eq!(refused(no_backend).0, "backend");
        for bad in [-1.0, 100.5, f64::NAN] {
            let over = FaultFields {
                abort_percent: Some(bad),
                ..fields()
            };
            assert_eq!(refused(over).0, "abort_percent", "{bad}");
            let over = FaultFields {
                delay_percent: Some(bad),
                delay: Some("1s"),
                ..fields()
            };
            assert_eq!(refused(over).0, "delay_percent", "{bad}");
        }
        for status in [0, 99, 102, 200, 301, 399, 600, -503, 1 << 40] {
            let bad = FaultFields {
                abort_status: Some(status),
                ..fields()
            };
            assert_eq!(refused(bad).0, "abort_status", "{status}");
        }
        let no_delay = FaultFields {
            delay_percent: Some(10.0),
            ..fields()
        };
        assert_eq!(refused(no_delay).0, "delay");
        for delay in ["0s", "2h", "fast", "1.5s"] {
            let bad = FaultFields {
                delay_percent: Some(10.0),
                delay: Some(delay),
                ..fields()
            };
            assert_eq!(refused(bad).0, "delay", "{delay}");
        }
        let nothing = FaultFields {
            abort_percent: None,
            ..fields()
        };
        let (field, message) = refused(nothing);
        assert_eq!(field, "abort_percent");
        assert!(message.contains("injects nothing"), "{message}");
        let header = FaultFields {
            header: Some("x fault"),
            ..fields()
        };
        assert_eq!(refused(header).0, "header");
    }

    #[test]
    fn one_fault_per_backend() {
        let v2 = fields().check().unwrap();
        let v1 = FaultConfig {
            backend: "v1".into(),
            ..v2.clone()
        };
        assert_eq!(first_repeated_backend(&[v1.clone(), v2.clone()]), None);
        assert_eq!(first_repeated_backend(&[v2.clone(), v1, v2]), Some(2));
        assert_eq!(first_repeated_backend(&[]), None);
    }
}
