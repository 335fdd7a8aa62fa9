//! Header rewriting on the way through: hop-by-hop headers are stripped in both directions
//! (RFC 9110 §7.6.1), then the proxy adds its own (`X-Forwarded-*`, `x-request-id`).
//!
//! Stripping comes first, so that a client cannot smuggle a header past the proxy by naming it
//! in `Connection`, nor remove one the proxy adds.
//!
//! Before any of that, [`settle_host`] checks the request target and `Host` of every request
//! (both HTTP/1 paths and HTTP/2 alike) and makes `Host` the one the request goes upstream
//! with: routing rules, `X-Forwarded-Host` and the upstream all see that one.

use std::net::{IpAddr, Ipv6Addr};

use http::header::{
    CONNECTION, COOKIE, HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Uri, Version};

use super::error::ProxyError;
use crate::http1::head::has_token;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Marks an answer a fault drill touched: `abort` (the proxy answered) or `delay`.
pub static X_CANARY_FAULT: HeaderName = HeaderName::from_static("x-canary-fault");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers that are removed whether or not `Connection` names them
/// (`Connection` first).
fn fixed_hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
    ]
}

/// Removes every hop-by-hop header: those `Connection` names (case-insensitively, over every
/// `Connection` line) and the fixed list. Allocation-free unless `Connection` names a header
/// outside the fixed list (its usual values, `keep-alive`, `close` and `upgrade`, do not).
/// Returns whether a `TE` removed named `trailers`: a request to an HTTP/2 upstream keeps
/// `te: trailers` (RFC 9113 §8.2.2; gRPC servers require it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // One pass over the names finds which fixed ones are present (usually none, or only
    // `Connection`); only those are removed, instead of nine hashed removals every time.
    let fixed = fixed_hop_by_hop();
    let mut present = 0u16;
    for name in headers.keys() {
        // Their lengths: a cheap filter before comparing names.
        if matches!(name.as_str().len(), 2 | 7 | 10 | 16..=19)
            && let Some(i) = fixed.iter().position(|f| *f == name)
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return false;
    }
    // `TE` is fifth in the fixed list.
    let te_trailers = present & (1 << 5) != 0 && has_token(headers, &TE, b"trailers");
    // `Connection: keep-alive` or `close` (the usual values) names nothing more to remove.
    let names_others = |value: &HeaderValue| {
        let value = value.as_bytes();
        !value.eq_ignore_ascii_case(b"keep-alive") && !value.eq_ignore_ascii_case(b"close")
    };
    if present & 1 != 0 && headers.get_all(CONNECTION).iter().any(names_others) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|token| {
                !token.eq_ignore_ascii_case(b"close")
                    && !fixed
                        .iter()
                        .any(|fixed| token.eq_ignore_ascii_case(fixed.as_str().as_bytes()))
            })
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in fixed.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    te_trailers
}

/// Checks a request's target and `Host`, makes `Host` the one the request goes upstream with,
/// and returns it (`None` when the request has none: HTTP/1.0, or HTTP/2 with neither
/// `:authority` nor `host`). Refused with 400:
///
/// - HTTP/1: no `Host` in HTTP/1.1, or several `Host` lines (RFC 9112 §3.2); a `Host` that is
///   not `uri-host [ ":" port ]` ([`is_valid_authority`]), except an empty one (RFC 9112 §3.2
///   has clients send it empty when the target URI has no authority; the upstream then uses
///   its default name, RFC 9112 §3.3); a target in authority-form (it is only for CONNECT,
///   which the proxy refuses before, RFC 9112 §3.2.3); an absolute-form target whose scheme is
///   not http or https, or whose authority is not a valid host (userinfo included). An
///   absolute-form target's authority replaces `Host` (RFC 9112 §3.2.2: a proxy MUST NOT
///   forward the received Host).
/// - HTTP/2: `:authority`, when present, replaces any `host` field (RFC 9113 §8.3.1: the two
///   must agree, and an intermediary builds `Host` from `:authority`); without it, at most
///   one valid `host`.
/// - Any version: the asterisk-form target `*` is only for OPTIONS (RFC 9112 §3.2.4).
///
/// Allocation-free unless `Host` has to be replaced by an authority that differs from it.
pub fn settle_host(
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    version: Version,
) -> Result<Option<HeaderValue>, ProxyError> {
    if uri.scheme().is_none()
        && uri.authority().is_none()
        && uri.path() == "*"
        && method != Method::OPTIONS
    {
        return Err(ProxyError::BadRequest("a `*` target is only for OPTIONS"));
    }
    if version >= Version::HTTP_2
        && let Some(authority) = uri.authority()
    {
        return replace_host(headers, authority).map(Some);
    }
    let mut lines = headers.get_all(HOST).iter();
    let host = lines.next();
    if lines.next().is_some() {
        return Err(ProxyError::BadRequest("several Host lines"));
    }
    if let Some(host) = host
        && !host.is_empty()
        && !is_valid_authority(host.as_bytes())
    {
        return Err(ProxyError::BadRequest("a Host that is not host[:port]"));
    }
    if version >= Version::HTTP_2 {
        return Ok(host.cloned());
    }
    if host.is_none() && version == Version::HTTP_11 {
        return Err(ProxyError::BadRequest("no Host in an HTTP/1.1 request"));
    }
    match (uri.scheme(), uri.authority()) {
        // origin-form (`/path?query`) or asterisk-form
        (None, None) => Ok(host.cloned()),
        (None, Some(_)) => Err(ProxyError::BadRequest(
            "an authority-form target is only for CONNECT",
        )),
        (Some(scheme), Some(authority)) if *scheme == Scheme::HTTP || *scheme == Scheme::HTTPS => {
            replace_host(headers, authority).map(Some)
        }
        (Some(_), _) => Err(ProxyError::BadRequest(
            "an absolute-form target of a scheme other than http or https",
        )),
    }
}

