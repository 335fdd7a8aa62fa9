//! Routing over real TCP: the weighted split, each rule kind, sticky buckets against an
//! independent FNV-1a, and the monotone ramp as the canary's weight rises.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;

async fn served_by(client: &reqwest::Client, request: reqwest::RequestBuilder) -> String {
    let _ = client;
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let header = response.headers()["x-canary-backend"]
        .to_str()
        .unwrap()
        .to_string();
    let served = response.headers()["x-served-by"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        header, served,
        "x-canary-backend names the backend that served"
    );
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_within_tolerance() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        "",
    ))
    .await;
    let client = client();
    let total = 4000;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let mut v2 = 0;
            for _ in 0..total / 8 {
                if served_by(&client, client.get(&url)).await == "v2" {
                    v2 += 1;
                }
            }
            v2
        }));
    }
    let mut on_v2 = 0;
    for task in tasks {
        on_v2 += task.await.unwrap();
    }
    let share = on_v2 as f64 / total as f64;
    // Binomial sd at p=0.1, n=4000 is 0.47%; 2% is more than 4 sd.
    assert!((share - 0.10).abs() < 0.02, "v2 share {share}");
    assert_eq!(v1.hits() + v2.hits(), total);
}

#[tokio::test]
async fn each_rule_kind_pins_its_backend_even_at_weight_zero() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let rules = r#"
[[rule]]
header = "x-canary"
equals = "always"
backend = "v2"
[[rule]]
header = "x-client-version"
matches = "^2\\."
backend = "v2"
[[rule]]
cookie = "beta"
present = true
backend = "v2"
[[rule]]
cookie = "group"
equals = "testers"
backend = "v2"
"#;
    let mut text = config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    );
    text.push_str(rules);
    let proxy = start_proxy(&text).await;
    let c = client();
    let url = proxy.url("/");
    let cases: Vec<(&str, &str, &str)> = vec![
        ("x-canary", "always", "v2"),
        ("x-canary", "sometimes", "v1"),
        ("x-client-version", "2.4.1", "v2"),
        ("x-client-version", "12.0", "v1"),
        ("cookie", "beta=", "v2"),
        ("cookie", "a=1; beta=yes", "v2"),
        ("cookie", "betamax=1", "v1"),
        ("cookie", "group=testers", "v2"),
        ("cookie", "group=others", "v1"),
    ];
    for (name, value, expected) in cases {
        for _ in 0..5 {
            let served = served_by(&c, c.get(&url).header(name, value)).await;
            assert_eq!(served, expected, "{name}: {value}");
        }
    }
    for _ in 0..20 {
        assert_eq!(served_by(&c, c.get(&url)).await, "v1");
    }
}

#[tokio::test]
async fn sticky_users_land_on_the_bucket_owner_by_the_published_formula() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 70), ("v2", vec![v2.url()], 30)],
        "sticky_salt = \"checkout:\"",
    ))
    .await;
    let c = client();
    let url = proxy.url("/");
    for i in 0..300 {
        let user = format!("user-{i}");
        // T = 100: v1 owns [0, 7000), v2 owns [7000, 10000).
        let expected = if reference_bucket("checkout:", &user) < 7000 {
            "v1"
        } else {
            "v2"
        };
        let by_header = served_by(&c, c.get(&url).header("x-user-id", &user)).await;
        let by_cookie = served_by(&c, c.get(&url).header("cookie", format!("uid={user}"))).await;
        assert_eq!(by_header, expected, "{user}");
        assert_eq!(by_cookie, expected, "{user}");
    }
    // The header wins over the cookie.
    let (a, b) = ("user-1", "user-2");
    let header_choice = served_by(&c, c.get(&url).header("x-user-id", a)).await;
    let both = served_by(
        &c,
        c.get(&url)
            .header("x-user-id", a)
            .header("cookie", format!("uid={b}")),
    )
    .await;
    assert_eq!(both, header_choice);
}

#[tokio::test]
async fn raising_the_canary_weight_only_moves_users_onto_the_canary() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    ))
    .await;
    let c = client();
    let url = proxy.url("/");
    let users: Vec<String> = (0..400).map(|i| format!("u{i}")).collect();
    let mut previous: HashMap<String, String> = HashMap::new();
    let mut last_share = -1.0;
    for canary in [0u32, 5, 10, 25, 50, 75, 100] {
        let table = proxy.table.load_full();
        let next = table.with_weights(&[(0, 100 - canary), (1, canary)], table.version + 1);
        proxy.table.store(Arc::new(next));
        let mut on_canary = 0;
        for user in &users {
            let served = served_by(&c, c.get(&url).header("x-user-id", user)).await;
            if let Some(before) = previous.get(user) {
                assert!(
                    !(before == "v2" && served == "v1"),
                    "{user} moved back at {canary}%"
                );
            }
            on_canary += usize::from(served == "v2");
            previous.insert(user.clone(), served);
        }
        let share = on_canary as f64 / users.len() as f64;
        assert!(
            share >= last_share,
            "share fell from {last_share} to {share}"
        );
        assert!(
            (share - canary as f64 / 100.0).abs() < 0.08,
            "{canary}%: {share}"
        );
        last_share = share;
    }
}

