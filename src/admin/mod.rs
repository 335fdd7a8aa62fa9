//! The admin API, on its own listener (loopback by default):
//!
//! | method, path | does |
//! |---|---|
//! | `GET /admin/weight` | the weights, `{"v1":90,"v2":10}` |
//! | `POST`/`PUT /admin/weight` | sets weights from a JSON body `{"v2":20}` or a query `?v2=20`; names left out keep theirs |
//! | `GET /admin/routes` | the whole effective table |
//! | `GET /admin/explain` | which backend a request with these headers would get, and why |
//! | `GET /admin/faults` | the faults in force |
//! | `PUT /admin/faults` | replaces them with the JSON list in the body (keys of `[[fault]]`) |
//! | `DELETE /admin/faults` | removes them all, or `?backend=NAME`'s |
//! | `GET /admin/mirror` | mirroring's config and report (counts, differing paths, examples) |
//! | `PUT /admin/mirror` | sets mirroring (keys of `[mirror]`); `DELETE` stops it |
//! | `POST /admin/mirror/reset` | clears mirroring's counts (409 in a shadow stage) |
//! | `POST`/`PUT /admin/reload` | re-reads the config file |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when some backend is healthy, else 503 |
//! | `GET /` | the dashboard (`dashboard`: the page and its script and style, embedded) |
//! | `GET /admin/stats` | per backend: requests, 5xx answers and the latency histogram so far |
//!
//! HTTP/1.1 only, bounded so it cannot starve the data plane of descriptors: at most
//! `admin.max_connections` connections (past it, a short 503), `admin.header_read_timeout` for
//! each request head, each idle pause between requests and each body, bodies of 64 KiB.
//!
//! With a token configured, every `/admin/*` call needs `Authorization: Bearer TOKEN` (the
//! scheme in any case). Reads return the table version as `ETag`; writes accept `If-Match`
//! (strong comparison, lists, `*`) and answer 412 when it names no current version. Errors are
//! JSON: `{"error": "..."}`.
//!
//! Beside the server: `client`, a small HTTP/1.1 client of this API for the operator's
//! subcommands, and `cli`, the `canary-proxy rollout ...` subcommand built on it;
//! `dashboard`, the page at `GET /`.

pub mod cli;
pub mod client;
mod dashboard;

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, ETAG, HOST, IF_MATCH, ORIGIN};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::chain::Chain;
use crate::config::MAX_WEIGHT;
use crate::control::rollout::{RolloutController, RolloutError};
use crate::control::{ControlError, ControlPlane, WeightsApplied, fault_json, mirror_json};
use crate::metrics;
use crate::rollout::Command;
use crate::routing::sticky::BUCKETS;
use crate::routing::{Reason, RoutingTable};

/// Admin request bodies are tiny; anything bigger is refused (413).
const MAX_BODY: usize = 64 * 1024;

/// hyper's read buffer per connection, which bounds a request head (hyper's minimum is 8 KiB).
const MAX_HEAD_BUFFER: usize = 64 * 1024;

