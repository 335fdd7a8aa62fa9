use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderName;
use http::uri::{PathAndQuery, Uri};
use toml::Spanned;

use super::diagnostics::{FieldError, later, line_of};
use super::raw::{
    RawAdmin, RawAnalysis, RawBackend, RawBackendTls, RawConfig, RawDuration, RawFault, RawHealth,
    RawInt, RawLog, RawMirror, RawNumber, RawOutlier, RawProxy, RawRollout, RawRule,
};
use super::rule;
use super::tls::validate_tls;
use super::{
    ALPN_H2, ALPN_HTTP1, AccessLog, AdminSettings, AnalysisConfig, BackendConfig, BackendTls,
    Config, DEFAULT_ROLLOUT_STEPS, EndpointUrl, FaultConfig, FaultFields, HealthCheckConfig,
    LogFormat, LogSettings, MAX_ADMIN_CONNECTIONS, MAX_BACKENDS, MAX_WEIGHT, MAX_WORKERS,
    MirrorConfig, MirrorFields, OnInconclusive, OutlierConfig, ProxySettings, RolloutConfig,
    RuleConfig, RuleMatcher, RuleSource, UNROUTED_BACKEND, UpstreamProtocol,
    first_repeated_backend,
};
use crate::duration::{format_duration, parse_duration};
use crate::upstream::PeerTls;

// ---------------------------------------------------------------------------------------------
// Stage 2: validation into the public types.

impl RawConfig {
    pub(super) fn validate(self, text: &str, dir: &Path) -> Result<Config, FieldError> {
        let proxy_listen_span = self
            .proxy
            .as_ref()
            .and_then(|p| p.listen.as_ref())
            .map(Spanned::span);
        let admin_listen_span = self
            .admin
            .as_ref()
            .and_then(|a| a.listen.as_ref())
            .map(Spanned::span);
        let proxy = self
            .proxy
            .map_or_else(|| Ok(ProxySettings::default()), |p| p.validate(dir))?;
        let admin = self
            .admin
            .map_or_else(|| Ok(AdminSettings::default()), RawAdmin::validate)?;
        if admin.listen == proxy.listen && admin.listen.port() != 0 {
            let (key, span) = match (admin_listen_span, proxy_listen_span) {
                (Some(span), _) => ("admin.listen", span),
                (None, Some(span)) => ("proxy.listen", span),
                (None, None) => ("admin.listen", 0..0),
            };
            return Err(FieldError::new(
                key,
                span,
                format!("proxy and admin API cannot both listen on {}", admin.listen),
            ));
        }
        let backends = validate_backends(self.backend, text, dir)?;
        let rules = self
            .rule
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, rule)| validate_rule(i, rule, &backends, text))
            .collect::<Result<_, _>>()?;
        let mirror = self
            .mirror
            .map(|raw| validate_mirror(raw, &backends))
            .transpose()?;
        let rollout = self
            .rollout
            .map(|raw| validate_rollout(raw, &backends, mirror.as_ref()))
            .transpose()?;
        let faults = validate_faults(self.fault.unwrap_or_default(), &backends)?;
        let log = validate_log(self.log)?;
        let store = self
            .store
            .map(|raw| super::store::validate_store(raw, dir))
            .transpose()?;
        Ok(Config {
            proxy,
            admin,
            backends,
            rules,
            rollout,
            faults,
            mirror,
            log,
            store,
        })
    }
}