/// Makes `authority` (from an absolute-form target or `:authority`) the request's only `Host`,
/// once checked like a Host. When the request's `Host` already says the same, it is kept as it
/// is (no copy).
fn replace_host(headers: &mut HeaderMap, authority: &Authority) -> Result<HeaderValue, ProxyError> {
    const INVALID: ProxyError =
        ProxyError::BadRequest("a target authority that is not host[:port]");
    let text = authority.as_str().as_bytes();
    if !is_valid_authority(text) {
        return Err(INVALID);
    }
    let mut lines = headers.get_all(HOST).iter();
    if let (Some(host), None) = (lines.next(), lines.next())
        && host.as_bytes() == text
    {
        return Ok(host.clone());
    }
    let host = HeaderValue::from_bytes(text).map_err(|_| INVALID)?;
    headers.insert(HOST, host.clone());
    Ok(host)
}

/// What may appear in a reg-name (RFC 3986 §3.2.2) here: unreserved characters and
/// sub-delims, plus `%` (its two hex digits are checked apart). The comma, a sub-delim, is
/// left out: no DNS name has one, and a Host holding one reads as two values joined (as in
/// `X-Forwarded-Host`, which carries it on and which upstreams split on commas).
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let allowed = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;=%";
    let mut i = 0;
    while i < allowed.len() {
        table[allowed[i] as usize] = true;
        i += 1;
    }
    table
};

/// True when `value` is `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2–3.2.3): a
/// non-empty reg-name (which covers IPv4 addresses) or an IPv6 address in brackets, then
/// optionally `:` and a port of 1 to 5 digits up to 65535. No userinfo, no path, no spaces, no
/// list. IPvFuture literals and zone identifiers are not accepted. A byte scan, no allocation.
pub fn is_valid_authority(value: &[u8]) -> bool {
    authority_host(value).is_some()
}

/// The host of a valid authority ([`is_valid_authority`]) without its port (an IPv6 address
/// keeps its brackets), or `None` when `value` is not one.
pub fn authority_host(value: &[u8]) -> Option<&[u8]> {
    let (host, host_ok, rest) = match value.strip_prefix(b"[") {
        Some(literal) => {
            let end = memchr::memchr(b']', literal)?;
            (
                &value[..end + 2],
                is_ipv6(&literal[..end]),
                &literal[end + 1..],
            )
        }
        None => {
            let end = reg_name_len(value)?;
            (&value[..end], true, &value[end..])
        }
    };
    let port_ok = match rest {
        [] => true,
        [b':', port @ ..] => is_port(port),
        _ => false,
    };
    (host_ok && port_ok).then_some(host)
}

/// The length of the non-empty reg-name at the start of `value` (up to a `:` or the end), or
/// `None` when a byte before that is not allowed in one. One pass, no call per byte: this runs
/// on every request.
fn reg_name_len(value: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < value.len() {
        let byte = value[i];
        if byte == b':' {
            break;
        }
        if !REG_NAME[usize::from(byte)] {
            return None;
        }
        if byte == b'%' {
            // pct-encoded = "%" HEXDIG HEXDIG
            match value.get(i + 1..i + 3) {
                Some([a, b]) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => i += 2,
                _ => return None,
            }
        }
        i += 1;
    }
    (i > 0).then_some(i)
}