/// How long a connection turned away at `admin.max_connections` may take to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin API until `shutdown` is cancelled.
///
/// It shares the process's descriptors with the data plane, so it is bounded: HTTP/1.1 only
/// (hyper's server, whose timer starts when a connection opens, unlike the HTTP/1-or-2
/// detection of hyper-util's auto server), at most `admin.max_connections` connections, each
/// closed when a request head (or the next one on a keep-alive connection) or a body does not
/// arrive within `admin.header_read_timeout`.
///
/// Past the cap, a new connection is accepted, answered a short 503 and closed, rather than
/// left in the kernel's backlog: the operator's curl or a scraper learns at once why (instead
/// of hanging until the backlog overflows and connects time out), and the descriptor is back
/// within [`REFUSAL_LINGER`]. At most as many refusals as `max_connections` linger at once;
/// beyond that a connection gets the 503 only if it can be written at once, and is closed.
pub async fn serve_admin(
    listener: TcpListener,
    control: Arc<ControlPlane>,
    rollout: Arc<RolloutController>,
    shutdown: CancellationToken,
) {
    match listener.local_addr() {
        Ok(addr) => control.admin_listening_on(addr),
        Err(error) => tracing::warn!(%error, "admin listener has no address"),
    }
    let settings = control.config().admin;
    let read_timeout = settings.header_read_timeout;
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusals = Arc::new(Semaphore::new(settings.max_connections));
    let busy = busy_answer(settings.max_connections);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size(MAX_HEAD_BUFFER);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of descriptors, say: back off rather than spin.
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            match refusals.clone().try_acquire_owned() {
                Ok(lingering) => {
                    tokio::spawn(refuse(stream, busy.clone(), lingering));
                }
                // Best effort: the answer fits the socket buffer, but closing at once may
                // reset the connection before the client reads it.
                Err(_) => drop(stream.try_write(&busy)),
            }
            continue;
        };
        let (control, rollout) = (control.clone(), rollout.clone());
        let shutdown = shutdown.clone();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| {
                let (control, rollout) = (control.clone(), rollout.clone());
                async move {
                    let response = handle(&control, &rollout, request, read_timeout).await;
                    Ok::<_, Infallible>(response)
                }
            }),
        );
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = connection => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// The whole answer to a connection over `admin.max_connections`.
fn busy_answer(max_connections: usize) -> Bytes {
    let body = json!({
        "error": format!(
            "the admin API is serving admin.max_connections ({max_connections}) connections; retry shortly"
        )
    })
    .to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// Writes `answer`, ends the connection, and reads what the client still sends until it
/// closes (bounded by [`REFUSAL_LINGER`]): closing with unread data would reset the
/// connection, and a reset can discard the answer before the client reads it.
async fn refuse(mut stream: TcpStream, answer: Bytes, _lingering: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Answers one request. `read_timeout` bounds reading its body.
async fn handle(
    control: &Arc<ControlPlane>,
    rollout: &Arc<RolloutController>,
    request: Request<Incoming>,
    read_timeout: Duration,
) -> AdminResponse {
    if let Some(refused) = refuse_other_sites(&request, &control.allowed_hosts()) {
        return refused;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    if path.starts_with("/admin/") {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()));
        if !control.authorized(presented) {
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response
                .headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    let table = control.table().load_full();
    if method == Method::GET
        && let Some(page) = dashboard::asset(&path)
    {
        return page;
    }
    match (method, path.as_str()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => {
            if table.backends.iter().any(|b| b.is_healthy()) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n")
            }
        }
        (Method::GET, "/metrics") => {
            let mut response = text(
                StatusCode::OK,
                control
                    .metrics()
                    .render(|gauges| table.export_gauges(gauges)),
            );
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        (Method::GET, "/admin/weight") if request.uri().query().is_some_and(|q| !q.is_empty()) => {
            not_allowed(
                "GET cannot change weights; use POST or PUT",
                "GET, POST, PUT",
            )
        }
        (Method::GET, "/admin/weight") => with_etag(
            json_response(StatusCode::OK, weights_json(&table)),
            table.version,
        ),
        (Method::POST | Method::PUT, "/admin/weight") => {
            set_weights(control, request, read_timeout).await
        }
        (_, "/admin/weight") => {
            not_allowed("use GET to read, POST or PUT to set", "GET, POST, PUT")
        }
        (Method::GET, "/admin/stats") => {
            // Each backend's requests, 5xx answers and latency histogram so far, for the
            // dashboard's charts (it takes the differences).
            json_response(
                StatusCode::OK,
                json!({"at_ms": crate::utc::unix_ms(), "backends": control.metrics().traffic()}),
            )
        }
        (Method::GET, "/admin/routes") => {
            let mut routes = routes_json(&table);
            if let Some(link) = control.store_link() {
                // Where the table came from (etcd, or at a start while etcd was down, the
                // snapshot or the file), and this replica's part in the rollout.
                routes["store"] = link.status();
            }
            with_etag(json_response(StatusCode::OK, routes), table.version)
        }
        (Method::GET, "/admin/explain") => {
            let tls = control.listener_tls().is_some();
            json_response(StatusCode::OK, explain_json(&table, &request, tls))
        }
        (Method::POST | Method::PUT, "/admin/reload") => {
            let if_match = match if_match(&request) {
                Ok(v) => v,
                Err(message) => return error(StatusCode::BAD_REQUEST, message),
            };
            let reloaded = control
                .run_blocking(move |control| control.reload(if_match.as_deref()))
                .await;
            match reloaded {
                Ok(version) => with_etag(
                    json_response(
                        StatusCode::OK,
                        json!({"reloaded": true, "version": version}),
                    ),
                    version,
                ),
                Err(e) => control_error(control, &e),
            }
        }
        (_, "/admin/reload") => not_allowed("reload needs POST or PUT", "POST, PUT"),
        (Method::GET, "/admin/faults") => with_etag(
            json_response(
                StatusCode::OK,
                fault_json::to_json(table.version, &crate::control::faults_of(&table)),
            ),
            table.version,
        ),
        (Method::PUT | Method::DELETE, "/admin/faults") => {
            change_faults(control, request, read_timeout).await
        }
        (_, "/admin/faults") => not_allowed(
            "use GET to read, PUT to replace, DELETE to remove",
            "GET, PUT, DELETE",
        ),
        (Method::GET, "/admin/mirror") => with_etag(
            json_response(
                StatusCode::OK,
                mirror_json::to_json(table.version, table.mirror.as_deref()),
            ),
            table.version,
        ),
        (Method::PUT | Method::DELETE, "/admin/mirror") => {
            change_mirror(control, request, read_timeout).await
        }
        (_, "/admin/mirror") => not_allowed(
            "use GET to read, PUT to set, DELETE to stop",
            "GET, PUT, DELETE",
        ),
        // A shadow stage judges the counts (and the noise learned) as they grow: 409 then.
        (Method::POST, "/admin/mirror/reset") => match control.reset_mirror_counts() {
            Ok(Some(table)) => json_response(
                StatusCode::OK,
                mirror_json::to_json(table.version, table.mirror.as_deref()),
            ),
            Ok(None) => error(StatusCode::NOT_FOUND, "mirroring is off: nothing to reset"),
            Err(e) => control_error(control, &e),
        },
        (_, "/admin/mirror/reset") => not_allowed("reset needs POST", "POST"),
        (Method::GET, "/admin/rollout") => {
            // The rollout's lock is held while it writes its state file: wait off the runtime.
            let rollout = rollout.clone();
            match tokio::task::spawn_blocking(move || rollout.status()).await {
                Ok(Some(status)) => json_response(StatusCode::OK, status),
                Ok(None) => rollout_error(&RolloutError::NotConfigured),
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "reading the rollout failed",
                ),
            }
        }
        (_, "/admin/rollout") => not_allowed("the rollout is read with GET", "GET"),
        (Method::POST, command) if command.starts_with("/admin/rollout/") => {
            let name = &command["/admin/rollout/".len()..];
            let Some(command) = Command::parse(name) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "no such rollout command; use start, pause, resume, promote or abort",
                );
            };
            let rollout = rollout.clone();
            match tokio::task::spawn_blocking(move || rollout.command(command)).await {
                Ok(Ok(status)) => json_response(StatusCode::OK, status),
                Ok(Err(e)) => rollout_error(&e),
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the rollout command stopped before it completed; read GET /admin/rollout",
                ),
            }
        }
        (_, command) if command.starts_with("/admin/rollout/") => {
            not_allowed("rollout commands need POST", "POST")
        }
        (_, "/admin/routes" | "/admin/explain" | "/healthz" | "/readyz" | "/metrics") => {
            not_allowed("this endpoint is read-only: use GET", "GET")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such endpoint; see GET /admin/routes",
        ),
    }
}

