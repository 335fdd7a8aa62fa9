//! The per-request hot path: the routing decision (rules, sticky bucket, weighted pick), the
//! request header rewrite, and the rollout's measurement of each answer. Target: a routing decision under 100 ns with no heap allocation.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use canary_proxy::RoutingTable;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};

/// The same table `tests/alloc.rs` checks for allocations.
const CONFIG: &str = include_str!("../tests/fixtures/hot_path.toml");

/// Headers of a typical browser request.
fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("shop.example.com"));
    h.insert(
        "user-agent",
        HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"),
    );
    h.insert(
        "accept",
        HeaderValue::from_static("text/html,application/xhtml+xml"),
    );
    h.insert(
        "accept-encoding",
        HeaderValue::from_static("gzip, deflate, br"),
    );
    h.insert(
        "cookie",
        HeaderValue::from_static("session=abc123; theme=dark"),
    );
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h
}

fn routing(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let config = canary_proxy::config::parse(CONFIG, "bench.toml").unwrap();
    let table = RoutingTable::from_config(&config, 1, None, &canary_proxy::Metrics::new());
    let mut rng = rand::rng();

    let plain = browser_headers();
    c.bench_function("route/weighted (2 rules miss)", |b| {
        b.iter(|| black_box(table.route(black_box(&plain), &mut rng)))
    });

    let mut sticky = browser_headers();
    sticky.insert(
        "x-user-id",
        HeaderValue::from_static("7d3c9b2e-4f1a-4e7b-9a51-2c8e0f6d1b44"),
    );
    c.bench_function("route/sticky header (2 rules miss)", |b| {
        b.iter(|| black_box(table.route(black_box(&sticky), &mut rng)))
    });

    let mut cookie = browser_headers();
    cookie.insert(
        "cookie",
        HeaderValue::from_static("session=abc123; uid=u-48213; theme=dark"),
    );
    c.bench_function("route/sticky cookie (2 rules miss)", |b| {
        b.iter(|| black_box(table.route(black_box(&cookie), &mut rng)))
    });

    let mut ruled = browser_headers();
    ruled.insert("x-canary", HeaderValue::from_static("always"));
    c.bench_function("route/rule match", |b| {
        b.iter(|| black_box(table.route(black_box(&ruled), &mut rng)))
    });
}

fn header_rewrite(c: &mut Criterion) {
    let client = canary_proxy::client_ip_value(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)));
    let host = HeaderValue::from_static("shop.example.com");
    c.bench_function("rewrite/request headers", |b| {
        b.iter_batched(
            browser_headers,
            |mut headers| {
                canary_proxy::strip_hop_by_hop(&mut headers);
                canary_proxy::add_forwarded(&mut headers, &client, Some(&host), false);
                let id = canary_proxy::request_id(&headers);
                headers.insert("x-request-id", id);
                headers
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// The target and Host check every request gets (`settle_host`), on a typical origin-form
/// request; the proxy's own HTTP/1.1 path runs it twice (when framing the head, then when
/// forwarding).
fn host_check(c: &mut Criterion) {
    let uri = http::Uri::from_static("/products/42?ref=home");
    let mut headers = browser_headers();
    c.bench_function("rewrite/settle host", |b| {
        b.iter(|| {
            black_box(canary_proxy::settle_host(
                &http::Method::GET,
                black_box(&uri),
                &mut headers,
                http::Version::HTTP_11,
            ))
        })
    });
}

/// What a configured rollout adds to each answered request of its two backends: one
/// measurement (request, error, latency bucket) into the worker's counters.
fn rollout_measurement(c: &mut Criterion) {
    let config = canary_proxy::config::parse(CONFIG, "bench.toml").unwrap();
    let table = RoutingTable::from_config(&config, 1, None, &canary_proxy::Metrics::new());
    let meter = table.backends[0]
        .meter
        .clone()
        .expect("the bench table has a rollout");
    c.bench_function("rollout/record an answer", |b| {
        b.iter(|| {
            meter.record(
                black_box(http::StatusCode::OK),
                black_box(std::time::Duration::from_micros(1834)),
            )
        })
    });
}

criterion_group!(
    benches,
    routing,
    header_rewrite,
    host_check,
    rollout_measurement
);
criterion_main!(benches);
