//! Mirroring (`[mirror]`, and `PUT /admin/mirror` at runtime): copies of requests sent to a
//! backend whose answers never reach a client, compared with the answers that did. One set of
//! checks serves the file and the admin API, as for faults.

use std::time::Duration;

use http::{HeaderName, Method};

use super::FieldProblem;
use crate::duration::parse_duration;

/// The largest `max_body`: copies keep the bodies they send in memory.
pub const MAX_MIRROR_BODY: u64 = 16 * 1024 * 1024;
/// The most copies `max_in_flight` may allow.
pub const MAX_MIRROR_IN_FLIGHT: usize = 10_000;
/// The longest `timeout` of a copy.
pub const MAX_MIRROR_TIMEOUT: Duration = Duration::from_secs(300);

/// Mirroring, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorConfig {
    /// The backend that receives the copies, by name.
    pub backend: String,
    /// Only requests this backend serves are copied, by name; `None`: every other backend's.
    pub from: Option<String>,
    /// Share of the requests of `from` (or the other backends) copied, 0 to 100. Default 100.
    pub percent: f64,
    /// Only requests with these methods are copied. Default GET and HEAD: a copied POST
    /// would repeat its side effect.
    pub methods: Vec<Method>,
    /// A request with a larger body is served but not copied. Default 64 KiB.
    pub max_body: u64,
    /// Copies running at once; past it, copies are dropped. Default 100.
    pub max_in_flight: usize,
    /// A copy not answered whole within this is abandoned. Default 5s.
    pub timeout: Duration,
    /// Compare each copy's answer with the served one. Default true.
    pub compare: bool,
    /// Header names (lowercase) left out of the comparison.
    pub ignore_headers: Vec<HeaderName>,
    /// JSON object keys left out of the comparison, at any depth.
    pub ignore_fields: Vec<String>,
}

/// `ignore_headers` when not given.
pub const DEFAULT_IGNORED_HEADERS: [&str; 5] =
    ["date", "server", "x-request-id", "set-cookie", "etag"];

/// Mirroring's fields as given, before they are checked; a field left out is `None`.
#[derive(Debug, Default)]
pub struct MirrorFields<'a> {
    pub backend: Option<&'a str>,
    pub from: Option<&'a str>,
    pub percent: Option<f64>,
    pub methods: Option<Vec<&'a str>>,
    pub max_body: Option<&'a str>,
    pub max_in_flight: Option<i64>,
    pub timeout: Option<&'a str>,
    pub compare: Option<bool>,
    pub ignore_headers: Option<Vec<&'a str>>,
    pub ignore_fields: Option<Vec<&'a str>>,
}

fn problem(field: &'static str, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field,
        message: message.into(),
    }
}

impl MirrorConfig {
    /// Mirroring to `backend` with every other setting at its default.
    pub fn to_backend(backend: &str) -> MirrorConfig {
        MirrorFields {
            backend: Some(backend),
            ..MirrorFields::default()
        }
        .check()
        .unwrap_or_else(|problem| unreachable!("mirroring's defaults are valid: {problem:?}"))
    }
}