impl RawProxy {
    fn validate(self, dir: &Path) -> Result<ProxySettings, FieldError> {
        let defaults = ProxySettings::default();
        let tls = self.tls.map(|raw| validate_tls(raw, dir)).transpose()?;
        let user_id_header = self
            .user_id_header
            .map(|h| header_name("proxy.user_id_header", &h))
            .transpose()?;
        let user_id_cookie = self
            .user_id_cookie
            .map(|c| cookie_name("proxy.user_id_cookie", c))
            .transpose()?;
        let sticky_cookie = self
            .sticky_cookie
            .map(|c| {
                let span = c.span();
                let name = cookie_name("proxy.sticky_cookie", c)?;
                let lower = name.to_ascii_lowercase();
                if (lower.starts_with("__host-") || lower.starts_with("__secure-")) && tls.is_none()
                {
                    // Browsers keep such cookies only with `Secure`, which needs TLS to the
                    // client: every request would draw a new id. (Over TLS the cookie is
                    // Secure, and its Path=/ without Domain suits __Host- too.)
                    return Err(FieldError::new(
                        "proxy.sticky_cookie",
                        span,
                        format!(
                            "{name:?}: browsers keep __Host- and __Secure- cookies only when \
                             they are Secure, which the proxy cannot set without TLS \
                             ([proxy.tls]); use another name"
                        ),
                    ));
                }
                if user_id_cookie.as_ref() == Some(&name) {
                    return Err(FieldError::new(
                        "proxy.sticky_cookie",
                        span,
                        format!(
                            "{name:?} is already proxy.user_id_cookie; the sticky cookie needs a \
                             name of its own (the proxy writes it, the application writes the other)"
                        ),
                    ));
                }
                Ok(name)
            })
            .transpose()?;
        let max_age_span = self
            .sticky_cookie_max_age
            .as_ref()
            .map_or(0..0, Spanned::span);
        let sticky_cookie_max_age = positive_duration(
            "proxy.sticky_cookie_max_age",
            self.sticky_cookie_max_age,
            defaults.sticky_cookie_max_age,
        )?;
        if sticky_cookie_max_age.subsec_nanos() != 0 {
            return Err(FieldError::new(
                "proxy.sticky_cookie_max_age",
                max_age_span,
                "Max-Age counts whole seconds; use s, m or h",
            ));
        }
        let backend_header = match self.backend_header {
            None => defaults.backend_header,
            Some(h) if h.get_ref().is_empty() => None,
            Some(h) => Some(header_name("proxy.backend_header", &h)?),
        };
        Ok(ProxySettings {
            listen: socket_addr("proxy.listen", self.listen, defaults.listen)?,
            connect_timeout: positive_duration(
                "proxy.connect_timeout",
                self.connect_timeout,
                defaults.connect_timeout,
            )?,
            request_timeout: positive_duration(
                "proxy.request_timeout",
                self.request_timeout,
                defaults.request_timeout,
            )?,
            client_body_timeout: positive_duration(
                "proxy.client_body_timeout",
                self.client_body_timeout,
                defaults.client_body_timeout,
            )?,
            read_timeout: positive_duration(
                "proxy.read_timeout",
                self.read_timeout,
                defaults.read_timeout,
            )?,
            send_timeout: positive_duration(
                "proxy.send_timeout",
                self.send_timeout,
                defaults.send_timeout,
            )?,
            header_read_timeout: positive_duration(
                "proxy.header_read_timeout",
                self.header_read_timeout,
                defaults.header_read_timeout,
            )?,
            upstream_idle_timeout: positive_duration(
                "proxy.upstream_idle_timeout",
                self.upstream_idle_timeout,
                defaults.upstream_idle_timeout,
            )?,
            shutdown_grace: duration(
                "proxy.shutdown_grace",
                self.shutdown_grace,
                defaults.shutdown_grace,
            )?,
            user_id_header,
            user_id_cookie,
            sticky_salt: self.sticky_salt.unwrap_or(defaults.sticky_salt),
            sticky_cookie,
            sticky_cookie_max_age,
            backend_header,
            workers: self
                .workers
                .map(|w| {
                    let span = w.span();
                    let n = threshold("proxy.workers", Some(w), 1)?;
                    if n as usize > MAX_WORKERS {
                        return Err(FieldError::new(
                            "proxy.workers",
                            span,
                            format!("must be an integer from 1 to {MAX_WORKERS}, got {n}"),
                        ));
                    }
                    Ok(n as usize)
                })
                .transpose()?,
            tls,
        })
    }
}

impl RawAdmin {
    fn validate(self) -> Result<AdminSettings, FieldError> {
        let listen_span = self.listen.as_ref().map_or(0..0, Spanned::span);
        let listen = socket_addr("admin.listen", self.listen, AdminSettings::default().listen)?;
        if let (Some(token), Some(token_env)) = (&self.token, &self.token_env) {
            let (key, span) = if token.span().start > token_env.span().start {
                ("admin.token", token.span())
            } else {
                ("admin.token_env", token_env.span())
            };
            return Err(FieldError::new(
                key,
                span,
                "set either `token` or `token_env`, not both",
            ));
        }
        let token = self
            .token
            .map(|t| non_empty("admin.token", t))
            .transpose()?;
        let token_env = self
            .token_env
            .map(|var| {
                let name = var.get_ref();
                if name.contains(['=', '\0']) {
                    return Err(FieldError::new(
                        "admin.token_env",
                        var.span(),
                        format!("{name:?} is not an environment variable name"),
                    ));
                }
                non_empty("admin.token_env", var)
            })
            .transpose()?;
        if !listen.ip().is_loopback() && token.is_none() && token_env.is_none() {
            return Err(FieldError::new(
                "admin.listen",
                listen_span,
                format!(
                    "the admin API on non-loopback address {listen} needs `token` or `token_env`"
                ),
            ));
        }
        let allowed_hosts = self
            .allowed_hosts
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, name)| host_name(&format!("admin.allowed_hosts[{i}]"), name))
            .collect::<Result<_, _>>()?;
        let defaults = AdminSettings::default();
        let max_connections = match self.max_connections {
            None => defaults.max_connections,
            Some(raw) => {
                let span = raw.span();
                let n = threshold("admin.max_connections", Some(raw), 1)? as usize;
                if n > MAX_ADMIN_CONNECTIONS {
                    return Err(FieldError::new(
                        "admin.max_connections",
                        span,
                        format!("must be an integer from 1 to {MAX_ADMIN_CONNECTIONS}, got {n}"),
                    ));
                }
                n
            }
        };
        let header_read_timeout = positive_duration(
            "admin.header_read_timeout",
            self.header_read_timeout,
            defaults.header_read_timeout,
        )?;
        Ok(AdminSettings {
            listen,
            token,
            token_env,
            allowed_hosts,
            max_connections,
            header_read_timeout,
        })
    }
}

