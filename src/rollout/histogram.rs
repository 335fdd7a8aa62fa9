//! The latency buckets of a rollout: one counter per bucket per version on the hot path, merged
//! by the analysis. Pure and allocation-free.
//!
//! The scheme is HDR-style over whole microseconds, with 32 sub-buckets per power of two:
//! - values below 64 µs each get a bucket of their own (exact);
//! - from 64 µs on, each octave `[2^k, 2^(k+1))` is cut into 32 equal buckets of width
//!   `2^(k-5)`, so a bucket `[low, high)` is at most 1/32 = 3.1% of `low` wide (at least 1/63 =
//!   1.6%): a quantile read from the histogram is off by at most 3.1%;
//! - the last bucket, [`LATENCY_BUCKETS`]` - 1`, holds everything from 2^27 µs (134 s) up.
//!
//! That is 737 buckets (5.9 KB of `u64` counters per version and worker). The index is computed
//! with one `leading_zeros`, two shifts and a `min`: no floats, no loop, no data-dependent branch.

/// Number of latency buckets (the last one is the overflow bucket, from 2^27 µs up).
pub const LATENCY_BUCKETS: usize = OCTAVES * SUB_BUCKETS + SUB_BUCKETS + 1;

/// log2 of the sub-buckets per octave.
const SUB_BITS: u32 = 5;
/// Sub-buckets per octave: bucket width is at most `1 / SUB_BUCKETS` of its lower bound.
const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// Octaves cut into sub-buckets, from `[2^5, 2^6)` to `[2^26, 2^27)`; above them is the
/// overflow bucket.
const OCTAVES: usize = 22;
/// Values from here on (2^27 µs, about 134 s) all fall in the last bucket.
pub const OVERFLOW_MICROS: u64 = 1 << (SUB_BITS as usize + OCTAVES);

/// The bucket of a latency in microseconds, in `[0, LATENCY_BUCKETS)`. Runs on every request.
#[inline]
pub fn latency_bucket(micros: u64) -> usize {
    // k = floor(log2(micros)) (0 for 0 and 1). Below 2^SUB_BITS the shift is 0 and the index is
    // the value itself; above, the index is (octave * 32) + the top 6 significant bits, which
    // lie in [32, 64).
    let log2 = 63 - (micros | 1).leading_zeros();
    let shift = log2.saturating_sub(SUB_BITS);
    let index = ((shift as usize) << SUB_BITS) + (micros >> shift) as usize;
    index.min(LATENCY_BUCKETS - 1)
}

/// The latencies a bucket holds, in microseconds: `(low, high)`, `low` inclusive, `high`
/// exclusive. The last bucket is `(OVERFLOW_MICROS, u64::MAX)`; an index past it is read as the
/// last bucket.
pub fn bucket_bounds_micros(index: usize) -> (u64, u64) {
    if index >= LATENCY_BUCKETS - 1 {
        return (OVERFLOW_MICROS, u64::MAX);
    }
    let shift = (index >> SUB_BITS).saturating_sub(1);
    let mantissa = if index < SUB_BUCKETS {
        index as u64
    } else {
        (SUB_BUCKETS | (index & (SUB_BUCKETS - 1))) as u64
    };
    (mantissa << shift, (mantissa + 1) << shift)
}

