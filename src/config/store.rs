//! `[store]`: the etcd v3 cluster through which several replicas share one routing table and
//! one rollout. Without it the config file is the single source, as it always was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use toml::Spanned;

use super::diagnostics::FieldError;
use super::raw::RawStore;
use super::validate::duration;

/// The shortest lease a replica may ask for: etcd itself refuses TTLs under about 1.5
/// election timeouts, and a shorter one would expire on a garbage-collection pause.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_SNAPSHOT: &str = "canary.snapshot.json";

/// A validated `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// etcd client URLs (`http://HOST:PORT`); any one reachable is enough.
    pub etcd: Vec<String>,
    /// The keys of this service live under it: `PREFIX/table` (the document),
    /// `PREFIX/leader`, `PREFIX/meters/REPLICA`. Starts with `/`, never ends with one.
    pub prefix: String,
    /// The last document this replica applied, for a start while etcd is down (relative to
    /// the config file's directory).
    pub snapshot: PathBuf,
    /// Time to live of this replica's lease: its published meters and, when it leads, the
    /// leader key vanish this long after the replica does, and another takes over.
    pub lease_ttl: Duration,
    /// The longest any one etcd request may take (connect, read, write) before the replica
    /// counts etcd as unreachable: an admin write then answers 503.
    pub timeout: Duration,
}

impl StoreSettings {
    /// The key of the shared document.
    pub fn table_key(&self) -> String {
        format!("{}/table", self.prefix)
    }

    /// The key the rollout's leader holds with its lease.
    pub fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The prefix under which each replica publishes its rollout meters.
    pub fn meters_prefix(&self) -> String {
        format!("{}/meters/", self.prefix)
    }
}

pub(super) fn validate_store(
    raw: Spanned<RawStore>,
    dir: &Path,
) -> Result<StoreSettings, FieldError> {
    let table_span = raw.span();
    let raw = raw.into_inner();
    let list = raw
        .etcd
        .ok_or_else(|| FieldError::missing("store.etcd", table_span.clone()))?;
    if list.get_ref().is_empty() {
        return Err(FieldError::new(
            "store.etcd",
            list.span(),
            "needs at least one etcd client URL, such as \"http://127.0.0.1:2379\"",
        ));
    }
    let etcd = list
        .into_inner()
        .into_iter()
        .enumerate()
        .map(|(i, url)| etcd_url(&format!("store.etcd[{i}]"), url))
        .collect::<Result<_, _>>()?;
    let prefix = raw
        .prefix
        .ok_or_else(|| FieldError::missing("store.prefix", table_span.clone()))?;
    let prefix = key_prefix(prefix)?;
    let snapshot = match raw.snapshot {
        None => dir.join(DEFAULT_SNAPSHOT),
        Some(path) if path.get_ref().is_empty() => {
            return Err(FieldError::new(
                "store.snapshot",
                path.span(),
                "must name a file",
            ));
        }
        Some(path) => dir.join(path.get_ref()),
    };
    let lease_span = raw.lease_ttl.as_ref().map_or(0..0, Spanned::span);
    let lease_ttl = duration("store.lease_ttl", raw.lease_ttl, DEFAULT_LEASE_TTL)?;
    if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&lease_ttl) || lease_ttl.subsec_nanos() != 0 {
        return Err(FieldError::new(
            "store.lease_ttl",
            lease_span,
            "must be whole seconds from 2s to 5m (etcd leases count seconds)",
        ));
    }
    let timeout_span = raw.timeout.as_ref().map_or(0..0, Spanned::span);
    let timeout = duration("store.timeout", raw.timeout, DEFAULT_STORE_TIMEOUT)?;
    if timeout.is_zero() || timeout > MAX_STORE_TIMEOUT {
        return Err(FieldError::new(
            "store.timeout",
            timeout_span,
            "must be above 0 and at most 1m",
        ));
    }
    Ok(StoreSettings {
        etcd,
        prefix,
        snapshot,
        lease_ttl,
        timeout,
    })
}

/// `http://HOST:PORT`, as etcd's clients are configured. TLS to etcd is not built yet: an
/// `https://` URL is refused rather than silently spoken to in plain text.
fn etcd_url(key: &str, raw: Spanned<String>) -> Result<String, FieldError> {
    let span = raw.span();
    let text = raw.into_inner();
    let problem = match text.parse::<Uri>() {
        Err(_) => Some("is not a URL".to_owned()),
        Ok(uri) => match (uri.scheme_str(), uri.authority(), uri.path()) {
            (Some("https"), _, _) => Some(
                "https is not supported to etcd yet; use http:// on a trusted network".to_owned(),
            ),
            (Some("http"), Some(authority), "" | "/") if authority.port_u16().is_some() => None,
            (Some("http"), Some(_), "" | "/") => Some("needs a port, e.g. :2379".to_owned()),
            _ => Some("expected http://HOST:PORT".to_owned()),
        },
    };
    match problem {
        None => Ok(text.trim_end_matches('/').to_owned()),
        Some(problem) => Err(FieldError::new(key, span, format!("{text:?} {problem}"))),
    }
}