#[tokio::test]
async fn endpoints_of_a_backend_are_used_in_turn() {
    let (a, b) = (upstream("v1-a").await, upstream("v1-b").await);
    let proxy = start_proxy(&config(&[("v1", vec![a.url(), b.url()], 1)], "")).await;
    let c = client();
    for _ in 0..100 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.headers()["x-canary-backend"], "v1");
    }
    assert_eq!((a.hits(), b.hits()), (50, 50));
}

#[tokio::test]
async fn a_host_rule_sees_the_host_the_request_is_forwarded_with() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let mut text = config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    );
    text.push_str("[[rule]]\nheader = \"host\"\nequals = \"canary.example\"\nbackend = \"v2\"\n");
    let proxy = start_proxy(&text).await;
    let backend_of = |answer: &str| {
        answer
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-canary-backend: ")
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    // The absolute-form target names the host; Host says another. The rule, like the
    // upstream, goes by the target's.
    for (request, expected) in [
        (
            "GET http://canary.example/ HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n",
            "v2",
        ),
        (
            "GET http://www.example/ HTTP/1.1\r\nHost: canary.example\r\nConnection: close\r\n\r\n",
            "v1",
        ),
        (
            "GET / HTTP/1.1\r\nHost: canary.example\r\nConnection: close\r\n\r\n",
            "v2",
        ),
    ] {
        let answer = raw_exchange(
            proxy.addr,
            request.as_bytes(),
            std::time::Duration::from_secs(2),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{request:?}: {answer}");
        assert_eq!(backend_of(&answer), expected, "{request:?}: {answer}");
    }
}

/// A browser-like client: its own cookie jar, no environment proxy.
fn visitor() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .cookie_store(true)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Which backend served a request, and the `Set-Cookie` of its response (if any).
async fn visit(request: reqwest::RequestBuilder) -> (String, Option<String>) {
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    let served = response.headers()["x-served-by"]
        .to_str()
        .unwrap()
        .to_string();
    (served, set_cookie)
}

const STICKY_COOKIE: &str = "sticky_cookie = \"canary_uid\"";

/// Each of `visitors` makes `requests` requests (8 visitors at a time); returns the backend
/// each was served by, after checking that it was the same for all its requests and that only
/// a visitor's first request ever got a cookie.
async fn visit_all(visitors: &[reqwest::Client], url: &str, requests: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for chunk in visitors.chunks(visitors.len().div_ceil(8)) {
        let chunk = chunk.to_vec();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut served_by = Vec::new();
            for client in &chunk {
                let (first, _) = visit(client.get(&url)).await;
                for _ in 1..requests {
                    let (next, set_cookie) = visit(client.get(&url)).await;
                    assert_eq!(next, first, "a visitor changed version");
                    assert_eq!(set_cookie, None, "a visitor with the cookie got another");
                }
                served_by.push(first);
            }
            served_by
        }));
    }
    let mut served_by = Vec::new();
    for task in tasks {
        served_by.extend(task.await.unwrap());
    }
    served_by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_visitors_keep_their_version_and_only_move_onto_a_rising_canary() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        STICKY_COOKIE,
    ))
    .await;
    let url = proxy.url("/");

    // The first answer gives the id, with the contract's attributes.
    let one = visitor();
    let (_, set_cookie) = visit(one.get(&url)).await;
    let set_cookie = set_cookie.expect("an anonymous visitor gets a cookie");
    let (pair, attributes) = set_cookie.split_once("; ").unwrap();
    let id = pair.strip_prefix("canary_uid=").unwrap();
    assert_eq!(id.len(), 32, "{set_cookie}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{set_cookie}");
    assert_eq!(
        attributes,
        "Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
    );

    let visitors: Vec<reqwest::Client> = (0..500).map(|_| visitor()).collect();
    let before = visit_all(&visitors, &url, 4).await;
    let on_v2 = before.iter().filter(|b| *b == "v2").count();
    // Binomial(500, 0.1): mean 50, sd 6.7; 25..=80 is beyond 3.7 sd on either side.
    assert!((25..=80).contains(&on_v2), "{on_v2} of 500 on v2 at 10%");

    let c = client();
    let raised = c
        .post(proxy.admin("/admin/weight?v1=70&v2=30"))
        .send()
        .await
        .unwrap();
    assert_eq!(raised.status(), 200);
    let after = visit_all(&visitors, &url, 2).await;
    for (was, is) in before.iter().zip(&after) {
        assert!(!(was == "v2" && is == "v1"), "a visitor moved back to v1");
    }
    let on_v2 = after.iter().filter(|b| *b == "v2").count();
    assert!(on_v2 > before.iter().filter(|b| *b == "v2").count());
    // Binomial(500, 0.3): mean 150, sd 10.2.
    assert!((110..=190).contains(&on_v2), "{on_v2} of 500 on v2 at 30%");
}