/// The body of an admin write, read within `read_timeout` and [`MAX_BODY`]; else the answer
/// that refuses it.
async fn read_body(
    request: Request<Incoming>,
    read_timeout: Duration,
) -> Result<Bytes, AdminResponse> {
    let reading = Limited::new(request.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(read_timeout, reading).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body over 64 KiB",
        ))),
        Ok(Err(_)) => Err(closing(error(
            StatusCode::BAD_REQUEST,
            "request body unreadable",
        ))),
        Err(_) => {
            let message = format!(
                "request body not received within admin.header_read_timeout ({})",
                crate::duration::format_duration(read_timeout)
            );
            Err(closing(error(StatusCode::REQUEST_TIMEOUT, &message)))
        }
    }
}

/// An admin write as its handler takes it: method, query, `If-Match`, body.
struct Write {
    method: Method,
    query: String,
    if_match: Option<Vec<u64>>,
    body: Bytes,
}

impl Write {
    /// Reads a write request; else the answer that refuses it (a bad `If-Match`, a body too
    /// large or too slow).
    async fn read(
        request: Request<Incoming>,
        read_timeout: Duration,
    ) -> Result<Write, AdminResponse> {
        let if_match = if_match(&request).map_err(|m| error(StatusCode::BAD_REQUEST, m))?;
        let method = request.method().clone();
        let query = request.uri().query().unwrap_or("").to_string();
        let body = read_body(request, read_timeout).await?;
        Ok(Write {
            method,
            query,
            if_match,
            body,
        })
    }

    fn body_is_empty(&self) -> bool {
        self.body.iter().all(u8::is_ascii_whitespace)
    }
}

async fn set_weights(
    control: &Arc<ControlPlane>,
    request: Request<Incoming>,
    read_timeout: Duration,
) -> AdminResponse {
    let write = match Write::read(request, read_timeout).await {
        Ok(write) => write,
        Err(refused) => return refused,
    };
    let parsed = if write.body_is_empty() {
        parse_query_weights(&write.query)
    } else {
        parse_json_weights(&write.body)
    };
    let if_match = write.if_match;
    let changes = match parsed {
        Ok(changes) => changes,
        Err(e) => return control_error(control, &e),
    };
    let applied = control
        .run_blocking(move |control| control.set_weights(&changes, if_match.as_deref()))
        .await;
    match applied {
        Ok(applied) => weights_applied(applied),
        Err(e) => control_error(control, &e),
    }
}

