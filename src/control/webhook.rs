//! The rollout's webhook: each transition is POSTed as JSON to `[rollout] webhook`, best
//! effort. A failure (no connection, no answer within [`TIMEOUT`], a status other than 2xx) is
//! logged and counted in `canary_rollout_webhook_failures_total`; it never holds the rollout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::metrics::Metrics;

/// How long the webhook may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Posts `body` to `url` on a task of its own (on the current runtime; without one, nothing
/// is sent).
pub fn post(url: Uri, body: Value, metrics: Arc<Metrics>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%url, %error, "rollout webhook: cannot build the request");
                metrics.rollout.webhook_failed();
                return;
            }
        };
        let failure = match tokio::time::timeout(TIMEOUT, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => return,
            Ok(Ok(response)) => format!("answered {}", response.status()),
            Ok(Err(error)) => crate::chain::Chain(&error).to_string(),
            Err(_) => format!("no answer within {TIMEOUT:?}"),
        };
        tracing::warn!(%url, failure, "rollout webhook failed; the rollout goes on");
        metrics.rollout.webhook_failed();
    });
}
