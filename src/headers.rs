//! Header rewriting on the way through: hop-by-hop headers are stripped in both directions
//! (RFC 9110 §7.6.1), then the proxy adds its own (`X-Forwarded-*`, `x-request-id`).
//!
//! Stripping comes first, so that a client cannot smuggle a header past the proxy by naming it
//! in `Connection`, nor remove one the proxy adds.

use std::net::IpAddr;

use http::Version;
use http::header::{
    CONNECTION, COOKIE, HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use rand::RngExt;

use crate::codec::has_token;
use crate::error::ProxyError;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
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
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
        return;
    }
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
}

/// The checks an HTTP/1 request head must pass before it is forwarded, beyond its framing:
/// exactly one `Host` (none only in HTTP/1.0), and no transfer coding but chunked (the one the
/// proxy decodes; another would reach the upstream unlabelled once `Transfer-Encoding`, a
/// hop-by-hop header, is stripped).
pub fn check_http1_request(headers: &HeaderMap, version: Version) -> Result<(), ProxyError> {
    check_host(headers, version)?;
    if crate::codec::transfer_encoding(headers) == Some(false) {
        return Err(ProxyError::UnsupportedCoding);
    }
    Ok(())
}

/// Exactly one `Host` line; none only in HTTP/1.0 (RFC 9112 §3.2).
pub fn check_host(headers: &HeaderMap, version: Version) -> Result<(), ProxyError> {
    let mut hosts = headers.get_all(HOST).iter();
    if hosts.next().is_none() && version == Version::HTTP_11 {
        return Err(ProxyError::BadRequest("no Host in an HTTP/1.1 request"));
    }
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("several Host lines"));
    }
    Ok(())
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
/// hops folded into one line, and sets `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, host: Option<&HeaderValue>) {
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
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::rng().random();
    let mut text = [0u8; 32];
    for (i, byte) in text.iter_mut().enumerate() {
        *byte = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
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
        strip_hop_by_hop(&mut h);
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
    fn http1_requests_need_one_host_and_no_coding_but_chunked() {
        let one = map(&[("host", "a"), ("transfer-encoding", "chunked")]);
        assert!(check_http1_request(&one, Version::HTTP_11).is_ok());
        assert!(check_http1_request(&map(&[]), Version::HTTP_10).is_ok());
        assert!(check_http1_request(&map(&[]), Version::HTTP_11).is_err());
        let two = map(&[("host", "a"), ("host", "b")]);
        assert!(check_http1_request(&two, Version::HTTP_10).is_err());
        let gzip = map(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]);
        assert!(matches!(
            check_http1_request(&gzip, Version::HTTP_11),
            Err(ProxyError::UnsupportedCoding)
        ));
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
        add_forwarded(&mut h, &local, Some(&HeaderValue::from_static("svc")));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "svc");
        let mut h = map(&[("x-forwarded-host", "spoofed")]);
        add_forwarded(&mut h, &client_ip_value("::1".parse().unwrap()), None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(h.get("x-forwarded-host").is_none());
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
