//! Proxying over an HTTP/1 client connection, plain or TLS (as Pingora's `proxy_h1`): for each
//! request the
//! session reads, check its target, Host and framing, answer `Expect`, forward it through the
//! [`Proxy`] while watching for the client going away, write the response, and after a
//! WebSocket switch tunnel the two connections.
//!
//! Every refusal is counted (backend `none`), answered with the request id when there is a
//! head, and closes the connection; CONNECT is one (405).

use std::future::poll_fn;
use std::time::Duration;

use bytes::Bytes;
use http::header::{EXPECT, TE};
use http::{Method, Request, StatusCode, Version};
use http_body_util::Either;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::{ClientInfo, Proxy, headers};
use crate::http1::head::{
    Framing, FramingError, Present, RequestHead, has_token, keeps_alive, request_framing,
};
use crate::http1::server::{NextRequest, ResponseMode, ServerSession};
use crate::stream::ClientStream;
use crate::upstream::{ForwardBody, UpstreamStream};

/// Serves HTTP/1 requests on `stream` until the client closes, an error or a refusal closes
/// it, the drain ends it between requests, or it is switched to a tunnel. Each request head
/// must arrive within `header_read_timeout`; a write to the client may wait at most
/// `send_timeout` for the client to read.
///
/// Between requests the connection's task holds little: the session, and this loop waiting
/// for a head. Everything a request needs (its exchange, writing its response) lives in a
/// future allocated for that request.
pub async fn serve(
    stream: ClientStream,
    client: &ClientInfo,
    proxy: &Proxy,
    header_read_timeout: Duration,
    send_timeout: Duration,
    drain: &mut watch::Receiver<()>,
) {
    let mut session = ServerSession::new(stream, header_read_timeout, send_timeout);
    loop {
        let head = match session.read_head(drain).await {
            NextRequest::Request(head) => head,
            NextRequest::Done => return,
            NextRequest::Refused(error) => {
                proxy.count_refusal(error.status());
                Box::pin(session.refuse(error.status(), None)).await;
                return;
            }
        };
        // Allocated first and then written: the future (4,088 bytes in a release build) is
        // built in place rather than built on the stack and copied. Past 4 KiB its
        // allocation leaves mimalloc's fast path: +400 instructions per request (callgrind),
        // so what only some requests need (a TLS handshake) is boxed where it is awaited.
        let served = Box::into_pin(Box::write(
            Box::new_uninit(),
            serve_request(&mut session, head, client, proxy, drain),
        ));
        match served.await {
            After::Next => {}
            After::Close => return,
            After::Switched(upstream, from_upstream) => {
                if let Some((client, from_client)) = session.into_upgraded() {
                    spawn_tunnel(proxy, client, from_client, upstream, from_upstream);
                }
                return;
            }
        }
    }
}

/// What follows a request on its connection.
enum After {
    /// The next request.
    Next,
    /// Nothing: the connection is closed (or closes when the session is dropped).
    Close,
    /// A tunnel to this upstream connection, which sent these bytes past its 101.
    Switched(UpstreamStream, Bytes),
}