/// A host name as a `Host` header carries it, without port: letters, digits, `-`, `_` and
/// dots. Returned lowercase and without a trailing dot, as the admin API compares it.
fn host_name(key: &str, raw: Spanned<String>) -> Result<String, FieldError> {
    let name = raw.get_ref().trim_end_matches('.');
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(is_name_char) || name.contains("..") {
        return Err(FieldError::new(
            key,
            raw.span(),
            format!(
                "{:?} is not a host name (letters, digits, '-', '_' and '.' only; no scheme, port or wildcard)",
                raw.get_ref()
            ),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn validate_backends(
    raw: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    text: &str,
    base: &Path,
) -> Result<Vec<BackendConfig>, FieldError> {
    let no_backends = "no backends configured; add at least one [[backend]] table";
    let Some(raw) = raw else {
        return Err(FieldError::new("backend", 0..0, no_backends));
    };
    let list_span = raw.span();
    let raw = raw.into_inner();
    let first_span = raw.first().map_or_else(|| list_span.clone(), Spanned::span);
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.len());
    let mut first_line_by_name = HashMap::new();
    for (i, backend) in raw.into_iter().enumerate() {
        let name_span = backend.get_ref().name.as_ref().map(Spanned::span);
        if i == MAX_BACKENDS {
            return Err(FieldError::new(
                format!("backend[{i}]"),
                backend.span(),
                format!("at most {} backends are supported", MAX_BACKENDS),
            ));
        }
        let backend = validate_backend(i, backend, text, base)?;
        if let Some(first) = first_line_by_name.insert(backend.name.clone(), backend.line) {
            return Err(FieldError::new(
                format!("backend[{i}].name"),
                name_span.unwrap_or(0..0),
                format!(
                    "duplicate backend name `{}` (first declared at line {first})",
                    backend.name
                ),
            ));
        }
        backends.push(backend);
    }
    if backends.is_empty() {
        return Err(FieldError::new("backend", list_span, no_backends));
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(FieldError::new(
            "backend",
            first_span,
            "all backend weights are 0; at least one must be > 0",
        ));
    }
    Ok(backends)
}

fn validate_backend(
    i: usize,
    raw: Spanned<RawBackend>,
    text: &str,
    base: &Path,
) -> Result<BackendConfig, FieldError> {
    let table_span = raw.span();
    let raw = raw.into_inner();
    let key = |field: &str| format!("backend[{i}].{field}");

    let name = raw
        .name
        .ok_or_else(|| FieldError::missing(key("name"), table_span.clone()))?;
    if name.get_ref().is_empty() {
        return Err(FieldError::new(
            key("name"),
            name.span(),
            "must not be empty",
        ));
    }
    if let Some(bad) = name
        .get_ref()
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(FieldError::new(
            key("name"),
            name.span(),
            format!(
                "invalid character {bad:?} in backend name {:?}; use only letters, digits, `_`, `.` and `-`",
                name.get_ref()
            ),
        ));
    }
    if name.get_ref() == UNROUTED_BACKEND {
        return Err(FieldError::new(
            key("name"),
            name.span(),
            "`none` is reserved: metrics use backend=\"none\" for requests no backend served",
        ));
    }

    let urls = raw
        .urls
        .ok_or_else(|| FieldError::missing(key("urls"), table_span.clone()))?;
    if urls.get_ref().is_empty() {
        return Err(FieldError::new(
            key("urls"),
            urls.span(),
            "at least one URL is required",
        ));
    }
    let mut endpoints: Vec<EndpointUrl> = Vec::with_capacity(urls.get_ref().len());
    for (j, url) in urls.into_inner().into_iter().enumerate() {
        let url_key = format!("backend[{i}].urls[{j}]");
        let endpoint: EndpointUrl = url
            .get_ref()
            .parse()
            .map_err(|message| FieldError::new(&url_key, url.span(), message))?;
        if let Some(earlier) = endpoints.iter().position(|e| {
            e.authority
                .as_str()
                .eq_ignore_ascii_case(endpoint.authority.as_str())
        }) {
            return Err(FieldError::new(
                url_key,
                url.span(),
                format!(
                    "duplicate endpoint {} (same as urls[{earlier}])",
                    endpoint.authority
                ),
            ));
        }
        endpoints.push(endpoint);
    }

    let weight = raw
        .weight
        .ok_or_else(|| FieldError::missing(key("weight"), table_span.clone()))?;
    let weight = match u32::try_from(weight.get_ref().0) {
        Ok(w) if w <= MAX_WEIGHT => w,
        _ if weight.get_ref().0 < 0 => {
            return Err(FieldError::new(
                key("weight"),
                weight.span(),
                format!("must be a non-negative integer, got {}", weight.get_ref().0),
            ));
        }
        _ => {
            return Err(FieldError::new(
                key("weight"),
                weight.span(),
                format!("must be at most {MAX_WEIGHT}, got {}", weight.get_ref().0),
            ));
        }
    };

    let protocol = match raw.protocol {
        None => UpstreamProtocol::default(),
        Some(value) => validate_protocol(&key("protocol"), &value, &endpoints)?,
    };

    let health = raw
        .health
        .map(|h| validate_health(&format!("backend[{i}].health"), h.into_inner()))
        .transpose()?;
    let outlier = raw
        .outlier
        .map(|o| validate_outlier(&format!("backend[{i}].outlier"), o.into_inner()))
        .transpose()?
        .unwrap_or_default();
    let tls = validate_backend_tls(i, raw.tls, &endpoints, protocol, base)?;

    Ok(BackendConfig {
        name: name.into_inner(),
        endpoints,
        weight,
        protocol,
        health,
        outlier,
        tls,
        line: line_of(text, table_span.start),
    })
}

/// `[backend.tls]`: only beside an `https://` URL, and for every one of them (the defaults
/// when the table is absent): verification against the system's trust store.
fn validate_backend_tls(
    i: usize,
    raw: Option<Spanned<RawBackendTls>>,
    endpoints: &[EndpointUrl],
    protocol: UpstreamProtocol,
    base: &Path,
) -> Result<Option<BackendTls>, FieldError> {
    let key = |field: &str| format!("backend[{i}].tls.{field}");
    if !endpoints.iter().any(|e| e.tls) {
        return match raw {
            None => Ok(None),
            Some(raw) => Err(FieldError::new(
                format!("backend[{i}].tls"),
                raw.span(),
                "applies to https:// URLs, and this backend has none",
            )),
        };
    }
    let (span, raw) = match raw {
        Some(raw) => (raw.span(), raw.into_inner()),
        None => (0..0, RawBackendTls::default()),
    };
    let field_span = |field: &str| match field {
        "ca" => raw.ca.as_ref().map(Spanned::span),
        "server_name" => raw.server_name.as_ref().map(Spanned::span),
        _ => None,
    };
    let tls = BackendTls::new(
        raw.ca.as_ref().map(|ca| ca.get_ref().as_str()),
        raw.server_name.as_ref().map(|name| name.get_ref().as_str()),
        raw.insecure_skip_verify
            .as_ref()
            .is_some_and(|v| *v.get_ref()),
        base,
        match protocol {
            UpstreamProtocol::H2 => ALPN_H2,
            UpstreamProtocol::Http1 | UpstreamProtocol::H2c => ALPN_HTTP1,
        },
    )
    .map_err(|e| {
        FieldError::new(
            key(e.key),
            field_span(e.key).unwrap_or(span.clone()),
            e.message,
        )
    })?;
    if tls.server_name.is_none()
        && let Some(endpoint) = endpoints
            .iter()
            .find(|e| e.tls && PeerTls::new(tls.client.clone(), None, &e.authority).is_err())
    {
        return Err(FieldError::new(
            key("server_name"),
            span,
            format!(
                "{}: its host is not a name a certificate can be verified for; set server_name",
                endpoint.url
            ),
        ));
    }
    Ok(Some(tls))
}

/// `protocol`: `http1`, `h2c` or `h2`. HTTP/2 over TLS (`h2`) needs `https://` URLs, and h2c
/// (HTTP/2 without TLS) plain `http://` ones.
fn validate_protocol(
    key: &str,
    value: &Spanned<String>,
    endpoints: &[EndpointUrl],
) -> Result<UpstreamProtocol, FieldError> {
    let protocol = match value.get_ref().as_str() {
        "http1" => UpstreamProtocol::Http1,
        "h2c" => UpstreamProtocol::H2c,
        "h2" => UpstreamProtocol::H2,
        other => {
            return Err(FieldError::new(
                key,
                value.span(),
                format!("{other:?} is not one of \"http1\", \"h2c\", \"h2\""),
            ));
        }
    };
    let tls = |e: &EndpointUrl| e.tls;
    let mismatch = match protocol {
        UpstreamProtocol::H2 => endpoints.iter().find(|e| !tls(e)).map(|e| {
            format!(
                "\"h2\" is HTTP/2 over TLS and needs https:// URLs, not {}; for HTTP/2 without TLS write \"h2c\"",
                e.url
            )
        }),
        UpstreamProtocol::H2c => endpoints.iter().find(|e| tls(e)).map(|e| {
            format!(
                "\"h2c\" is HTTP/2 without TLS and needs http:// URLs, not {}; over TLS write \"h2\"",
                e.url
            )
        }),
        UpstreamProtocol::Http1 => None,
    };
    match mismatch {
        Some(message) => Err(FieldError::new(key, value.span(), message)),
        None => Ok(protocol),
    }
}

fn validate_health(prefix: &str, raw: RawHealth) -> Result<HealthCheckConfig, FieldError> {
    let defaults = HealthCheckConfig::default();
    let key = |field: &str| format!("{prefix}.{field}");
    let path = match raw.path {
        None => defaults.path,
        Some(path) => {
            if !path.get_ref().starts_with('/') {
                return Err(FieldError::new(
                    key("path"),
                    path.span(),
                    format!("must start with `/`, got {:?}", path.get_ref()),
                ));
            }
            PathAndQuery::from_str(path.get_ref()).map_err(|e| {
                FieldError::new(
                    key("path"),
                    path.span(),
                    format!("invalid path {:?}: {e}", path.get_ref()),
                )
            })?
        }
    };
    Ok(HealthCheckConfig {
        path,
        interval: positive_duration(&key("interval"), raw.interval, defaults.interval)?,
        timeout: positive_duration(&key("timeout"), raw.timeout, defaults.timeout)?,
        unhealthy_threshold: threshold(
            &key("unhealthy_threshold"),
            raw.unhealthy_threshold,
            defaults.unhealthy_threshold,
        )?,
        healthy_threshold: threshold(
            &key("healthy_threshold"),
            raw.healthy_threshold,
            defaults.healthy_threshold,
        )?,
    })
}

fn validate_outlier(prefix: &str, raw: RawOutlier) -> Result<OutlierConfig, FieldError> {
    let defaults = OutlierConfig::default();
    let key = |field: &str| format!("{prefix}.{field}");
    let consecutive_failures = match raw.consecutive_failures {
        None => defaults.consecutive_failures,
        Some(n) => u32::try_from(n.get_ref().0).map_err(|_| {
            FieldError::new(
                key("consecutive_failures"),
                n.span(),
                format!(
                    "must be an integer from 0 (off) to {}, got {}",
                    u32::MAX,
                    n.get_ref().0
                ),
            )
        })?,
    };
    let base_span = raw.base_ejection.as_ref().map_or(0..0, Spanned::span);
    let base_ejection = positive_duration(
        &key("base_ejection"),
        raw.base_ejection,
        defaults.base_ejection,
    )?;
    let max_span = raw.max_ejection.as_ref().map(Spanned::span);
    let max_ejection = duration(
        &key("max_ejection"),
        raw.max_ejection,
        defaults.max_ejection,
    )?;
    if max_ejection < base_ejection {
        // Blame the key the operator wrote: max_ejection if set, else base_ejection, which
        // then exceeds the default maximum.
        return Err(match max_span {
            Some(span) => FieldError::new(
                key("max_ejection"),
                span,
                format!(
                    "must be at least base_ejection ({}), got {}",
                    format_duration(base_ejection),
                    format_duration(max_ejection)
                ),
            ),
            None => FieldError::new(
                key("base_ejection"),
                base_span,
                format!(
                    "must be at most max_ejection (default {}); set max_ejection too",
                    format_duration(max_ejection)
                ),
            ),
        });
    }
    Ok(OutlierConfig {
        consecutive_failures,
        base_ejection,
        max_ejection,
    })
}

/// The strings of an optional list in the file.
fn strings(list: &Option<Spanned<Vec<String>>>) -> Option<Vec<&str>> {
    list.as_ref()
        .map(|l| l.get_ref().iter().map(String::as_str).collect())
}

fn validate_mirror(
    raw: Spanned<RawMirror>,
    backends: &[BackendConfig],
) -> Result<MirrorConfig, FieldError> {
    let table_span = raw.span();
    let raw = raw.into_inner();
    let span_of = |field: &str| {
        let span = match field {
            "backend" => raw.backend.as_ref().map(Spanned::span),
            "from" => raw.from.as_ref().map(Spanned::span),
            "percent" => raw.percent.as_ref().map(Spanned::span),
            "methods" => raw.methods.as_ref().map(Spanned::span),
            "max_body" => raw.max_body.as_ref().map(Spanned::span),
            "max_in_flight" => raw.max_in_flight.as_ref().map(Spanned::span),
            "timeout" => raw.timeout.as_ref().map(Spanned::span),
            "compare" => raw.compare.as_ref().map(Spanned::span),
            "ignore_headers" => raw.ignore_headers.as_ref().map(Spanned::span),
            _ => raw.ignore_fields.as_ref().map(Spanned::span),
        };
        span.unwrap_or_else(|| table_span.clone())
    };
    let fields = MirrorFields {
        backend: raw.backend.as_ref().map(|b| b.get_ref().as_str()),
        from: raw.from.as_ref().map(|b| b.get_ref().as_str()),
        percent: raw.percent.as_ref().map(|p| p.get_ref().0),
        methods: strings(&raw.methods),
        max_body: raw.max_body.as_ref().map(|m| m.get_ref().as_str()),
        max_in_flight: raw.max_in_flight.as_ref().map(|n| n.get_ref().0),
        timeout: raw.timeout.as_ref().map(|t| t.get_ref().0.as_str()),
        compare: raw.compare.as_ref().map(|c| *c.get_ref()),
        ignore_headers: strings(&raw.ignore_headers),
        ignore_fields: strings(&raw.ignore_fields),
    };
    let mirror = fields
        .check()
        .map_err(|e| FieldError::new(format!("mirror.{}", e.field), span_of(e.field), e.message))?;
    for (field, name) in [
        ("backend", Some(&mirror.backend)),
        ("from", mirror.from.as_ref()),
    ] {
        if let Some(name) = name
            && !backends.iter().any(|b| &b.name == name)
        {
            return Err(FieldError::new(
                format!("mirror.{field}"),
                span_of(field),
                format!("unknown backend {name:?}"),
            ));
        }
    }
    Ok(mirror)
}

fn validate_faults(
    raw: Vec<Spanned<RawFault>>,
    backends: &[BackendConfig],
) -> Result<Vec<FaultConfig>, FieldError> {
    let mut faults = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let table_span = raw.span();
        let raw = raw.into_inner();
        let span_of = |field: &str| {
            let span = match field {
                "backend" => raw.backend.as_ref().map(Spanned::span),
                "abort_percent" => raw.abort_percent.as_ref().map(Spanned::span),
                "abort_status" => raw.abort_status.as_ref().map(Spanned::span),
                "delay_percent" => raw.delay_percent.as_ref().map(Spanned::span),
                "delay" => raw.delay.as_ref().map(Spanned::span),
                _ => raw.header.as_ref().map(Spanned::span),
            };
            span.unwrap_or_else(|| table_span.clone())
        };
        let fields = FaultFields {
            backend: raw.backend.as_ref().map(|b| b.get_ref().as_str()),
            abort_percent: raw.abort_percent.as_ref().map(|p| p.get_ref().0),
            abort_status: raw.abort_status.as_ref().map(|s| s.get_ref().0),
            delay_percent: raw.delay_percent.as_ref().map(|p| p.get_ref().0),
            delay: raw.delay.as_ref().map(|d| d.get_ref().0.as_str()),
            header: raw.header.as_ref().map(|h| h.get_ref().as_str()),
        };
        let fault = fields.check().map_err(|e| {
            FieldError::new(
                format!("fault[{i}].{}", e.field),
                span_of(e.field),
                e.message,
            )
        })?;
        if !backends.iter().any(|b| b.name == fault.backend) {
            return Err(FieldError::new(
                format!("fault[{i}].backend"),
                span_of("backend"),
                format!("unknown backend {:?}", fault.backend),
            ));
        }
        faults.push(fault);
        if let Some(repeated) = first_repeated_backend(&faults) {
            return Err(FieldError::new(
                format!("fault[{repeated}].backend"),
                span_of("backend"),
                format!(
                    "backend {:?} already has a fault; one fault per backend",
                    faults[repeated].backend
                ),
            ));
        }
    }
    Ok(faults)
}

fn validate_rule(
    i: usize,
    raw: Spanned<RawRule>,
    backends: &[BackendConfig],
    text: &str,
) -> Result<RuleConfig, FieldError> {
    let table_span = raw.span();
    let raw = raw.into_inner();
    let key = |field: &str| format!("rule[{i}].{field}");

    let source = match (raw.header, raw.cookie) {
        (Some(header), Some(cookie)) => {
            let (field, span) = later(("header", header.span()), ("cookie", cookie.span()));
            return Err(FieldError::new(key(field), span, rule::BOTH_SOURCES));
        }
        (None, None) => {
            return Err(FieldError::new(
                format!("rule[{i}]"),
                table_span,
                rule::NO_SOURCE,
            ));
        }
        (Some(header), None) => RuleSource::Header(header_name(&key("header"), &header)?),
        (None, Some(cookie)) => RuleSource::Cookie(cookie_name(&key("cookie"), cookie)?),
    };

    let mut given = [
        raw.equals.as_ref().map(|s| ("equals", s.span())),
        raw.matches.as_ref().map(|s| ("matches", s.span())),
        raw.present.as_ref().map(|s| ("present", s.span())),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    given.sort_by_key(|(_, span)| span.start);
    if let Some((field, span)) = given.get(1) {
        return Err(FieldError::new(
            key(field),
            span.clone(),
            rule::two_matchers(given[0].0),
        ));
    }
    let matcher = if let Some(value) = raw.equals {
        RuleMatcher::Equals(value.into_inner())
    } else if let Some(pattern) = raw.matches {
        let regex = rule::pattern(pattern.get_ref())
            .map_err(|message| FieldError::new(key("matches"), pattern.span(), message))?;
        RuleMatcher::Matches(regex)
    } else if let Some(present) = raw.present {
        if !present.get_ref() {
            return Err(FieldError::new(
                key("present"),
                present.span(),
                rule::PRESENT_FALSE,
            ));
        }
        RuleMatcher::Present
    } else {
        return Err(FieldError::new(
            format!("rule[{i}]"),
            table_span,
            rule::NO_MATCHER,
        ));
    };

    let target = raw
        .backend
        .ok_or_else(|| FieldError::missing(key("backend"), table_span.clone()))?;
    let backend = backends
        .iter()
        .position(|b| b.name == *target.get_ref())
        .ok_or_else(|| {
            let declared = backends
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            FieldError::new(
                key("backend"),
                target.span(),
                format!(
                    "unknown backend `{}`; declared backends: {declared}",
                    target.get_ref()
                ),
            )
        })?;

    Ok(RuleConfig {
        source,
        matcher,
        backend,
        line: line_of(text, table_span.start),
    })
}

// ---------------------------------------------------------------------------------------------
// Value checks shared by several keys.

fn validate_log(raw: Option<RawLog>) -> Result<LogSettings, FieldError> {
    let Some(raw) = raw else {
        return Ok(LogSettings::default());
    };
    let format = match raw.format {
        None => LogFormat::default(),
        Some(format) => LogFormat::parse(format.get_ref()).ok_or_else(|| {
            FieldError::new(
                "log.format",
                format.span(),
                format!("{:?} is not one of \"text\", \"json\"", format.get_ref()),
            )
        })?,
    };
    let access = match raw.access {
        None => AccessLog::default(),
        Some(access) => AccessLog::parse(access.get_ref()).ok_or_else(|| {
            FieldError::new(
                "log.access",
                access.span(),
                format!("{:?} is not one of \"off\", \"json\"", access.get_ref()),
            )
        })?,
    };
    Ok(LogSettings { format, access })
}

fn validate_rollout(
    raw: Spanned<RawRollout>,
    backends: &[BackendConfig],
    mirror: Option<&MirrorConfig>,
) -> Result<RolloutConfig, FieldError> {
    let table_span = raw.span();
    let raw = raw.into_inner();
    let backend = |key: &str, name: Option<Spanned<String>>| {
        let name = name.ok_or_else(|| FieldError::missing(key, table_span.clone()))?;
        backends
            .iter()
            .position(|b| &b.name == name.get_ref())
            .ok_or_else(|| {
                let known: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
                FieldError::new(
                    key,
                    name.span(),
                    format!(
                        "no backend named {:?}; backends: {}",
                        name.get_ref(),
                        known.join(", ")
                    ),
                )
            })
    };
    let canary_span = raw
        .canary
        .as_ref()
        .map_or(table_span.clone(), Spanned::span);
    let baseline = backend("rollout.baseline", raw.baseline)?;
    let canary = backend("rollout.canary", raw.canary)?;
    if baseline == canary {
        return Err(FieldError::new(
            "rollout.canary",
            canary_span,
            "the canary must be another backend than the baseline",
        ));
    }
    let steps = match raw.steps {
        None => DEFAULT_ROLLOUT_STEPS.to_vec(),
        Some(list) => rollout_steps(list)?,
    };
    let mut approve = Vec::new();
    for (i, step) in raw.approve.unwrap_or_default().into_iter().enumerate() {
        let value = step.get_ref().0;
        match u32::try_from(value) {
            Ok(percent) if steps.contains(&percent) => approve.push(percent),
            _ => {
                return Err(FieldError::new(
                    format!("rollout.approve[{i}]"),
                    step.span(),
                    format!("{value} is not one of the steps {steps:?}"),
                ));
            }
        }
    }
    let webhook = raw.webhook.map(webhook_url).transpose()?;
    let step_time = positive_duration("rollout.step_time", raw.step_time, Duration::from_secs(60))?;
    let analysis = validate_analysis(raw.analysis, step_time)?;
    let shadow = match raw.shadow {
        None => None,
        Some(raw) => {
            let span = raw.span();
            let shadow = duration("rollout.shadow", Some(raw), Duration::ZERO)?;
            if shadow.is_zero() {
                return Err(FieldError::new(
                    "rollout.shadow",
                    span,
                    "must be greater than 0; leave rollout.shadow out for no shadow stage",
                ));
            }
            shadow_mirror(
                mirror,
                &backends[baseline].name,
                &backends[canary].name,
                span,
            )?;
            Some(shadow)
        }
    };
    Ok(RolloutConfig {
        baseline,
        canary,
        shadow,
        steps,
        step_time,
        approve,
        webhook,
        analysis,
    })
}

/// The shadow stage mirrors the baseline's requests to the canary, with `[mirror]`'s settings
/// when it names the canary: a `[mirror]` that sends copies elsewhere, copies another
/// backend's requests, or does not compare, cannot be it.
fn shadow_mirror(
    mirror: Option<&MirrorConfig>,
    baseline: &str,
    canary: &str,
    span: Range<usize>,
) -> Result<(), FieldError> {
    let Some(mirror) = mirror else {
        return Ok(());
    };
    let why = if mirror.backend != canary {
        format!(
            "the shadow stage sends copies to the canary {canary:?}, but [mirror] sends them to {:?}; point mirror.backend at the canary or remove [mirror]",
            mirror.backend
        )
    } else if mirror.from.as_deref().is_some_and(|from| from != baseline) {
        format!(
            "the shadow stage compares the canary with the baseline {baseline:?}, but [mirror] copies {:?}'s requests",
            mirror.from.as_deref().unwrap_or_default()
        )
    } else if !mirror.compare {
        "the shadow stage judges the canary by comparing its answers: [mirror] must keep compare = true".to_owned()
    } else {
        return Ok(());
    };
    Err(FieldError::new("rollout.shadow", span, why))
}

fn rollout_steps(list: Spanned<Vec<Spanned<RawInt>>>) -> Result<Vec<u32>, FieldError> {
    let list_span = list.span();
    let mut steps: Vec<u32> = Vec::new();
    for (i, step) in list.into_inner().into_iter().enumerate() {
        let value = step.get_ref().0;
        let key = format!("rollout.steps[{i}]");
        let percent = match u32::try_from(value) {
            Ok(percent @ 1..=100) => percent,
            _ => {
                return Err(FieldError::new(
                    key,
                    step.span(),
                    format!("a step is the canary's percent, from 1 to 100; got {value}"),
                ));
            }
        };
        if steps.last().is_some_and(|&last| last >= percent) {
            return Err(FieldError::new(
                key,
                step.span(),
                format!("steps must rise: {percent} comes after {steps:?}"),
            ));
        }
        steps.push(percent);
    }
    if steps.last() != Some(&100) {
        return Err(FieldError::new(
            "rollout.steps",
            list_span,
            "the last step must be 100 (the promotion itself)",
        ));
    }
    Ok(steps)
}

fn webhook_url(raw: Spanned<String>) -> Result<Uri, FieldError> {
    let invalid = |why: &str| {
        FieldError::new(
            "rollout.webhook",
            raw.span(),
            format!("{:?} {why}", raw.get_ref()),
        )
    };
    let uri: Uri = raw.get_ref().parse().map_err(|_| invalid("is not a URL"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(invalid("must be an http://HOST[:PORT]/PATH URL"));
    }
    Ok(uri)
}

fn validate_analysis(
    raw: Option<RawAnalysis>,
    step_time: Duration,
) -> Result<AnalysisConfig, FieldError> {
    let defaults = AnalysisConfig::default();
    let Some(raw) = raw else {
        return Ok(AnalysisConfig {
            max_step_time: defaults.max_step_time.max(step_time),
            ..defaults
        });
    };
    let max_step_span = raw.max_step_time.as_ref().map_or(0..0, Spanned::span);
    let max_step_given = raw.max_step_time.is_some();
    let max_step_time = positive_duration(
        "rollout.analysis.max_step_time",
        raw.max_step_time,
        defaults.max_step_time.max(step_time),
    )?;
    if max_step_given && max_step_time < step_time {
        return Err(FieldError::new(
            "rollout.analysis.max_step_time",
            max_step_span,
            format!(
                "must be at least rollout.step_time ({})",
                format_duration(step_time)
            ),
        ));
    }
    let on_inconclusive = match raw.on_inconclusive {
        None => defaults.on_inconclusive,
        Some(value) => match value.get_ref().as_str() {
            "hold" => OnInconclusive::Hold,
            "rollback" => OnInconclusive::Rollback,
            "advance" => OnInconclusive::Advance,
            other => {
                return Err(FieldError::new(
                    "rollout.analysis.on_inconclusive",
                    value.span(),
                    format!("{other:?} is not one of \"hold\", \"rollback\", \"advance\""),
                ));
            }
        },
    };
    let min_requests = match raw.min_requests {
        None => defaults.min_requests,
        Some(raw) => u64::try_from(raw.get_ref().0).map_err(|_| {
            FieldError::new(
                "rollout.analysis.min_requests",
                raw.span(),
                format!("must be 0 or more, got {}", raw.get_ref().0),
            )
        })?,
    };
    Ok(AnalysisConfig {
        interval: positive_duration("rollout.analysis.interval", raw.interval, defaults.interval)?,
        min_requests,
        max_step_time,
        on_inconclusive,
        error_tolerance: fraction(
            "rollout.analysis.error_tolerance",
            raw.error_tolerance,
            defaults.error_tolerance,
            0.0..1.0,
        )?,
        latency_tolerance: fraction(
            "rollout.analysis.latency_tolerance",
            raw.latency_tolerance,
            defaults.latency_tolerance,
            0.0..10.0,
        )?,
        confidence: fraction(
            "rollout.analysis.confidence",
            raw.confidence,
            defaults.confidence,
            0.5..1.0,
        )?,
        // 0 could never be shown (a rate can only be bounded above 0); at 0.1% a stage
        // without differences passes after some 12,000 comparisons.
        max_diff_rate: fraction(
            "rollout.analysis.max_diff_rate",
            raw.max_diff_rate,
            defaults.max_diff_rate,
            0.001..0.5,
        )?,
    })
}

/// A number in `range` (start included, end excluded), or the default when absent.
fn fraction(
    key: &str,
    raw: Option<Spanned<RawNumber>>,
    default: f64,
    range: Range<f64>,
) -> Result<f64, FieldError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let value = raw.get_ref().0;
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(
            key,
            raw.span(),
            format!(
                "must be at least {} and below {}, got {value}",
                range.start, range.end
            ),
        ))
    }
}