/// `PUT /admin/faults` (the body replaces the faults in force) and `DELETE /admin/faults`
/// (all of them, or `?backend=NAME`'s).
async fn change_faults(
    control: &Arc<ControlPlane>,
    request: Request<Incoming>,
    read_timeout: Duration,
) -> AdminResponse {
    let write = match Write::read(request, read_timeout).await {
        Ok(write) => write,
        Err(refused) => return refused,
    };
    let if_match = write.if_match.clone();
    let applied = if write.method == Method::DELETE {
        if !write.body_is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "DELETE /admin/faults takes no body: it removes every fault, ?backend=NAME \
                 only that backend's; PUT sets a list",
            );
        }
        let backend = match faults_backend_query(&write.query) {
            Ok(backend) => backend,
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        control
            .run_blocking(move |control| {
                control.clear_faults(backend.as_deref(), if_match.as_deref())
            })
            .await
    } else {
        let (faults, read_at) = match fault_json::parse(&write.body) {
            Ok(parsed) => parsed,
            Err(e) => return control_error(control, &e),
        };
        // A body read from GET says the version it was read at: a stale one is refused as a
        // stale `If-Match` is (which, when given, decides).
        let if_match = if_match.or_else(|| read_at.map(|version| vec![version]));
        control
            .run_blocking(move |control| control.set_faults(faults, if_match.as_deref()))
            .await
    };
    match applied {
        Ok(applied) => with_etag(
            json_response(
                StatusCode::OK,
                fault_json::to_json(applied.version, &applied.faults),
            ),
            applied.version,
        ),
        Err(e) => control_error(control, &e),
    }
}

/// `PUT /admin/mirror` (the body's config in force) and `DELETE /admin/mirror` (stopped).
async fn change_mirror(
    control: &Arc<ControlPlane>,
    request: Request<Incoming>,
    read_timeout: Duration,
) -> AdminResponse {
    let write = match Write::read(request, read_timeout).await {
        Ok(write) => write,
        Err(refused) => return refused,
    };
    let if_match = write.if_match.clone();
    let config = if write.method == Method::DELETE {
        if !write.body_is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "DELETE /admin/mirror takes no body; PUT sets mirroring",
            );
        }
        None
    } else {
        match mirror_json::parse(&write.body) {
            Ok(config) => Some(config),
            Err(e) => return control_error(control, &e),
        }
    };
    let applied = control
        .run_blocking(move |control| control.set_mirror(config, if_match.as_deref()))
        .await;
    match applied {
        Ok(version) => {
            let table = control.table().load();
            with_etag(
                json_response(
                    StatusCode::OK,
                    mirror_json::to_json(version, table.mirror.as_deref()),
                ),
                version,
            )
        }
        Err(e) => control_error(control, &e),
    }
}

/// `?backend=NAME` of `DELETE /admin/faults`; nothing else may be asked.
fn faults_backend_query(query: &str) -> Result<Option<String>, String> {
    let mut backend = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("backend", name)) if !name.is_empty() && backend.is_none() => {
                backend = Some(name.to_owned());
            }
            _ => {
                return Err(format!(
                    "unexpected query {pair:?}; DELETE /admin/faults removes every fault, \
                     ?backend=NAME only that backend's"
                ));
            }
        }
    }
    Ok(backend)
}

fn weights_applied(applied: WeightsApplied) -> AdminResponse {
    let weights: Map<String, Value> = applied
        .weights
        .iter()
        .map(|(name, weight)| (name.clone(), json!(weight)))
        .collect();
    let mut body = json!({"weights": weights, "version": applied.version});
    match &applied.persisted {
        _ if applied.shared => {
            body["persisted"] = json!(true);
            body["stored_in"] = json!("etcd");
        }
        Some(Ok(())) => body["persisted"] = json!(true),
        Some(Err(e)) => {
            body["persisted"] = json!(false);
            body["persist_error"] = json!(Chain(e).to_string());
        }
        None => {
            body["persisted"] = json!(false);
            body["persist_error"] = json!("the proxy was started without a config file");
        }
    }
    with_etag(json_response(StatusCode::OK, body), applied.version)
}

/// `?v1=80&v2=20`
fn parse_query_weights(query: &str) -> Result<Vec<(String, u32)>, ControlError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Plain decimal digits: `u32::from_str` would also take a leading `+`.
            let weight = Some(value)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| ControlError::InvalidWeight {
                    backend: name.to_string(),
                    value: format!("{value:?}"),
                })?;
            Ok((name.to_string(), weight))
        })
        .collect()
}

/// `{"v2": 20, "v1": 80}`
fn parse_json_weights(body: &[u8]) -> Result<Vec<(String, u32)>, ControlError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ControlError::MalformedJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(ControlError::MalformedJson(
            "expected an object of backend names to weights".into(),
        ));
    };
    map.into_iter()
        .map(|(name, value)| {
            let weight = value
                .as_u64()
                .filter(|w| *w <= u64::from(MAX_WEIGHT))
                .and_then(|w| u32::try_from(w).ok())
                .ok_or_else(|| ControlError::InvalidWeight {
                    backend: name.clone(),
                    value: value.to_string(),
                })?;
            Ok((name, weight))
        })
        .collect()
}