fn is_ipv6(address: &[u8]) -> bool {
    std::str::from_utf8(address).is_ok_and(|a| a.parse::<Ipv6Addr>().is_ok())
}

fn is_port(port: &[u8]) -> bool {
    (1..=5).contains(&port.len())
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX)
}

/// The request target sent upstream, in origin-form (RFC 9112 §3.2.1): the path and query of
/// an origin-form or absolute-form target, with `/` for an empty path (RFC 9112 §3.2.2), or
/// `*` for asterisk-form.
pub fn origin_form(uri: &Uri) -> PathAndQuery {
    match uri.path_and_query() {
        Some(target) if target.as_str().starts_with('/') || target.as_str() == "*" => {
            target.clone()
        }
        // An absolute-form target with a query and no path (`http://a?q`): `as_str` gives
        // `?q`, `Display` puts the `/` in front.
        Some(target) => PathAndQuery::try_from(target.to_string())
            .unwrap_or_else(|_| PathAndQuery::from_static("/")),
        None => PathAndQuery::from_static("/"),
    }
}

/// The client address as a header value; built once per connection.
pub fn client_ip_value(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// True when a request asks for a WebSocket upgrade (the only upgrade the proxy tunnels).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, &UPGRADE, b"websocket") && has_token(headers, &CONNECTION, b"upgrade")
}

/// True when a 101 response switches to WebSocket.
pub fn is_websocket_upgrade_response(headers: &HeaderMap) -> bool {
    has_token(headers, &UPGRADE, b"websocket")
}

/// Folds the several `Cookie` lines an HTTP/2 client may send into the one line HTTP/1.1
/// upstreams expect (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let parts: Vec<&[u8]> = headers
        .get_all(COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if let Ok(joined) = HeaderValue::from_bytes(&parts.join(&b"; "[..])) {
        headers.insert(COOKIE, joined);
    }
}

/// Appends the client address (from [`client_ip_value`]) to `X-Forwarded-For`, keeping earlier
/// hops folded into one line, and sets `X-Forwarded-Proto` (`https` when the request came over
/// TLS, else `http`) and `X-Forwarded-Host` (the Host the request is forwarded with, from
/// [`settle_host`]; none, and any the client sent removed, when that is absent or empty).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    host: Option<&HeaderValue>,
    tls: bool,
) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR) {
        None => Some(client.clone()),
        Some(_) => {
            let mut joined = Vec::new();
            for value in headers.get_all(&X_FORWARDED_FOR) {
                joined.extend_from_slice(value.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    let proto = if tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) if !host.is_empty() => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        _ => headers.remove(&X_FORWARDED_HOST),
    };
}

/// The request's `x-request-id`, or a new one (128 random bits, hex) when it has none.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(id) if !id.is_empty() => id.clone(),
        _ => new_request_id(),
    }
}