impl MirrorFields<'_> {
    /// Checks the fields. Whether `backend` and `from` name backends is the caller's to
    /// check.
    pub fn check(&self) -> Result<MirrorConfig, FieldProblem> {
        let backend = self.backend.ok_or_else(|| {
            problem(
                "backend",
                "mirroring needs `backend`, the one that gets the copies",
            )
        })?;
        if self.from == Some(backend) {
            return Err(problem(
                "from",
                format!(
                    "{backend:?} gets the copies; `from` names the backend whose requests are copied"
                ),
            ));
        }
        let percent = self.percent.unwrap_or(100.0);
        if !(0.0..=100.0).contains(&percent) {
            return Err(problem(
                "percent",
                format!("must be a percentage from 0 to 100, got {percent}"),
            ));
        }
        let methods = match &self.methods {
            None => vec![Method::GET, Method::HEAD],
            Some(names) if names.is_empty() => {
                return Err(problem("methods", "must name at least one method"));
            }
            Some(names) => names
                .iter()
                .map(|name| {
                    if name.bytes().any(|b| b.is_ascii_lowercase()) {
                        return Err(problem(
                            "methods",
                            format!(
                                "{name:?}: methods are case-sensitive; write {:?}",
                                name.to_ascii_uppercase()
                            ),
                        ));
                    }
                    Method::from_bytes(name.as_bytes())
                        .ok()
                        .filter(|m| *m != Method::CONNECT)
                        .ok_or_else(|| {
                            problem(
                                "methods",
                                format!("{name:?} is not a method a copy can have"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        let max_body = match self.max_body {
            None => 64 * 1024,
            Some(text) => {
                let size = parse_size(text).map_err(|e| problem("max_body", e))?;
                if size > MAX_MIRROR_BODY {
                    return Err(problem(
                        "max_body",
                        format!("must be at most 16MiB, got {text:?}"),
                    ));
                }
                size
            }
        };
        let max_in_flight = match self.max_in_flight {
            None => 100,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_MIRROR_IN_FLIGHT).contains(n))
                .ok_or_else(|| {
                    problem(
                        "max_in_flight",
                        format!("must be an integer from 1 to {MAX_MIRROR_IN_FLIGHT}, got {n}"),
                    )
                })?,
        };
        let timeout = match self.timeout {
            None => Duration::from_secs(5),
            Some(text) => {
                let timeout = parse_duration(text).map_err(|e| problem("timeout", e))?;
                if timeout.is_zero() || timeout > MAX_MIRROR_TIMEOUT {
                    return Err(problem(
                        "timeout",
                        format!("must be from 1ms to 5m, got {text:?}"),
                    ));
                }
                timeout
            }
        };
        let ignore_headers = match &self.ignore_headers {
            None => DEFAULT_IGNORED_HEADERS
                .iter()
                .map(|name| HeaderName::from_static(name))
                .collect(),
            Some(names) => names
                .iter()
                .map(|name| {
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        problem("ignore_headers", format!("{name:?} is not a header name"))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let ignore_fields = self
            .ignore_fields
            .as_ref()
            .map(|fields| fields.iter().map(|f| f.to_string()).collect())
            .unwrap_or_default();
        Ok(MirrorConfig {
            backend: backend.to_owned(),
            from: self.from.map(str::to_owned),
            percent,
            methods,
            max_body,
            max_in_flight,
            timeout,
            compare: self.compare.unwrap_or(true),
            ignore_headers,
            ignore_fields,
        })
    }
}

/// The units a size may carry, longest first so `KiB` is not read as `B`.
const SIZE_UNITS: [(&str, u64); 4] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// Parses `"<integer><unit>"` where unit is `B`, `KiB`, `MiB` or `GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let Some(&(_, bytes_per_unit)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!(
            "invalid size {text:?}: expected an integer and a unit (B, KiB, MiB, GiB), e.g. \"64KiB\""
        ));
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected an integer before the unit"))?;
    count
        .checked_mul(bytes_per_unit)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Prints a size in the largest unit that divides it exactly: `"64KiB"`, `"1500B"`.
pub fn format_size(bytes: u64) -> String {
    for (name, per) in SIZE_UNITS {
        if bytes >= per && bytes.is_multiple_of(per) {
            return format!("{}{name}", bytes / per);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> MirrorFields<'static> {
        MirrorFields {
            backend: Some("v2"),
            ..MirrorFields::default()
        }
    }

    fn refused(fields: MirrorFields<'_>) -> &'static str {
        fields.check().unwrap_err().field
    }

    #[test]
    fn defaults_are_the_contracts() {
        let mirror = fields().check().unwrap();
        assert_eq!(mirror.percent, 100.0);
        assert_eq!(mirror.methods, [Method::GET, Method::HEAD]);
        assert_eq!(mirror.max_body, 65_536);
        assert_eq!(mirror.max_in_flight, 100);
        assert_eq!(mirror.timeout, Duration::from_secs(5));
        assert!(mirror.compare);
        let ignored: Vec<&str> = mirror.ignore_headers.iter().map(|h| h.as_str()).collect();
        assert_eq!(ignored, DEFAULT_IGNORED_HEADERS);
        assert!(mirror.ignore_fields.is_empty());
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(refused(MirrorFields::default()), "backend");
        for percent in [-1.0, 100.1, f64::NAN] {
            assert_eq!(
                refused(MirrorFields {
                    percent: Some(percent),
                    ..fields()
                }),
                "percent"
            );
        }
        for methods in [
            vec![],
            vec!["get"],
            vec!["CONNECT"],
            vec!["GET", "BAD METHOD"],
        ] {
            assert_eq!(
                refused(MirrorFields {
                    methods: Some(methods),
                    ..fields()
                }),
                "methods"
            );
        }
        for size in [
            "64",
            "64kb",
            "1.5KiB",
            "17MiB",
            "KiB",
            "99999999999999999999B",
        ] {
            assert_eq!(
                refused(MirrorFields {
                    max_body: Some(size),
                    ..fields()
                }),
                "max_body",
                "{size}"
            );
        }
        for n in [0, -1, 10_001] {
            assert_eq!(
                refused(MirrorFields {
                    max_in_flight: Some(n),
                    ..fields()
                }),
                "max_in_flight"
            );
        }
        for timeout in ["0s", "6m", "soon"] {
            assert_eq!(
                refused(MirrorFields {
                    timeout: Some(timeout),
                    ..fields()
                }),
                "timeout"
            );
        }
        let header = MirrorFields {
            ignore_headers: Some(vec!["x y"]),
            ..fields()
        };
        assert_eq!(refused(header), "ignore_headers");
    }

    #[test]
    fn sizes_read_and_print_back() {
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("0B"), Ok(0));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        for bytes in [0, 1, 1500, 65_536, 3 << 20, 1 << 30, (1 << 30) + 1] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
        assert_eq!(format_size(65_536), "64KiB");
        assert_eq!(format_size(1500), "1500B");
    }
}
