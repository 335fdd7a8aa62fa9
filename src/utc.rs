//! UTC calendar dates of Unix times, without a date crate: the day of a count of days since
//! 1970 (the rollout view's times), and RFC 3339 timestamps to the millisecond (the access
//! log's `time`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now (0 before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `time` in RFC 3339, UTC, to the millisecond: `2023-11-14T22:13:20.123Z` (a time before
/// 1970 is written as 1970-01-01T00:00:00.000Z). ASCII digits put in place: the access log
/// writes one per request, and `format!` would cost some 2,000 instructions.
pub fn rfc3339_millis(time: SystemTime) -> [u8; 24] {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
    let secs = ms / 1000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], (secs / 3600) % 24);
    put_digits(&mut text[14..16], (secs / 60) % 60);
    put_digits(&mut text[17..19], secs % 60);
    put_digits(&mut text[20..23], ms % 1000);
    text
}

/// `value`'s last `field.len()` decimal digits, zero-padded, into `field`.
fn put_digits(field: &mut [u8], mut value: u64) {
    for digit in field.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn days_are_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_675), (2023, 11, 14));
        // 2024 is a leap year: day 59 of it is February 29th.
        assert_eq!(civil_from_days(19_723 + 59), (2024, 2, 29));
        assert_eq!(civil_from_days(19_723 + 60), (2024, 3, 1));
    }

    #[test]
    fn timestamps_are_rfc3339_utc_to_the_millisecond() {
        let text = |time: SystemTime| String::from_utf8(rfc3339_millis(time).to_vec()).unwrap();
        let at = |ms: u64| text(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(at(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        // Below the millisecond is cut, not rounded (the second stays the second).
        let nanos = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_999_999_999);
        assert_eq!(text(nanos), "2023-11-14T22:13:20.999Z");
        assert_eq!(
            text(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        // Years of four digits until 9999.
        assert_eq!(at(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    }
}