fn new_request_id() -> HeaderValue {
    let text = crate::id::hex(crate::id::random(&mut rand::rng()));
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn the_host_of_an_authority_drops_only_the_port() {
        assert_eq!(authority_host(b"a.example:8080"), Some(&b"a.example"[..]));
        assert_eq!(authority_host(b"127.0.0.1"), Some(&b"127.0.0.1"[..]));
        assert_eq!(authority_host(b"[::1]:9901"), Some(&b"[::1]"[..]));
        assert_eq!(authority_host(b"[::1]"), Some(&b"[::1]"[..]));
        for bad in [&b"a b"[..], b"[::1", b"a:port", b"a:123456", b"", b"[zz]:1"] {
            assert_eq!(
                authority_host(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "Foo"),
            ("x-secret", "1"),
            ("foo", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
            ("host", "example"),
        ]);
        assert!(strip_hop_by_hop(&mut h), "TE named trailers");
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-kept"]);
    }

    #[test]
    fn connection_tokens_of_the_fixed_list_are_stripped_too() {
        let mut h = map(&[
            ("connection", "Keep-Alive, close, Upgrade, TE"),
            ("te", "trailers"),
            ("x", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn te_trailers_is_told_apart_from_other_te_values() {
        for (te, trailers) in [
            ("trailers", true),
            ("gzip, Trailers", true),
            ("gzip", false),
            ("trailers-not", false),
        ] {
            let mut h = map(&[("te", te), ("x", "1")]);
            assert_eq!(strip_hop_by_hop(&mut h), trailers, "{te}");
            assert!(!h.contains_key(TE));
        }
        assert!(!strip_hop_by_hop(&mut map(&[("x", "1")])));
    }

    #[test]
    fn hosts_are_host_and_port() {
        for good in [
            "example.com",
            "shop.example.com:8080",
            "EXAMPLE.com.",
            "127.0.0.1",
            "127.0.0.1:80",
            "999.1.1.1",
            "[::1]",
            "[2001:db8::7]:443",
            "[::ffff:192.0.2.1]",
            "my_host-1",
            "xn--bcher-kva.example",
            "caf%C3%A9.example",
            "a!$&'()*+;=b",
            "a:65535",
            "a:0",
        ] {
            assert!(is_valid_authority(good.as_bytes()), "{good}");
            assert!(
                authority_host(good.as_bytes())
                    .is_some_and(|h| good.starts_with(std::str::from_utf8(h).unwrap()))
            );
        }
        for bad in [
            "",
            "a, b",
            "a,b",
            "a b/c",
            "a/b",
            "a b",
            "user@example.com",
            ":80",
            "a:",
            "a:65536",
            "a:123456",
            "a:8x",
            "a:80:80",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[example.com]",
            "[v1.fe80::a]",
            "[fe80::1%25eth0]",
            "a%2",
            "a%zz",
            "a?b",
            "a#b",
            "a\tb",
            "\u{e9}t\u{e9}.example",
        ] {
            assert!(!is_valid_authority(bad.as_bytes()), "{bad:?}");
        }
    }

    fn settle(
        method: Method,
        target: &'static str,
        pairs: &[(&'static str, &'static str)],
        version: Version,
    ) -> (Result<Option<HeaderValue>, ProxyError>, HeaderMap) {
        let mut headers = map(pairs);
        let uri = Uri::from_static(target);
        let result = settle_host(&method, &uri, &mut headers, version);
        (result, headers)
    }

    fn settled(target: &'static str, pairs: &[(&'static str, &'static str)]) -> Option<String> {
        let (result, headers) = settle(Method::GET, target, pairs, Version::HTTP_11);
        let host = result.unwrap_or_else(|e| panic!("{target} {pairs:?}: {e}"));
        assert_eq!(
            host.as_ref(),
            headers.get(HOST),
            "Host field and returned Host agree"
        );
        host.map(|h| h.to_str().unwrap().to_string())
    }

    fn refused(method: Method, target: &'static str, pairs: &[(&'static str, &'static str)]) {
        for version in [Version::HTTP_10, Version::HTTP_11] {
            let (result, _) = settle(method.clone(), target, pairs, version);
            assert!(
                matches!(result, Err(ProxyError::BadRequest(_))),
                "{method} {target} {pairs:?} {version:?}: {result:?}"
            );
        }
    }

    #[test]
    fn http1_hosts_and_targets() {
        assert_eq!(
            settled("/p?q=1", &[("host", "shop.example")]).unwrap(),
            "shop.example"
        );
        // An absolute-form target's authority is the Host, whatever Host said.
        assert_eq!(
            settled("http://abs.example/p", &[("host", "hdr.example")]).unwrap(),
            "abs.example"
        );
        assert_eq!(
            settled("HTTPS://abs.example:8443/p", &[("host", "")]).unwrap(),
            "abs.example:8443"
        );
        // An empty Host is allowed (the target URI has no authority): passed on as it is.
        assert_eq!(settled("/", &[("host", "")]).unwrap(), "");
        // HTTP/1.0 may come without Host.
        let (result, _) = settle(Method::GET, "/", &[], Version::HTTP_10);
        assert!(matches!(result, Ok(None)));
        let (result, headers) = settle(Method::GET, "http://abs.example/", &[], Version::HTTP_10);
        assert_eq!(result.unwrap().unwrap(), "abs.example");
        assert_eq!(headers[HOST], "abs.example");
        // OPTIONS * is the one use of asterisk-form.
        let (result, _) = settle(Method::OPTIONS, "*", &[("host", "a")], Version::HTTP_11);
        assert_eq!(result.unwrap().unwrap(), "a");

        let (result, _) = settle(Method::GET, "/", &[], Version::HTTP_11);
        assert!(
            matches!(result, Err(ProxyError::BadRequest(_))),
            "no Host in HTTP/1.1"
        );
        refused(Method::GET, "/", &[("host", "a"), ("host", "b")]);
        refused(Method::GET, "/", &[("host", "a, b")]);
        refused(Method::GET, "/", &[("host", "a b/c")]);
        refused(Method::GET, "/", &[("host", "user@a")]);
        refused(
            Method::GET,
            "http://abs.example/",
            &[("host", "a"), ("host", "a")],
        );
        refused(Method::GET, "http://abs.example/", &[("host", "a b")]);
        refused(Method::GET, "abs.example:80", &[("host", "abs.example:80")]);
        refused(Method::GET, "*", &[("host", "a")]);
        refused(
            Method::GET,
            "ftp://abs.example/p",
            &[("host", "abs.example")],
        );
        refused(
            Method::GET,
            "http://user@abs.example/p",
            &[("host", "abs.example")],
        );
    }

    #[test]
    fn http2_authority_wins_over_host() {
        let h2 = |target, pairs| settle(Method::GET, target, pairs, Version::HTTP_2);
        let (result, headers) = h2("http://auth.example/p", &[("host", "other.example")]);
        assert_eq!(result.unwrap().unwrap(), "auth.example");
        assert_eq!(
            headers.get_all(HOST).iter().collect::<Vec<_>>(),
            ["auth.example"]
        );
        // Several host fields beside :authority are all replaced.
        let (result, headers) = h2("http://auth.example/p", &[("host", "x"), ("host", "y")]);
        assert_eq!(result.unwrap().unwrap(), "auth.example");
        assert_eq!(headers.get_all(HOST).iter().count(), 1);
        // Without :authority, the host field, if any, checked as in HTTP/1.
        let (result, _) = h2("/p", &[("host", "h.example")]);
        assert_eq!(result.unwrap().unwrap(), "h.example");
        assert!(matches!(h2("/p", &[]).0, Ok(None)));
        assert!(h2("/p", &[("host", "a b")]).0.is_err());
        assert!(h2("/p", &[("host", "a"), ("host", "b")]).0.is_err());
        assert!(h2("http://user@auth.example/p", &[]).0.is_err());
    }

    #[test]
    fn targets_go_upstream_in_origin_form() {
        let form = |target: &'static str| origin_form(&Uri::from_static(target));
        assert_eq!(form("/p?q=1"), "/p?q=1");
        assert_eq!(form("http://abs.example/p?q=1"), "/p?q=1");
        assert_eq!(form("http://abs.example"), "/");
        assert_eq!(form("http://abs.example?q=1"), "/?q=1");
        assert_eq!(form("*"), "*");
        assert_eq!(form("abs.example:80"), "/");
    }

    #[test]
    fn websocket_detection_needs_both_headers() {
        assert!(is_websocket_upgrade(&map(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade")
        ])));
        assert!(!is_websocket_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&map(&[
            ("upgrade", "h2c"),
            ("connection", "upgrade")
        ])));
    }

    #[test]
    fn forwarded_for_appends_to_earlier_hops() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        let local = client_ip_value("127.0.0.1".parse().unwrap());
        add_forwarded(
            &mut h,
            &local,
            Some(&HeaderValue::from_static("svc")),
            false,
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "svc");
        let mut h = map(&[
            ("x-forwarded-host", "spoofed"),
            ("x-forwarded-proto", "http"),
        ]);
        add_forwarded(&mut h, &client_ip_value("::1".parse().unwrap()), None, true);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
        assert!(h.get("x-forwarded-host").is_none());
        let mut h = map(&[("x-forwarded-host", "spoofed")]);
        add_forwarded(&mut h, &local, Some(&HeaderValue::from_static("")), false);
        assert!(
            h.get("x-forwarded-host").is_none(),
            "an empty Host names no host"
        );
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        assert_eq!(request_id(&map(&[("x-request-id", "abc")])), "abc");
        let id = request_id(&map(&[("x-request-id", "")]));
        assert_eq!(id.len(), 32);
        assert!(id.to_str().unwrap().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(request_id(&HeaderMap::new()), id);
    }

    #[test]
    fn cookies_of_http2_clients_are_joined() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "uid=alice"), ("x", "y")]);
        join_cookies(&mut h);
        assert_eq!(
            h.get_all("cookie").iter().collect::<Vec<_>>(),
            ["a=1; uid=alice"]
        );
        let mut one = map(&[("cookie", "a=1")]);
        join_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1");
    }

    #[test]
    fn websocket_responses_are_recognised() {
        assert!(is_websocket_upgrade_response(&map(&[(
            "upgrade",
            "WebSocket"
        )])));
        assert!(!is_websocket_upgrade_response(&map(&[("upgrade", "h2c")])));
        assert!(!is_websocket_upgrade_response(&HeaderMap::new()));
    }
}
