//! Human-readable durations for the config file: `"500ms"`, `"2s"`, `"1m"`, `"1h"`.
//!
//! The grammar is deliberately small (one non-negative integer, one unit, nothing else) so a
//! value means exactly one thing and [`format_duration`] can print any parsed value back.

use std::time::Duration;

/// The units a duration may carry, longest suffix first so `ms` is not read as `m`.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Parses `"<integer><unit>"` where unit is `ms`, `s`, `m` or `h`.
///
/// Rejects anything else with a message fit to show an operator: empty strings, a missing or
/// unknown unit, signs, fractions (`"1.5s"`: write `"1500ms"`), compound forms (`"1m30s"`:
/// write `"90s"`), whitespace, and values that do not fit in a `Duration`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration; expected e.g. \"2s\" or \"500ms\"".to_owned());
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!(
            "invalid duration {s:?}: whitespace is not allowed; expected e.g. \"2s\""
        ));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: expected a non-negative integer followed by a unit (ms, s, m, h)"
        ));
    }
    if unit.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: missing unit; write e.g. \"{digits}s\" or \"{digits}ms\""
        ));
    }
    if unit.starts_with('.') {
        return Err(format!(
            "invalid duration {s:?}: fractions are not allowed; use a smaller unit, e.g. \"1500ms\""
        ));
    }
    let Some(&(_, millis_per_unit)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        let hint = if unit.chars().any(|c| c.is_ascii_digit()) {
            "; use a single unit, e.g. \"90s\" instead of \"1m30s\""
        } else {
            ""
        };
        return Err(format!(
            "invalid duration {s:?}: unknown unit {unit:?}; expected ms, s, m or h{hint}"
        ));
    };
    let too_large = || format!("invalid duration {s:?}: value is too large");
    let count: u64 = digits.parse().map_err(|_| too_large())?;
    let millis = count.checked_mul(millis_per_unit).ok_or_else(too_large)?;
    Ok(Duration::from_millis(millis))
}

/// Prints `d` in the shortest form `parse_duration` reads back exactly: `"1h"`, `"90s"`,
/// `"500ms"`, `"0s"` for zero.
///
/// Durations with a sub-millisecond part cannot be written in the config grammar; they are
/// printed in `Duration`'s `Debug` form (e.g. `"1.5ms"`) so nothing is silently rounded.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{d:?}");
    }
    let millis = d.as_millis();
    let (name, per_unit) = UNITS
        .iter()
        .rev()
        .map(|&(name, per_unit)| (name, u128::from(per_unit)))
        .find(|(_, per_unit)| millis.is_multiple_of(*per_unit))
        .unwrap_or(("ms", 1));
    format!("{}{name}", millis / per_unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn rejects_empty_and_missing_unit() {
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn rejects_fractions_signs_and_unknown_units() {
        assert!(parse_duration("1.5s").unwrap_err().contains("fractions"));
        assert!(parse_duration(".5s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("+1s").is_err());
        assert!(parse_duration("1d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("1S").is_err());
        assert!(parse_duration("1sec").is_err());
        assert!(parse_duration("1m30s").unwrap_err().contains("single unit"));
        assert!(parse_duration("1ms5").is_err());
        assert!(parse_duration("١s").is_err(), "non-ASCII digits");
    }

    #[test]
    fn rejects_whitespace() {
        for s in ["1 s", " 1s", "1s ", "1\ts", "\n"] {
            assert!(
                parse_duration(s).unwrap_err().contains("whitespace"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(
            parse_duration("99999999999999999999s")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_duration(&format!("{}h", u64::MAX / 1000))
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(
            parse_duration(&format!("{}ms", u64::MAX)),
            Ok(Duration::from_millis(u64::MAX))
        );
    }

    #[test]
    fn formats_shortest_exact_form() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5ms");
    }

    #[test]
    fn format_round_trips_through_parse() {
        for s in [
            "1ms", "999ms", "1s", "59s", "61s", "1m", "59m", "1h", "25h", "0s",
        ] {
            let d = parse_duration(s).expect("valid duration");
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        let max = Duration::from_millis(u64::MAX);
        assert_eq!(parse_duration(&format_duration(max)), Ok(max));
    }
}
