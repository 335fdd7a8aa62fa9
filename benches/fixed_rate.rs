//! An open-loop load generator for latency at a fixed request rate (wrk has none): request i
//! is due at `start + i / rate` whatever happened to the ones before, goes out on connection
//! `i % conns` (HTTP/1.1 keep-alive, one request at a time per connection, as wrk2 does),
//! and its latency runs from when it was due when its connection was still busy, so a proxy
//! that stalls is charged for the requests it delayed (no coordinated omission).
//!
//! ```sh
//! cargo bench --bench fixed_rate -- URL RATE SECONDS CONNS
//! ```
//!
//! Prints one JSON line: requests sent and answered (2xx), errors, p50/p90/p99/p99.9/max in
//! milliseconds. `benches/mirror_p99.py` runs it; it can run alone against any URL.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Args {
    url: http::Uri,
    rate: f64,
    seconds: f64,
    conns: usize,
}

fn args() -> Result<Args, String> {
    // `cargo bench` passes `--bench`; positional arguments are ours.
    let given: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [url, rate, seconds, conns] = given.as_slice() else {
        return Err("usage: fixed_rate URL RATE SECONDS CONNS".to_owned());
    };
    let number = |text: &str, what: &str| {
        text.parse::<f64>()
            .ok()
            .filter(|n| *n > 0.0)
            .ok_or(format!("{what} must be a positive number, got {text:?}"))
    };
    Ok(Args {
        url: url.parse().map_err(|e| format!("{url:?}: {e}"))?,
        rate: number(rate, "RATE")?,
        seconds: number(seconds, "SECONDS")?,
        conns: number(conns, "CONNS")? as usize,
    })
}

/// One connection's share of the schedule: requests `first`, `first + conns`, ... due at
/// `start + i / rate`. Returns the latencies (from due time to the whole answer) of the
/// answered ones and the count of failed ones.
async fn connection(
    args: &Args,
    first: usize,
    total: usize,
    start: Instant,
) -> Result<(Vec<Duration>, usize), String> {
    let authority = args
        .url
        .authority()
        .ok_or("the URL needs host:port")?
        .clone();
    let stream = TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = args
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for i in (first..total).step_by(args.conns) {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate);
        // Latency runs from when the request was due, or, when this connection was idle
        // before then, from when the timer woke it (a timer wakes up to 1 ms late: not the
        // proxy's doing).
        let begin = if Instant::now() < due {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        let request = Request::get(path.as_str())
            .header("host", authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let answered = match sender.send_request(request).await {
            Ok(response) if response.status().is_success() => {
                response.into_body().collect().await.is_ok()
            }
            _ => false,
        };
        if answered {
            latencies.push(begin.elapsed());
        } else {
            errors += 1;
            if sender.ready().await.is_err() {
                return Ok((latencies, errors + (total - i) / args.conns));
            }
        }
    }
    Ok((latencies, errors))
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("fixed_rate: {error}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let total = (args.rate * args.seconds) as usize;
    let outcome = runtime.block_on(async {
        let start = Instant::now() + Duration::from_millis(100);
        let shares = (0..args.conns).map(|c| connection(&args, c, total, start));
        futures_util::future::join_all(shares).await
    });
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    for share in outcome {
        match share {
            Ok((mine, failed)) => {
                latencies.extend(mine);
                errors += failed;
            }
            Err(error) => {
                eprintln!("fixed_rate: {error}");
                std::process::exit(1);
            }
        }
    }
    latencies.sort_unstable();
    println!(
        "{{\"sent\": {total}, \"answered\": {}, \"errors\": {errors}, \"p50_ms\": {:.3}, \
         \"p90_ms\": {:.3}, \"p99_ms\": {:.3}, \"p999_ms\": {:.3}, \"max_ms\": {:.3}}}",
        latencies.len(),
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.90),
        quantile(&latencies, 0.99),
        quantile(&latencies, 0.999),
        latencies
            .last()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
    );
}
