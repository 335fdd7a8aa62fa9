//! The dashboard: one page on the admin listener (`GET /`), its script and style embedded in
//! the binary, nothing fetched from anywhere else. It reads and acts through the admin API
//! like any client, so the token, `If-Match`, the cross-site refusals and the audit log
//! apply to it as to curl. Every answer here forbids framing, sniffing and any origin but
//! the listener's own (`Content-Security-Policy`).

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Scripts, styles and requests from the listener only; no inline script or style, no
/// framing, no forms posting elsewhere, no `<base>`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page or asset at `path`, if it is one.
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, content_type) = match path {
        "/" | "/dashboard" | "/dashboard/" => (INDEX, "text/html; charset=utf-8"),
        "/dashboard/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/app.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_assets_are_served_with_the_policy() {
        for path in ["/", "/dashboard/app.js", "/dashboard/app.css"] {
            let response = asset(path).expect(path);
            let headers = response.headers();
            assert_eq!(headers["content-security-policy"], CONTENT_SECURITY_POLICY);
            assert_eq!(headers["x-content-type-options"], "nosniff");
        }
        assert!(asset("/dashboard/other.js").is_none());
        // Nothing inline and nothing from elsewhere: what the policy forbids is not needed.
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        assert!(!SCRIPT.contains("http://") || SCRIPT.contains("http://www.w3.org/2000/svg"));
    }
}