/// The `q`-quantile (`q` in `[0, 1]`) of a histogram of [`LATENCY_BUCKETS`] counts, in
/// microseconds, for display: the bucket where the cumulative count reaches `q * total`, with
/// the requests spread evenly inside it. `None` when the histogram is empty or `q` is not a
/// number in `[0, 1]`. A quantile that falls in the overflow bucket reads as its lower bound.
pub fn quantile_micros(counts: &[u64], q: f64) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let total: u128 = counts.iter().map(|&c| u128::from(c)).sum();
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let mut below = 0u128;
    for (index, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let through = below + u128::from(count);
        if through as f64 >= target {
            let (low, high) = bucket_bounds_micros(index);
            if high == u64::MAX {
                return Some(low as f64);
            }
            let inside = ((target - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(low as f64 + inside * (high - low) as f64);
        }
        below = through;
    }
    // Rounding left `target` a hair above the total: the answer is the top of the last
    // non-empty bucket.
    let last = counts.iter().rposition(|&c| c > 0)?;
    let (low, high) = bucket_bounds_micros(last);
    Some(if high == u64::MAX { low } else { high } as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn scheme_constants() {
        assert_eq!(LATENCY_BUCKETS, 737);
        assert_eq!(OVERFLOW_MICROS, 134_217_728);
        const { assert!(OVERFLOW_MICROS > 120_000_000, "covers two minutes") };
        assert_eq!(latency_bucket(OVERFLOW_MICROS - 1), LATENCY_BUCKETS - 2);
        assert_eq!(latency_bucket(OVERFLOW_MICROS), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn small_values_are_exact() {
        for micros in 0..64 {
            assert_eq!(latency_bucket(micros), micros as usize);
            assert_eq!(bucket_bounds_micros(micros as usize), (micros, micros + 1));
        }
    }

    #[test]
    fn buckets_tile_the_line_without_gaps() {
        // Consecutive buckets share their boundary, the first starts at 0, the last ends at
        // u64::MAX, and each bucket's own bounds map back to it.
        let mut expected_low = 0;
        for index in 0..LATENCY_BUCKETS {
            let (low, high) = bucket_bounds_micros(index);
            assert_eq!(low, expected_low, "bucket {index}");
            assert!(high > low);
            assert_eq!(latency_bucket(low), index);
            assert_eq!(latency_bucket(high - 1), index);
            if index + 1 < LATENCY_BUCKETS {
                assert_eq!(latency_bucket(high), index + 1);
                // Relative width: at most 1/32 of the lower bound once buckets are wider than
                // one microsecond.
                if high - low > 1 {
                    assert!((high - low) * 32 <= low, "bucket {index}: {low}..{high}");
                }
            }
            expected_low = high;
        }
        assert_eq!(expected_low, u64::MAX);
        assert_eq!(
            bucket_bounds_micros(LATENCY_BUCKETS + 5),
            (OVERFLOW_MICROS, u64::MAX)
        );
    }

    #[test]
    fn every_value_below_two_to_the_twenty_lands_in_its_bucket() {
        let mut previous = 0;
        for micros in 0..(1u64 << 20) {
            let index = latency_bucket(micros);
            assert!(index >= previous, "monotone");
            let (low, high) = bucket_bounds_micros(index);
            assert!(low <= micros && micros < high, "{micros} in {low}..{high}");
            previous = index;
        }
    }

    #[test]
    fn property_wide_values_land_in_their_bucket() {
        // Seeded property check over the whole u64 range, weighted towards every magnitude.
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..200_000 {
            let bits = rng.random_range(0..=64u32);
            let micros = if bits == 0 {
                0
            } else {
                rng.random::<u64>() >> (64 - bits)
            };
            let index = latency_bucket(micros);
            assert!(index < LATENCY_BUCKETS);
            let (low, high) = bucket_bounds_micros(index);
            assert!(low <= micros && (micros < high || high == u64::MAX));
            let other = rng.random::<u64>() >> rng.random_range(0..64u32);
            let (smaller, larger) = (micros.min(other), micros.max(other));
            assert!(
                latency_bucket(smaller) <= latency_bucket(larger),
                "monotone"
            );
        }
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_empty_or_bad_input_are_none() {
        assert_eq!(quantile_micros(&[], 0.5), None);
        assert_eq!(quantile_micros(&[0; LATENCY_BUCKETS], 0.99), None);
        let mut counts = vec![0; LATENCY_BUCKETS];
        counts[100] = 3;
        assert_eq!(quantile_micros(&counts, f64::NAN), None);
        assert_eq!(quantile_micros(&counts, -0.1), None);
        assert_eq!(quantile_micros(&counts, 1.5), None);
    }

    #[test]
    fn quantiles_stay_inside_their_bucket() {
        let mut counts = vec![0; LATENCY_BUCKETS];
        for micros in [1_000u64, 2_000, 3_000, 50_000, 200_000_000] {
            counts[latency_bucket(micros)] += 1;
        }
        let (low, high) = bucket_bounds_micros(latency_bucket(1_000));
        let min = quantile_micros(&counts, 0.0).unwrap_or_default();
        assert!(low as f64 <= min && min < high as f64);
        let median = quantile_micros(&counts, 0.5).unwrap_or_default();
        let (low, high) = bucket_bounds_micros(latency_bucket(3_000));
        assert!(low as f64 <= median && median <= high as f64, "{median}");
        // The overflow bucket reads as its lower bound.
        assert_eq!(quantile_micros(&counts, 1.0), Some(OVERFLOW_MICROS as f64));
    }

    #[test]
    fn quantiles_of_a_known_distribution_are_within_a_few_percent() {
        // 100 000 latencies spread evenly (in log scale) between 1 ms and 1 s: the exact
        // p50 is 31.6 ms, the exact p99 is 933 ms.
        let mut counts = vec![0; LATENCY_BUCKETS];
        let n = 100_000;
        for i in 0..n {
            let micros = 1_000.0 * 1_000f64.powf((i as f64 + 0.5) / n as f64);
            counts[latency_bucket(micros as u64)] += 1;
        }
        for q in [0.5, 0.9, 0.99] {
            let exact = 1_000.0 * 1_000f64.powf(q);
            let read = quantile_micros(&counts, q).unwrap_or_default();
            assert!((read / exact - 1.0).abs() < 0.01, "p{q}: {read} vs {exact}");
        }
    }
}
