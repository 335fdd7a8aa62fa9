//! A small HTTP/1.1 client for the admin API of a running proxy: what `canary-proxy rollout`
//! and the demo's rollout view use to read and drive the rollout (and what other operator
//! subcommands can use). One connection per call, `Connection: close`: an operator's command,
//! or one read a second while watching, so there is nothing to pool. Each call is bounded by
//! a timeout, carries the bearer token when one is given, and expects JSON back; an answer
//! other than 2xx becomes [`AdminClientError::Status`] with the API's `{"error": ...}`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// Where `--admin` points by default: the admin listener's default address.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9901";

/// The environment variable the operator's subcommands read the bearer token from when
/// `--token` is not given (the same name `admin.token_env` suggests).
pub const TOKEN_ENV: &str = "CANARY_ADMIN_TOKEN";

/// How long one call may take, connect to last byte.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin answers are small JSON documents; a bigger one is refused.
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Why a call to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("`{url}` is not an admin API URL: {why}")]
    BadUrl { url: String, why: String },
    #[error("the bearer token cannot be sent in an HTTP header (control characters?)")]
    BadToken,
    #[error("cannot connect to the admin API at {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin API at {url} did not answer within {}s", .after.as_secs())]
    Timeout { url: String, after: Duration },
    #[error("the exchange with the admin API at {url} failed")]
    Exchange {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{url} answered {status} with a body that is not JSON: {body}")]
    NotJson {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{url} answered {status}: {error}{hint}", hint = status_hint(*.status, *.token_sent))]
    Status {
        url: String,
        status: StatusCode,
        /// The API's `error` string (or the body's text when it has none).
        error: String,
        /// The whole JSON answer, for the fields beside `error` (a 409's `state`).
        body: Value,
        /// Whether the call carried a bearer token (a 401 then means a wrong one).
        token_sent: bool,
    },
}

/// What a 401 asks the operator to do.
fn status_hint(status: StatusCode, token_sent: bool) -> String {
    match (status, token_sent) {
        (StatusCode::UNAUTHORIZED, false) => {
            format!(" (this proxy needs a bearer token: pass --token TOKEN or set {TOKEN_ENV})")
        }
        (StatusCode::UNAUTHORIZED, true) => {
            " (the token given was refused: check --token or the environment)".to_string()
        }
        _ => String::new(),
    }
}

/// The admin API of one proxy.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// The URL as the operator gave it, for messages.
    url: String,
    /// Host to connect to, without IPv6 brackets.
    host: String,
    port: u16,
    /// Sent as `Host`.
    authority: String,
    /// A path prefix the admin API is mounted under (behind a reverse proxy), "" normally.
    prefix: String,
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

impl AdminClient {
    /// A client for the admin API at `url` (`http://HOST[:PORT][/PREFIX]`; the scheme may be
    /// left out), sending `token` as `Authorization: Bearer` when given.
    pub fn new(url: &str, token: Option<&str>) -> Result<AdminClient, AdminClientError> {
        let bad = |why: &str| AdminClientError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = full
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https is not supported: the admin API serves plain HTTP (keep it on loopback)",
                ));
            }
            _ => return Err(bad("only http:// URLs are supported")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "user info is not supported; pass the token with --token",
            ));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let authorization = token
            .map(|t| HeaderValue::try_from(format!("Bearer {t}")))
            .transpose()
            .map_err(|_| AdminClientError::BadToken)?;
        Ok(AdminClient {
            url: url.trim_end_matches('/').to_string(),
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            prefix: uri.path().trim_end_matches('/').to_string(),
            authorization,
            timeout: CALL_TIMEOUT,
        })
    }

    /// The URL as given, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET path` (e.g. `/admin/rollout`); the JSON answer of a 2xx.
    pub async fn get(&self, path: &str) -> Result<Value, AdminClientError> {
        self.call(Method::GET, path).await
    }

    /// `POST path` with an empty body; the JSON answer of a 2xx.
    pub async fn post(&self, path: &str) -> Result<Value, AdminClientError> {
        self.call(Method::POST, path).await
    }

    async fn call(&self, method: Method, path: &str) -> Result<Value, AdminClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path)).await {
            Ok(result) => result,
            Err(_) => Err(AdminClientError::Timeout {
                url: self.url.clone(),
                after: self.timeout,
            }),
        }
    }

    async fn exchange(&self, method: Method, path: &str) -> Result<Value, AdminClientError> {
        let exchange_error =
            |source: Box<dyn std::error::Error + Send + Sync>| AdminClientError::Exchange {
                url: self.url.clone(),
                source,
            };
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| AdminClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| exchange_error(e.into()))?;
        // The connection ends with the exchange (`Connection: close`), or when this call is
        // dropped by its timeout: the task then sees its sender gone and finishes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, self.authority.as_str())
            .header(ACCEPT, "application/json")
            .header(CONNECTION, "close")
            .header(
                USER_AGENT,
                concat!("canary-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| exchange_error(e.into()))?;
        if let Some(value) = &self.authorization {
            request.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| exchange_error(e.into()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(exchange_error)?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        let json = serde_json::from_slice::<Value>(&bytes);
        if status.is_success() {
            return json.map_err(|_| AdminClientError::NotJson {
                url: self.url.clone(),
                status,
                body: shorten(&text),
            });
        }
        let body = json.unwrap_or(Value::Null);
        let error = body
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| shorten(&text), str::to_string);
        Err(AdminClientError::Status {
            url: self.url.clone(),
            status,
            error,
            body,
            token_sent: self.authorization.is_some(),
        })
    }
}

/// The first line of a body, at most 200 characters, for a message.
fn shorten(text: &str) -> String {
    let line = text.trim().lines().next().unwrap_or("");
    let mut short: String = line.chars().take(200).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    if short.is_empty() {
        "(empty)".to_string()
    } else {
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_and_without_scheme_port_and_prefix() {
        let c = AdminClient::new("http://127.0.0.1:9901", None).unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.authority.as_str(),
                c.prefix.as_str()
            ),
            ("127.0.0.1", 9901, "127.0.0.1:9901", "")
        );
        let c = AdminClient::new("localhost:9901/", None).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.url()),
            ("localhost", 9901, "localhost:9901")
        );
        let c = AdminClient::new("http://[::1]:9901/canary/", None).unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.authority.as_str(),
                c.prefix.as_str()
            ),
            ("::1", 9901, "[::1]:9901", "/canary")
        );
        assert_eq!(
            AdminClient::new("http://admin.internal", None)
                .unwrap()
                .port,
            80
        );
    }

    #[test]
    fn refuses_what_it_cannot_speak_and_says_why() {
        for (url, why) in [
            ("https://127.0.0.1:9901", "https"),
            ("ftp://127.0.0.1", "http://"),
            ("http://user:secret@127.0.0.1:9901", "user info"),
            ("http://127.0.0.1:9901/?x=1", "query"),
            ("http://exa mple", "invalid"),
        ] {
            let error = AdminClient::new(url, None).unwrap_err().to_string();
            assert!(error.contains(url), "{error}");
            assert!(error.contains(why), "{url}: {error}");
        }
        assert!(matches!(
            AdminClient::new("127.0.0.1:9901", Some("bad\ntoken")),
            Err(AdminClientError::BadToken)
        ));
    }

    #[test]
    fn a_401_says_how_to_pass_the_token() {
        let error = |token_sent| AdminClientError::Status {
            url: "http://127.0.0.1:9901".into(),
            status: StatusCode::UNAUTHORIZED,
            error: "missing or wrong bearer token".into(),
            body: Value::Null,
            token_sent,
        };
        let without = error(false).to_string();
        assert!(
            without.contains("--token") && without.contains(TOKEN_ENV),
            "{without}"
        );
        assert!(error(true).to_string().contains("refused"));
    }

    #[test]
    fn bodies_in_messages_are_one_short_line() {
        assert_eq!(shorten("  <html>\n<body>"), "<html>");
        assert_eq!(shorten(""), "(empty)");
        let long = "x".repeat(300);
        assert_eq!(shorten(&long).chars().count(), 201);
    }
}