fn key_prefix(raw: Spanned<String>) -> Result<String, FieldError> {
    let span = raw.span();
    let prefix = raw.into_inner();
    let problem = if !prefix.starts_with('/') {
        Some("must start with /")
    } else if prefix.len() < 2 || prefix.ends_with('/') {
        Some("must name a key below / and not end with /, e.g. \"/canary-proxy/shop\"")
    } else if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("must not hold spaces or control characters")
    } else {
        None
    };
    match problem {
        None => Ok(prefix),
        Some(problem) => Err(FieldError::new(
            "store.prefix",
            span,
            format!("{prefix:?} {problem}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, parse_relative_to};

    const BACKENDS: &str =
        "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n";

    fn store(table: &str) -> Result<super::StoreSettings, String> {
        let text = format!("[store]\n{table}\n{BACKENDS}");
        match parse_relative_to(&text, "canary.toml", std::path::Path::new("/etc/canary")) {
            Ok(config) => Ok(config.store.expect("has [store]")),
            Err(ConfigError::Invalid { key, message, .. }) => Err(format!("{key}: {message}")),
            Err(other) => Err(other.to_string()),
        }
    }

    #[test]
    fn defaults_and_paths() {
        let settings =
            store("etcd = [\"http://127.0.0.1:2379/\"]\nprefix = \"/canary-proxy/shop\"").unwrap();
        assert_eq!(settings.etcd, ["http://127.0.0.1:2379"]);
        assert_eq!(settings.table_key(), "/canary-proxy/shop/table");
        assert_eq!(settings.leader_key(), "/canary-proxy/shop/leader");
        assert_eq!(settings.meters_prefix(), "/canary-proxy/shop/meters/");
        assert_eq!(
            settings.snapshot,
            std::path::Path::new("/etc/canary/canary.snapshot.json")
        );
        assert_eq!(settings.lease_ttl.as_secs(), 10);
        assert_eq!(settings.timeout.as_secs(), 2);
        let settings = store(
            "etcd = [\"http://a:1\", \"http://b:2\"]\nprefix = \"/p\"\nsnapshot = \"/var/lib/s.json\"\nlease_ttl = \"3s\"\ntimeout = \"500ms\"",
        )
        .unwrap();
        assert_eq!(settings.etcd.len(), 2);
        assert_eq!(settings.snapshot, std::path::Path::new("/var/lib/s.json"));
        assert_eq!(settings.lease_ttl.as_secs(), 3);
        assert_eq!(settings.timeout.as_millis(), 500);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("prefix = \"/p\"", "store.etcd"),
            ("etcd = []\nprefix = \"/p\"", "store.etcd"),
            (
                "etcd = [\"127.0.0.1:2379\"]\nprefix = \"/p\"",
                "store.etcd[0]",
            ),
            (
                "etcd = [\"https://127.0.0.1:2379\"]\nprefix = \"/p\"",
                "store.etcd[0]",
            ),
            (
                "etcd = [\"http://a:1\", \"http://b\"]\nprefix = \"/p\"",
                "store.etcd[1]",
            ),
            ("etcd = [\"http://a:1\"]", "store.prefix"),
            ("etcd = [\"http://a:1\"]\nprefix = \"p\"", "store.prefix"),
            ("etcd = [\"http://a:1\"]\nprefix = \"/p/\"", "store.prefix"),
            ("etcd = [\"http://a:1\"]\nprefix = \"/\"", "store.prefix"),
            ("etcd = [\"http://a:1\"]\nprefix = \"/a b\"", "store.prefix"),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"/p\"\nlease_ttl = \"1s\"",
                "store.lease_ttl",
            ),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"/p\"\nlease_ttl = \"2500ms\"",
                "store.lease_ttl",
            ),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"/p\"\ntimeout = \"0s\"",
                "store.timeout",
            ),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"/p\"\nsnapshot = \"\"",
                "store.snapshot",
            ),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"/p\"\nendpoints = 1",
                "store",
            ),
        ];
        for (table, key) in cases {
            let error = store(table).expect_err(table);
            assert!(error.starts_with(key), "{table}: {error}");
        }
    }
}
