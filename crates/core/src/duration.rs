use std::time::Duration;

use crate::SpecError;

/// A duration as written by users (`"10s"`, `"1m30s"`), kept in milliseconds.
pub type Span = u64;

/// A year as humantime counts it (365.25 days), so that `100y` is allowed.
const YEAR: Span = 31_557_600_000;

/// Longer than any real deadline or timeout, and far enough below
/// `u64::MAX` milliseconds that adding a duration to a timestamp, as the
/// planner does with every deadline, cannot overflow.
const MAX_SPAN: Span = 100 * YEAR;

/// Parses a human duration such as `500ms`, `10s`, `1m30s` or `2h`.
pub fn parse_duration(field: &str, s: &str) -> Result<Span, SpecError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        // humantime lists every unit it knows after the reason; the example
        // in front says enough.
        let e = e.to_string();
        let why = e.split(", supported units").next().unwrap_or(&e);
        SpecError::new(
            field,
            format!("{s:?} is not a duration (like 500ms, 10s, 5m, 1h): {why}"),
        )
    })?;
    u64::try_from(d.as_millis())
        .ok()
        .filter(|&ms| ms <= MAX_SPAN)
        .ok_or_else(|| {
            SpecError::new(
                field,
                format!("{s:?} is too long a duration (at most 100 years)"),
            )
        })
}

/// Formats milliseconds the way users write them (`1m 30s`).
pub fn format_duration(ms: Span) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// `3.4 KiB`, as people read sizes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut n = bytes as f64 / 1024.0;
    let mut unit = 0;
    while n >= 1024.0 && unit + 1 < UNITS.len() {
        n /= 1024.0;
        unit += 1;
    }
    format!("{n:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(3482), "3.4 KiB");
        assert_eq!(format_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("f", "500ms"), Ok(500));
        assert_eq!(parse_duration("f", "10s"), Ok(10_000));
        assert_eq!(parse_duration("f", "1m30s"), Ok(90_000));
        assert_eq!(parse_duration("f", " 2h "), Ok(7_200_000));
    }

    #[test]
    fn rejects_unknown_units_naming_the_field() {
        let err = parse_duration("strategy.min_healthy_time", "5 parsecs").unwrap_err();
        assert_eq!(err.field, "strategy.min_healthy_time");
        assert!(
            err.to_string().ends_with(
                "\"5 parsecs\" is not a duration (like 500ms, 10s, 5m, 1h): unknown time unit \"parsecs\""
            ),
            "{err}"
        );
        assert!(parse_duration("f", "").is_err());
        assert!(parse_duration("f", "-3s").is_err());
    }

    /// These fit in a u64 of milliseconds, but the planner's
    /// `last_progress_at + progress_deadline` overflowed on them: a panic
    /// in debug builds, a deadline already past in release builds.
    #[test]
    fn refuses_durations_a_timestamp_cannot_add() {
        assert_eq!(parse_duration("f", "100y"), Ok(100 * YEAR));
        for long in ["100y 1ms", "36600d", "584542046y"] {
            let err = parse_duration("strategy.progress_deadline", long).unwrap_err();
            assert_eq!(err.field, "strategy.progress_deadline");
            assert!(err.message.contains("too long a duration"), "{err}");
        }
    }
}