/// Keeps browsers from driving the API on behalf of a web page (403, before the token is
/// looked at):
/// - every request must be addressed to an IP literal, `localhost` or a name in
///   `admin.allowed_hosts`: DNS rebinding points a name of the attacker's at this listener, so
///   the browser sends that name as `Host`;
/// - a mutation (any method but GET, HEAD, OPTIONS, TRACE) carrying `Origin` must come from
///   this API's own origin (`http://` + `Host`; `Origin: null` is another site), and one
///   carrying `Sec-Fetch-Site` must say `same-origin` or `none`. Without those headers it is
///   not a browser's cross-site request (curl, scripts).
///
/// Also 400 for an HTTP/1.1 request without `Host` or with several (RFC 9112 §3.2).
fn refuse_other_sites(
    request: &Request<Incoming>,
    allowed_hosts: &[String],
) -> Option<AdminResponse> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(host), None) => match host.to_str() {
            Ok(host) => Some(host),
            Err(_) => return Some(error(StatusCode::BAD_REQUEST, "Host is not valid")),
        },
        (Some(_), Some(_)) => {
            return Some(error(StatusCode::BAD_REQUEST, "more than one Host header"));
        }
    };
    if host.is_none() && request.version() >= Version::HTTP_11 {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "HTTP/1.1 requests need a Host header",
        ));
    }
    // An absolute-form target (`POST http://host/...`) names the host as well: both must pass.
    let target = request.uri().authority().map(|a| a.as_str());
    for name in target.into_iter().chain(host) {
        if !host_is_allowed(name, allowed_hosts) {
            let message = format!(
                "Host {name:?} is not allowed here: use an IP address or localhost, or add the \
                 name to admin.allowed_hosts"
            );
            return Some(error(StatusCode::FORBIDDEN, &message));
        }
    }
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if safe {
        return None;
    }
    cross_site(request.headers(), target.or(host)).map(|why| {
        error(
            StatusCode::FORBIDDEN,
            &format!("cross-site request refused: {why}"),
        )
    })
}

/// Whether `host` (a `Host` value, port optional) is an IPv4 or IPv6 literal, `localhost`, or
/// one of `allowed` (lowercase); names compare case-insensitively, a trailing dot ignored.
fn host_is_allowed(host: &str, allowed: &[String]) -> bool {
    let Some(name) = crate::proxy::headers::authority_host(host.as_bytes())
        .and_then(|name| std::str::from_utf8(name).ok())
    else {
        return false;
    };
    // An IPv6 literal (its brackets kept) was checked by `authority_host`.
    if name.starts_with('[') || name.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Why a mutation looks like a browser's request from another origin, if it does. `own` is
/// the host this request was addressed to.
fn cross_site(headers: &http::HeaderMap, own: Option<&str>) -> Option<String> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Some(format!(
                "Sec-Fetch-Site is {site:?}; only this API's own pages may change it"
            ));
        }
    }
    let mut origins = headers.get_all(ORIGIN).iter();
    let origin = origins.next()?;
    if origins.next().is_some() {
        return Some("more than one Origin header".to_string());
    }
    let origin = origin.to_str().unwrap_or("");
    if origin == "null" {
        return Some(
            "Origin is null (a sandboxed page, or a file or data URL is another site)".to_string(),
        );
    }
    let Some(own) = own.map(|host| format!("http://{host}")) else {
        return Some(format!("Origin {origin:?} and no Host to compare it with"));
    };
    if origin.eq_ignore_ascii_case(&own) {
        None
    } else {
        Some(format!(
            "Origin {origin:?} is not this API's own origin ({own})"
        ))
    }
}

/// The token of an `Authorization: Bearer TOKEN` value. The scheme is case-insensitive and
/// may be followed by several spaces (RFC 9110 §11.4); the token is taken as it is.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii_start();
    (!token.is_empty()).then_some(token)
}

/// The table versions `If-Match` accepts (`None`: unconditional), or why the header is
/// unusable. Every `If-Match` line counts, as one list.
fn if_match(request: &Request<Incoming>) -> Result<Option<Vec<u64>>, &'static str> {
    let mut lines = request.headers().get_all(IF_MATCH).iter().peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let mut joined = Vec::new();
    for line in lines {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(line.as_bytes());
    }
    parse_if_match(&joined)
}

