//! A backend's fault as routing holds it: its config, and the draw made for each request of
//! that backend (delay it? answer it without forwarding?).

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use rand::{Rng, RngExt};

use crate::config::FaultConfig;

/// Draws are made in millionths, so a percentage keeps four decimals.
const PER_MILLION: u32 = 1_000_000;

/// A fault in force on one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub config: FaultConfig,
    /// `abort_percent` in millionths of the requests.
    abort: u32,
    /// `delay_percent` in millionths of the requests.
    delay: u32,
}

/// What a fault does to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injection {
    /// Wait this long before going on.
    pub delay: Option<Duration>,
    /// Answer with this status instead of forwarding.
    pub abort: Option<StatusCode>,
}

impl Fault {
    pub fn new(config: FaultConfig) -> Self {
        let millionths = |percent: f64| (percent * 10_000.0).round() as u32;
        Fault {
            abort: millionths(config.abort_percent),
            delay: millionths(config.delay_percent),
            config,
        }
    }

    /// The draw for one request with these headers: each of delay and abort independently,
    /// with their shares; nothing for a request without the fault's `header`.
    pub fn draw(&self, headers: &HeaderMap, rng: &mut impl Rng) -> Injection {
        if let Some(name) = &self.config.header
            && !headers.contains_key(name)
        {
            return Injection::default();
        }
        let mut hit = |share: u32| share > 0 && rng.random_range(0..PER_MILLION) < share;
        Injection {
            delay: hit(self.delay).then_some(self.config.delay),
            abort: hit(self.abort).then_some(self.config.abort_status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FaultFields;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn fault(fields: FaultFields<'_>) -> Fault {
        Fault::new(fields.check().unwrap())
    }

    #[test]
    fn shares_are_drawn_independently_at_their_rates() {
        let f = fault(FaultFields {
            backend: Some("v2"),
            abort_percent: Some(5.0),
            delay_percent: Some(20.0),
            delay: Some("10ms"),
            ..FaultFields::default()
        });
        let mut rng = StdRng::seed_from_u64(11);
        let (mut aborts, mut delays, mut both) = (0u32, 0u32, 0u32);
        let n = 100_000;
        for _ in 0..n {
            let drawn = f.draw(&HeaderMap::new(), &mut rng);
            aborts += u32::from(drawn.abort.is_some());
            delays += u32::from(drawn.delay.is_some());
            both += u32::from(drawn.abort.is_some() && drawn.delay.is_some());
            if let Some(delay) = drawn.delay {
                assert_eq!(delay, Duration::from_millis(10));
            }
            if let Some(status) = drawn.abort {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            }
        }
        // sd of 5% of 100k is 69, of 20% 126, of 1% 31: about 5 sd of room each.
        assert!((4_650..=5_350).contains(&aborts), "{aborts}");
        assert!((19_350..=20_650).contains(&delays), "{delays}");
        assert!((850..=1_150).contains(&both), "{both}");
    }

    #[test]
    fn the_extremes_and_the_header_condition() {
        let always = fault(FaultFields {
            backend: Some("v2"),
            abort_percent: Some(100.0),
            header: Some("x-fault"),
            ..FaultFields::default()
        });
        let mut rng = StdRng::seed_from_u64(1);
        let mut drill = HeaderMap::new();
        drill.insert("x-fault", http::HeaderValue::from_static(""));
        for _ in 0..1000 {
            assert_eq!(
                always.draw(&HeaderMap::new(), &mut rng),
                Injection::default()
            );
            assert_eq!(
                always.draw(&drill, &mut rng).abort,
                Some(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
        let tiny = fault(FaultFields {
            backend: Some("v2"),
            abort_percent: Some(0.0001),
            ..FaultFields::default()
        });
        assert_eq!(tiny.abort, 1);
    }
}