fn socket_addr(
    key: &str,
    raw: Option<Spanned<String>>,
    default: SocketAddr,
) -> Result<SocketAddr, FieldError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    raw.get_ref().parse().map_err(|_| {
        FieldError::new(
            key,
            raw.span(),
            format!(
                "invalid listen address {:?}; expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\" (host names are not resolved)",
                raw.get_ref()
            ),
        )
    })
}

pub(super) fn duration(
    key: &str,
    raw: Option<Spanned<RawDuration>>,
    default: Duration,
) -> Result<Duration, FieldError> {
    match raw {
        None => Ok(default),
        Some(raw) => {
            parse_duration(&raw.get_ref().0).map_err(|e| FieldError::new(key, raw.span(), e))
        }
    }
}

fn positive_duration(
    key: &str,
    raw: Option<Spanned<RawDuration>>,
    default: Duration,
) -> Result<Duration, FieldError> {
    let span = raw.as_ref().map_or(0..0, Spanned::span);
    let value = duration(key, raw, default)?;
    if value.is_zero() {
        return Err(FieldError::new(
            key,
            span,
            format!(
                "must be greater than 0 (default {})",
                format_duration(default)
            ),
        ));
    }
    Ok(value)
}

fn threshold(key: &str, raw: Option<Spanned<RawInt>>, default: u32) -> Result<u32, FieldError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match u32::try_from(raw.get_ref().0) {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(FieldError::new(
            key,
            raw.span(),
            format!(
                "must be an integer from 1 to {}, got {}",
                u32::MAX,
                raw.get_ref().0
            ),
        )),
    }
}

fn header_name(key: &str, raw: &Spanned<String>) -> Result<HeaderName, FieldError> {
    rule::header_name(raw.get_ref()).map_err(|message| FieldError::new(key, raw.span(), message))
}

fn cookie_name(key: &str, raw: Spanned<String>) -> Result<String, FieldError> {
    rule::cookie_name(raw.get_ref())
        .map_err(|message| FieldError::new(key, raw.span(), message))?;
    Ok(raw.into_inner())
}

fn non_empty(key: &str, raw: Spanned<String>) -> Result<String, FieldError> {
    if raw.get_ref().is_empty() {
        return Err(FieldError::new(key, raw.span(), "must not be empty"));
    }
    Ok(raw.into_inner())
}