/// Parses an `If-Match` field value (RFC 9110 §13.1.1): `*`, or a comma-separated list of
/// entity tags. Our tags are strong, `"VERSION"`, and `If-Match` compares strongly, so a
/// weak tag (`W/"3"`) or a tag this API never issues can match nothing: such tags are left
/// out. `Ok(Some(empty))` therefore means "matches no version".
fn parse_if_match(value: &[u8]) -> Result<Option<Vec<u64>>, &'static str> {
    const MALFORMED: &str =
        "If-Match must be * or a list of entity tags such as \"3\" (as sent in ETag)";
    if value.trim_ascii() == b"*" {
        return Ok(None);
    }
    let mut versions = Vec::new();
    let mut rest = value;
    loop {
        // Skip separators and optional white space; empty list elements are allowed.
        rest = rest.trim_ascii_start();
        while let Some(after) = rest.strip_prefix(b",") {
            rest = after.trim_ascii_start();
        }
        if rest.is_empty() {
            return Ok(Some(versions));
        }
        let (weak, quoted) = match rest.strip_prefix(b"W/") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        let opaque = quoted.strip_prefix(b"\"").ok_or(MALFORMED)?;
        let end = opaque.iter().position(|&b| b == b'"').ok_or(MALFORMED)?;
        let tag = &opaque[..end];
        // etagc: %x21 / %x23-7E / obs-text
        if tag.iter().any(|&b| b < 0x21 || b == 0x7f) {
            return Err(MALFORMED);
        }
        rest = opaque[end + 1..].trim_ascii_start();
        if !rest.is_empty() && !rest.starts_with(b",") {
            return Err(MALFORMED);
        }
        let version = std::str::from_utf8(tag)
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<u64>().ok());
        if let (false, Some(version)) = (weak, version) {
            versions.push(version);
        }
    }
}

fn control_error(control: &ControlPlane, e: &ControlError) -> AdminResponse {
    match e {
        ControlError::Stale { current } | ControlError::LostRace { current } => {
            let body = json!({"error": Chain(e).to_string(), "version": current});
            with_etag(
                json_response(StatusCode::PRECONDITION_FAILED, body),
                *current,
            )
        }
        ControlError::UnknownBackend(_)
        | ControlError::InvalidWeight { .. }
        | ControlError::InvalidFault { .. }
        | ControlError::RepeatedFault(_)
        | ControlError::InvalidMirror { .. }
        | ControlError::AllZero
        | ControlError::NoWeights
        | ControlError::MalformedJson(_)
        | ControlError::NoConfigFile
        | ControlError::Config(_)
        | ControlError::Token(_)
        | ControlError::WouldOpenAdmin { .. }
        | ControlError::Document(_) => {
            let version = control.table().load().version;
            let body = json!({"error": Chain(e).to_string(), "version": version});
            with_etag(json_response(StatusCode::BAD_REQUEST, body), version)
        }
        ControlError::Owned { .. } | ControlError::MirrorOwned { .. } => {
            let version = control.table().load().version;
            let body = json!({"error": Chain(e).to_string(), "version": version});
            with_etag(json_response(StatusCode::CONFLICT, body), version)
        }
        ControlError::StoreUnavailable(_) => {
            let version = control.table().load().version;
            let body = json!({"error": Chain(e).to_string(), "version": version});
            with_etag(
                json_response(StatusCode::SERVICE_UNAVAILABLE, body),
                version,
            )
        }
        ControlError::Interrupted(_) => {
            let version = control.table().load().version;
            let body = json!({"error": Chain(e).to_string(), "version": version});
            with_etag(
                json_response(StatusCode::INTERNAL_SERVER_ERROR, body),
                version,
            )
        }
    }
}

fn rollout_error(e: &RolloutError) -> AdminResponse {
    match e {
        RolloutError::NotConfigured => error(StatusCode::NOT_FOUND, &e.to_string()),
        RolloutError::Conflict(conflict) => json_response(
            StatusCode::CONFLICT,
            json!({"error": e.to_string(), "state": conflict.state.as_str()}),
        ),
        // With a store: etcd down, or another replica's write came first.
        RolloutError::Weights(ControlError::StoreUnavailable(_)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &Chain(e).to_string())
        }
        RolloutError::Weights(ControlError::Stale { .. } | ControlError::LostRace { .. }) => {
            error(StatusCode::PRECONDITION_FAILED, &Chain(e).to_string())
        }
        RolloutError::Weights(_) => error(StatusCode::INTERNAL_SERVER_ERROR, &Chain(e).to_string()),
    }
}

fn weights_json(table: &RoutingTable) -> Value {
    let map: Map<String, Value> = table
        .backends
        .iter()
        .map(|b| (b.name.clone(), json!(b.weight)))
        .collect();
    Value::Object(map)
}

