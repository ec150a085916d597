//! Go/Kubernetes-style durations ("300s", "5m", "1h30m", "1500ms"), the syntax the reference's
//! `drain-timeout` uses. Kept strict: a typo must be an error, not a zero timeout.
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration; write it like 300s, 5m or 1h30m")]
    Empty,
    #[error("bad duration {0:?}: write it like 300s, 5m or 1h30m (units ms, s, m, h)")]
    Syntax(String),
    #[error("duration {0:?} must be greater than zero")]
    Zero(String),
    #[error("duration {0:?} is out of range: a timeout must be between 1s and 24h")]
    OutOfRange(String),
}

/// The shortest timeout accepted (shorter ones cannot even see a pod start).
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest timeout accepted: a node cordoned longer than a day is an incident, and larger
/// values overflow deadline arithmetic.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// [`parse_duration`] for timeouts: also within [`MIN_TIMEOUT`]..=[`MAX_TIMEOUT`].
pub fn parse_timeout(text: &str) -> Result<Duration, DurationError> {
    let d = parse_duration(text)?;
    if (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&d) {
        Ok(d)
    } else {
        Err(DurationError::OutOfRange(text.trim().to_string()))
    }
}

/// Parses a positive duration made of `<integer><unit>` parts, units `ms`, `s`, `m`, `h`.
/// A bare integer is taken as seconds, as kubectl's `--timeout` also accepts.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let bad = || DurationError::Syntax(text.to_string());
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| bad())?;
        return nonzero(Duration::from_secs(secs), text);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    nonzero(total, text)
}

fn nonzero(d: Duration, text: &str) -> Result<Duration, DurationError> {
    if d.is_zero() {
        Err(DurationError::Zero(text.to_string()))
    } else {
        Ok(d)
    }
}

/// Formats a duration the way `parse_duration` reads it (whole seconds when possible).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("300s", 300_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("1500ms", 1_500),
            ("45", 45_000),
            (" 2m10s ", 130_000),
        ];
        for (text, millis) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
        for bad in ["", "s", "5 m", "5min", "-5s", "1.5s", "5x", "m5", "0s", "0"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn timeouts_are_bounded_without_panicking() {
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("24h"), Ok(MAX_TIMEOUT));
        for bad in [
            "500ms",
            "24h1s",
            "25h",
            "10000000000000000000",
            "99999999999h",
        ] {
            let e = parse_timeout(bad).unwrap_err();
            assert!(
                matches!(e, DurationError::OutOfRange(_) | DurationError::Syntax(_)),
                "{bad}: {e}"
            );
        }
        assert!(
            parse_timeout("10000000000000000000")
                .unwrap_err()
                .to_string()
                .contains("between 1s and 24h")
        );
    }

    #[test]
    fn format_round_trips() {
        for d in [Duration::from_secs(300), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
