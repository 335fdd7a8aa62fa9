//! The routing decision, and the rollout's measurement of the answer, allocate nothing:
//! counted with dhat's allocator in testing mode. (One test per binary: dhat allows one
//! profiler per process.)

use std::hint::black_box;
use std::time::Duration;

use canary_proxy::{Metrics, RoutingTable};
use http::{HeaderMap, HeaderValue, StatusCode};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The same table the hot-path bench measures.
const CONFIG: &str = include_str!("fixtures/hot_path.toml");

#[test]
fn routing_decisions_and_rollout_measurements_do_not_allocate() {
    let config = canary_proxy::config::parse(CONFIG, "alloc.toml").unwrap();
    let table = RoutingTable::from_config(&config, 1, None, &Metrics::new());
    assert!(table.backends.iter().all(|b| b.meter.is_some()));
    let requests: Vec<HeaderMap> = [
        vec![("host", "shop.example")],
        vec![
            ("host", "shop.example"),
            ("x-user-id", "7d3c9b2e-4f1a-4e7b-9a51"),
        ],
        vec![
            ("host", "shop.example"),
            ("cookie", "session=abc; uid=u-48213; beta=no"),
        ],
        vec![("host", "shop.example"), ("cookie", "beta=yes")],
        vec![("host", "shop.example"), ("x-canary", "always")],
    ]
    .into_iter()
    .map(|pairs| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k, HeaderValue::from_static(v));
        }
        h
    })
    .collect();
    let mut rng = rand::rng();
    // Warm up lazily initialised state (the thread's RNG, the regex's cache).
    for headers in &requests {
        black_box(table.route(headers, &mut rng));
    }
    // dhat writes its profile when the profiler drops; keep it out of the work tree.
    let _profiler = dhat::Profiler::builder()
        .testing()
        .file_name(std::env::temp_dir().join("canary-proxy-dhat-heap.json"))
        .build();
    let before = dhat::HeapStats::get();
    for _ in 0..1000 {
        for headers in &requests {
            let decision = table.route(black_box(headers), &mut rng).unwrap();
            let backend = &table.backends[decision.backend];
            black_box(&backend.endpoints[decision.endpoint]);
            if let Some(meter) = &backend.meter {
                meter.record(StatusCode::OK, black_box(Duration::from_micros(1234)));
            }
        }
    }
    let after = dhat::HeapStats::get();
    dhat::assert_eq!(after.total_blocks - before.total_blocks, 0);
}