/// Checks a request, forwards it through the proxy (watching for the client going away),
/// and writes the response.
async fn serve_request(
    session: &mut ServerSession,
    mut head: RequestHead,
    client: &ClientInfo,
    proxy: &Proxy,
    drain: &mut watch::Receiver<()>,
) -> After {
    let framing = match check_head(&mut head) {
        Ok(Checked {
            framing,
            send_continue,
        }) => {
            if send_continue && session.write_continue().await.is_err() {
                return After::Close;
            }
            framing
        }
        Err(status) => {
            proxy.count_refusal(status);
            let id = headers::request_id(&head.headers);
            session
                .refuse(status, Some((&headers::X_REQUEST_ID, &id)))
                .await;
            return After::Close;
        }
    };
    let mode = ResponseMode {
        head_request: head.method == Method::HEAD,
        version: head.version,
        close: !keeps_alive(head.version, head.present, &head.headers),
        trailers: head.present.may_have(Present::TE) && has_token(&head.headers, &TE, b"trailers"),
    };
    let websocket = head.version == Version::HTTP_11
        && head.present.may_have(Present::UPGRADE)
        && headers::is_websocket_upgrade(&head.headers);
    let body = match session.request_body(framing) {
        Some(body) => ForwardBody::Client(body),
        None => ForwardBody::Empty,
    };
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.uri;
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers;

    let client_gone = poll_fn(|cx| session.poll_client_gone(cx));
    let Some(mut response) = proxy.handle(request, client, client_gone).await else {
        // The client went away: so does the exchange (and its upstream connection).
        return After::Close;
    };

    if websocket && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = match response.body_mut() {
            Either::Left(body) => body.take_upgraded(),
            Either::Right(_) => None,
        };
        return match (session.write_response(response, mode).await, upstream) {
            (Ok(_), Some((upstream, early))) => After::Switched(upstream, early),
            _ => After::Close,
        };
    }

    // The request body, if there was one, is usually read to its end by now. If not (the
    // upstream answered before it had it all, or it failed), the connection cannot carry
    // another request: the response says so.
    let unread = !session.body_complete();
    let mode = ResponseMode {
        close: mode.close || unread || drain.has_changed().unwrap_or(true),
        ..mode
    };
    match session.write_response(response, mode).await {
        Ok(false) => After::Next,
        Ok(true) => {
            let unread = !session.body_complete();
            session.close(unread).await;
            After::Close
        }
        Err(_) => After::Close,
    }
}

/// A request head the proxy takes, and how its body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub framing: Framing,
    /// `Expect: 100-continue` on a request with a body: the client waits for `100 Continue`.
    pub send_continue: bool,
}

/// What the proxy makes of a request head before it forwards it, or the status it refuses it
/// with: CONNECT (405); the target and Host ([`headers::settle_host`], 400; `Host` becomes
/// the one the request goes on with); the body's framing (400, 501); `Expect` (removed;
/// 417 for an expectation other than `100-continue`, ignored in HTTP/1.0, RFC 9110 §10.1.1).
pub fn check_head(head: &mut RequestHead) -> Result<Checked, StatusCode> {
    if head.method == Method::CONNECT {
        // A tunnel to anywhere is no reverse proxy's business; what follows the request
        // would be tunnel bytes, never read as requests.
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    headers::settle_host(&head.method, &head.uri, &mut head.headers, head.version)
        .map_err(|error| StatusCode::from(&error))?;
    let framing = request_framing(head.version, head.present, &mut head.headers)
        .map_err(FramingError::status)?;
    let mut send_continue = false;
    if head.present.may_have(Present::EXPECT)
        && let Some(expect) = head.headers.remove(EXPECT)
        && head.version == Version::HTTP_11
    {
        // An empty field is an empty list: no expectation.
        let expect = expect.as_bytes().trim_ascii();
        if !expect.is_empty() && !expect.eq_ignore_ascii_case(b"100-continue") {
            return Err(StatusCode::EXPECTATION_FAILED);
        }
        send_continue = !expect.is_empty() && !framing.is_end();
    }
    Ok(Checked {
        framing,
        send_continue,
    })
}

/// Copies bytes both ways between the client connection and the upstream connection that
/// switched protocols (first what each sent past the switch) until either side closes, or
/// the proxy's shutdown ends it. It runs on its own: the drain does not wait for tunnels.
fn spawn_tunnel(
    proxy: &Proxy,
    mut client: ClientStream,
    from_client: Bytes,
    mut upstream: UpstreamStream,
    from_upstream: Bytes,
) {
    let shutdown = proxy.shutdown_token();
    tokio::spawn(async move {
        let run = async {
            if !from_client.is_empty() {
                upstream.write_all(&from_client).await?;
            }
            if !from_upstream.is_empty() {
                client.write_all(&from_upstream).await?;
            }
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        };
        tokio::select! {
            ended = run => if let Err(error) = ended {
                tracing::debug!(%error, "tunnel closed with an error");
            },
            () = shutdown.cancelled() => {}
        }
    });
}