fn routes_json(table: &RoutingTable) -> Value {
    let effective = table.effective_weights();
    let backends: Vec<Value> = table
        .backends
        .iter()
        .zip(&effective)
        .zip(table.configured_bucket_ranges())
        .map(|((b, effective), (start, end))| {
            let endpoints: Vec<Value> = b
                .endpoints
                .iter()
                .map(|e| {
                    let status = e.health.status();
                    json!({
                        "url": e.url(),
                        "healthy": e.is_healthy(),
                        "active_check_up": status.active_up,
                        "ejected": status.ejected,
                        "ejections": status.ejections,
                    })
                })
                .collect();
            let health = b.health.as_ref().map(|h| {
                json!({
                    "path": h.path.as_str(),
                    "interval": crate::duration::format_duration(h.interval),
                    "timeout": crate::duration::format_duration(h.timeout),
                    "unhealthy_threshold": h.unhealthy_threshold,
                    "healthy_threshold": h.healthy_threshold,
                })
            });
            json!({
                "name": b.name,
                "weight": b.weight,
                "effective_weight": effective,
                "healthy": b.is_healthy(),
                "sticky_buckets_configured": [start, end],
                "endpoints": endpoints,
                "health_check": health,
                "fault": b.fault.as_ref().map(|f| fault_json::fault_json(&f.config)),
            })
        })
        .collect();
    let rules: Vec<Value> = table
        .rules
        .iter()
        .enumerate()
        .map(|(n, r)| {
            let mut rule = crate::control::document::rule_json(&r.source, &r.matcher);
            rule["index"] = json!(n);
            rule["backend"] = json!(table.backends[r.backend].name);
            rule
        })
        .collect();
    json!({
        "version": table.version,
        "failing_open": table.is_failing_open(),
        "backends": backends,
        "rules": rules,
        "sticky": {
            "user_id_header": table.sticky.header.as_ref().map(|h| h.as_str()),
            "user_id_cookie": table.sticky.cookie,
            "salt": table.sticky.salt,
            "sticky_cookie": table.sticky.anonymous.as_ref().map(|c| c.name.as_str()),
            "sticky_cookie_max_age": table.sticky.anonymous.as_ref().map(|c| crate::duration::format_duration(c.max_age)),
            "buckets": BUCKETS,
        },
        "request_timeout": crate::duration::format_duration(table.timeouts.request),
        "client_body_timeout": crate::duration::format_duration(table.timeouts.client_body),
        "read_timeout": crate::duration::format_duration(table.timeouts.read),
        "backend_header": table.backend_header.as_ref().map(|h| h.as_str()),
    })
}

/// Where a request like `request` goes and why; `tls`: the proxy's clients come over TLS (the
/// sticky cookie is then `Secure`).
fn explain_json(table: &RoutingTable, request: &Request<Incoming>, tls: bool) -> Value {
    let headers = request.headers();
    let user = table.sticky.user_id(headers);
    let Some(decision) = table.route(headers, &mut rand::rng()) else {
        return json!({"backend": null, "reason": "no backend has a weight above 0", "version": table.version});
    };
    let (user_id, source) = match (user, decision.new_user) {
        (Some((id, source)), _) => (
            Some(String::from_utf8_lossy(id).into_owned()),
            Some(source.as_str()),
        ),
        // What a request like this one gets: a new id, given in the sticky cookie.
        (None, Some(id)) => (
            Some(String::from_utf8_lossy(&crate::id::hex(id)).into_owned()),
            Some("new"),
        ),
        (None, None) => (None, None),
    };
    let mut body = json!({
        "backend": table.backends[decision.backend].name,
        "reason": decision.reason.as_str(),
        "user_id": user_id,
        "user_id_source": source,
        "version": table.version,
    });
    if let Some(set_cookie) = decision
        .new_user
        .and_then(|id| table.sticky.set_cookie(id, tls))
        .and_then(|v| v.to_str().ok().map(str::to_owned))
    {
        body["set_cookie"] = json!(set_cookie);
        body["note"] = json!(
            "a request without a user id gets a new random id in the sticky cookie: this is one draw"
        );
    }
    match decision.reason {
        Reason::Rule(n) => {
            let rule = &table.rules[n];
            body["rule"] = json!(n);
            body["rule_matched"] = crate::control::document::rule_json(&rule.source, &rule.matcher);
        }
        Reason::Sticky(bucket) => body["bucket"] = json!(bucket),
        Reason::Weight | Reason::Fallback => {
            let effective = table.effective_weights();
            let total: u64 = effective.iter().map(|w| u64::from(*w)).sum();
            let odds: Map<String, Value> = table
                .backends
                .iter()
                .zip(&effective)
                .filter(|(_, w)| **w > 0)
                .map(|(b, w)| (b.name.clone(), json!(f64::from(*w) / total.max(1) as f64)))
                .collect();
            body["probabilities"] = Value::Object(odds);
            body["note"] = json!("a weighted pick is random: this is one draw");
        }
    }
    body
}

fn json_response(status: StatusCode, body: Value) -> AdminResponse {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn with_etag(mut response: AdminResponse, version: u64) -> AdminResponse {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(ETAG, value);
    }
    response
}

fn error(status: StatusCode, message: &str) -> AdminResponse {
    json_response(status, json!({"error": message}))
}

