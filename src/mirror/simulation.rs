//! The seeded simulation of the noise filter ([`PathCounts::is_reported`], Diffy's rule):
//! how often a path is reported as a canary difference when the canary differs there no more
//! than two instances of the served version do (a false report), and how often when it
//! differs more (a detection). Pure logic; the table goes to stdout (`cargo test --lib
//! mirror::simulation -- --nocapture`) and the test fails if a bound does not hold.
//!
//! Model: `n` compared requests, each with a second copy to the served version (its backend
//! has two endpoints). At one path the served version differs from itself with probability
//! `q` per request (noise: a timestamp, a host name), the canary from the served version with
//! probability `q + d`; both counts are Binomial, drawn independently.

use std::fmt::Write as _;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Binomial, Distribution};

use super::report::PathCounts;

/// Simulated paths per cell of the table.
const RUNS: u32 = 2_000;

/// The share of `RUNS` paths reported, for `n` comparisons, noise rate `q`, canary excess `d`.
fn reported_share(n: u64, q: f64, d: f64, rng: &mut SmallRng) -> f64 {
    let noise = Binomial::new(n, q).expect("a probability");
    let raw = Binomial::new(n, (q + d).min(1.0)).expect("a probability");
    let reported = (0..RUNS)
        .filter(|_| {
            let counts = PathCounts {
                different: raw.sample(rng),
                noise: noise.sample(rng),
            };
            counts.is_reported(n)
        })
        .count();
    reported as f64 / f64::from(RUNS)
}

#[test]
fn the_noise_filter_reports_canary_differences_and_rarely_noise() {
    let mut rng = SmallRng::seed_from_u64(12);
    let noise_rates = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0];
    let excesses = [0.0, 0.002, 0.01, 0.05];
    let mut table = String::from(
        "| comparisons | noise rate q | canary excess d = 0 (false reports) | d = 0.2% | d = 1% | d = 5% |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut shares = Vec::new();
    for n in [1_000u64, 10_000] {
        for q in noise_rates {
            let row: Vec<f64> = excesses
                .iter()
                .map(|&d| reported_share(n, q, d, &mut rng))
                .collect();
            let _ = writeln!(
                table,
                "| {n} | {:.1}% | {} |",
                q * 100.0,
                row.iter()
                    .map(|s| format!("{:.1}%", s * 100.0))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            shares.push((n, q, row));
        }
    }
    println!("{table}");
    let share = |n: u64, q: f64, column: usize| {
        shares
            .iter()
            .find(|(m, r, _)| *m == n && *r == q)
            .map(|(_, _, row)| row[column])
            .expect("a simulated cell")
    };
    // A path that never differs between served instances is reported as soon as the canary
    // differs there at all (with 1,000 comparisons, from 1%).
    assert_eq!(share(1_000, 0.0, 0), 0.0);
    assert!(share(1_000, 0.0, 2) > 0.99);
    assert!(share(10_000, 0.0, 1) > 0.99);
    // Frequent noise (10% of requests and more) is not reported when the canary is no
    // different: the relative margin holds it back.
    for q in [0.1, 0.5, 1.0] {
        for n in [1_000, 10_000] {
            assert!(share(n, q, 0) < 0.01, "q {q}, n {n}: {}", share(n, q, 0));
        }
    }
    // The relative margin also masks real differences on noisy paths: 5 points more than a
    // 10% noise is at its edge (about half reported), more than a 50% noise never.
    assert!((0.3..0.7).contains(&share(10_000, 0.1, 3)));
    assert_eq!(share(10_000, 0.5, 3), 0.0);
    // Rare noise (1 request in 1,000) is where it reports what is not there: about a third of
    // such paths with 1,000 comparisons, a sixth with 10,000 (README says so).
    assert!(share(1_000, 0.001, 0) > 0.2);
    assert!(share(10_000, 0.001, 0) > 0.1);
}