#[tokio::test]
async fn pinned_requests_and_known_users_get_no_cookie() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let rule = "\n[[rule]]\nheader = \"x-canary\"\nequals = \"always\"\nbackend = \"v2\"\n";
    let mut text = config(
        &[("v1", vec![v1.url()], 50), ("v2", vec![v2.url()], 50)],
        STICKY_COOKIE,
    );
    text.push_str(rule);
    let proxy = start_proxy(&text).await;
    let url = proxy.url("/");
    let c = visitor();
    for _ in 0..20 {
        let (served, set_cookie) = visit(c.get(&url).header("x-canary", "always")).await;
        assert_eq!((served.as_str(), set_cookie), ("v2", None), "rule-pinned");
        let (_, set_cookie) = visit(c.get(&url).header("x-user-id", "alice")).await;
        assert_eq!(set_cookie, None, "a user id header");
        let (_, set_cookie) = visit(c.get(&url).header("cookie", "uid=bob")).await;
        assert_eq!(set_cookie, None, "a user id cookie");
    }
    // The user id header and cookie come before the sticky cookie.
    let id = "0123456789abcdef0123456789abcdef";
    for user in ["alice", "bob", "carol", "dave"] {
        let expected = if reference_bucket("", user) < 5000 {
            "v1"
        } else {
            "v2"
        };
        let request = c
            .get(&url)
            .header("x-user-id", user)
            .header("cookie", format!("canary_uid={id}"));
        assert_eq!(visit(request).await.0, expected, "{user}");
    }
    // A client that sends the sticky cookie is bucketed by it, by the published formula.
    let expected = if reference_bucket("", id) < 5000 {
        "v1"
    } else {
        "v2"
    };
    for _ in 0..10 {
        let request = client()
            .get(&url)
            .header("cookie", format!("a=1; canary_uid={id}"));
        let (served, set_cookie) = visit(request).await;
        assert_eq!((served.as_str(), set_cookie), (expected, None));
    }
}

#[tokio::test]
async fn explain_names_where_the_user_id_came_from() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        STICKY_COOKIE,
    ))
    .await;
    let c = client();
    let explain = |request: reqwest::RequestBuilder| async move {
        let text = request.send().await.unwrap().text().await.unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let url = proxy.admin("/admin/explain");
    let by_header = explain(c.get(&url).header("x-user-id", "alice")).await;
    assert_eq!(by_header["user_id_source"], "header");
    assert_eq!(by_header["user_id"], "alice");
    let by_cookie = explain(c.get(&url).header("cookie", "canary_uid=abc; uid=bob")).await;
    assert_eq!(by_cookie["user_id_source"], "cookie");
    assert_eq!(by_cookie["user_id"], "bob");
    let by_sticky = explain(c.get(&url).header("cookie", "canary_uid=abc")).await;
    assert_eq!(by_sticky["user_id_source"], "sticky_cookie");
    assert_eq!(by_sticky["reason"], "sticky");
    assert_eq!(
        by_sticky["bucket"],
        serde_json::json!(reference_bucket("", "abc"))
    );
    let new = explain(c.get(&url)).await;
    assert_eq!(new["user_id_source"], "new");
    assert_eq!(new["reason"], "sticky");
    let set_cookie = new["set_cookie"].as_str().unwrap();
    let id = new["user_id"].as_str().unwrap();
    assert!(
        set_cookie.starts_with(&format!("canary_uid={id}; Path=/;")),
        "{set_cookie}"
    );
    assert_eq!(new["bucket"], serde_json::json!(reference_bucket("", id)));
    let routes = explain(c.get(proxy.admin("/admin/routes"))).await;
    assert_eq!(routes["sticky"]["sticky_cookie"], "canary_uid");
    assert_eq!(routes["sticky"]["sticky_cookie_max_age"], "720h");
}