/// `response` with `Connection: close`: the rest of the request body was not read.
fn closing(mut response: AdminResponse) -> AdminResponse {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn not_allowed(message: &str, allow: &'static str) -> AdminResponse {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, message);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_weights_parse_or_name_the_bad_value() {
        assert_eq!(
            parse_query_weights("v1=80&v2=20").unwrap(),
            [("v1".to_string(), 80), ("v2".to_string(), 20)]
        );
        assert!(matches!(
            parse_query_weights("v2=-5"),
            Err(ControlError::InvalidWeight { .. })
        ));
        assert!(matches!(
            parse_query_weights("v2=1.5"),
            Err(ControlError::InvalidWeight { .. })
        ));
        assert!(matches!(
            parse_query_weights("v2"),
            Err(ControlError::InvalidWeight { .. })
        ));
        assert!(parse_query_weights("").unwrap().is_empty());
        for bad in ["v2=+5", "v2= 5", "v2=5 ", "v2=", "v2=%205", "v2=4294967296"] {
            assert!(
                matches!(
                    parse_query_weights(bad),
                    Err(ControlError::InvalidWeight { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse_query_weights("v2=007").unwrap(),
            [("v2".to_string(), 7)]
        );
    }

    #[test]
    fn hosts_are_ip_literals_localhost_or_allowed_names() {
        let allowed = ["canary.internal".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9901",
            "[2001:db8::7]:9901",
            "localhost",
            "LocalHost:9901",
            "localhost.",
            "canary.internal",
            "Canary.Internal:9901",
            "canary.internal.:1",
        ] {
            assert!(host_is_allowed(ok, &allowed), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "canary.internal.evil.example",
            "127.0.0.1.nip.io",
            "127.1",
            "[::1",
            "[localhost]",
            "::1",
            "localhost:x",
            "localhost:9901:1",
            "user@localhost",
            "",
        ] {
            assert!(!host_is_allowed(refused, &allowed), "{refused}");
        }
        assert!(!host_is_allowed("canary.internal", &[]));
    }

    #[test]
    fn mutations_from_other_origins_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (k, v) in pairs {
                map.append(*k, HeaderValue::from_static(v));
            }
            map
        };
        let own = Some("127.0.0.1:9901");
        for ok in [
            &[][..],
            &[("origin", "http://127.0.0.1:9901")],
            &[("origin", "HTTP://127.0.0.1:9901")],
            &[("sec-fetch-site", "same-origin")],
            &[("sec-fetch-site", "none")],
            &[
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://127.0.0.1:9901"),
            ],
        ] {
            assert_eq!(cross_site(&headers(ok), own), None, "{ok:?}");
        }
        for refused in [
            &[("origin", "http://evil.example")][..],
            &[("origin", "null")],
            &[("origin", "http://127.0.0.1:8080")],
            &[("origin", "https://127.0.0.1:9901")],
            &[("origin", "http://127.0.0.1:9901/")],
            &[("sec-fetch-site", "cross-site")],
            &[("sec-fetch-site", "same-site")],
            &[("sec-fetch-site", "")],
            &[
                ("origin", "http://127.0.0.1:9901"),
                ("origin", "http://evil.example"),
            ],
        ] {
            assert!(cross_site(&headers(refused), own).is_some(), "{refused:?}");
        }
        assert!(cross_site(&headers(&[("origin", "http://localhost")]), None).is_some());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER   abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer aBc"), Some(&b"aBc"[..]));
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearerabc",
            b"abc",
            b"",
        ] {
            assert_eq!(
                bearer_token(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn if_match_lists_weak_tags_and_star() {
        let parse = |v: &str| parse_if_match(v.as_bytes());
        assert_eq!(parse("*"), Ok(None));
        assert_eq!(parse(" * "), Ok(None));
        assert_eq!(parse(r#""3""#), Ok(Some(vec![3])));
        assert_eq!(parse(r#""2", "3""#), Ok(Some(vec![2, 3])));
        assert_eq!(parse(r#" ,"2",,"3" ,"#), Ok(Some(vec![2, 3])));
        // Weak and foreign tags are valid syntax that can never match.
        assert_eq!(parse(r#"W/"3""#), Ok(Some(vec![])));
        assert_eq!(parse(r#"W/"3", "4""#), Ok(Some(vec![4])));
        assert_eq!(parse(r#""abc", "+3", """#), Ok(Some(vec![])));
        for bad in [
            "3",
            r#""3"#,
            r#""3" "4""#,
            r#""3";"4""#,
            r#"w/"3""#,
            r#"*, "3""#,
            "\"a b\"",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_weights_parse_or_name_the_bad_value() {
        assert_eq!(
            parse_json_weights(br#"{"v2":20}"#).unwrap(),
            [("v2".to_string(), 20)]
        );
        for bad in [
            r#"{"v2":-1}"#,
            r#"{"v2":2.5}"#,
            r#"{"v2":"20"}"#,
            r#"{"v2":null}"#,
            r#"{"v2":1000001}"#,
        ] {
            assert!(
                matches!(
                    parse_json_weights(bad.as_bytes()),
                    Err(ControlError::InvalidWeight { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_json_weights(b"{"),
            Err(ControlError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_json_weights(b"[1,2]"),
            Err(ControlError::MalformedJson(_))
        ));
    }
}
