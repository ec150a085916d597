//! Maintenance windows: when a run may start a node's turn.
//!
//! Written `[DAYS] START-END [ZONE]`, several windows separated by `;`, e.g.
//! `Mon-Fri 22:00-06:00 Europe/Berlin; Sat,Sun 00:00-24:00 Europe/Berlin`:
//! - DAYS: `*` (or omitted) for every day, a day (`Mon`), a range (`Mon-Fri`, `Fri-Mon` wraps
//!   around the week) or a comma list of those (`Sat,Sun`). The days are the days a window
//!   *opens*: `Fri 22:00-02:00` is open from Friday 22:00 to Saturday 02:00.
//! - START-END: `HH:MM` or `HH:MM:SS` (seconds make short windows possible in tests); an end at
//!   or before the start crosses midnight; `24:00` ends a window at the end of its day. A window
//!   from a time to the same time is refused (empty or all day? write `00:00-24:00`).
//! - ZONE: an IANA time zone (`Europe/Berlin`); `UTC` when omitted. Local times are turned into
//!   instants by jiff with its time zone database (the system's, else the bundled copy):
//!   a start in a DST gap opens when the gap ends, a start in a repeated hour at its first
//!   occurrence.
//!
//! An empty text means "always open". Pure: every function takes the time as an argument.
use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;

/// Seconds in a day; `24:00` is this many seconds after midnight.
const DAY: u32 = 86_400;
/// How far [`MaintenanceWindow::next_open`] looks ahead (a window opens at least weekly).
const LOOKAHEAD_DAYS: i64 = 8;

/// A parsed, validated maintenance window (possibly several), or "always open".
#[derive(Debug, Clone)]
pub struct MaintenanceWindow {
    entries: Vec<Entry>,
    source: String,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Monday first.
    days: [bool; 7],
    /// Seconds after local midnight, `start < DAY`, `end <= DAY`.
    start: u32,
    end: u32,
    tz: TimeZone,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad maintenance window {window:?}: {reason}; write it like `Mon-Fri 22:00-06:00 Europe/Berlin` \
     (days optional, times HH:MM or HH:MM:SS, zone optional (UTC), several separated by `;`)"
)]
pub struct WindowError {
    pub window: String,
    pub reason: String,
}

impl MaintenanceWindow {
    /// Parses the text; empty (or blank) means always open.
    pub fn parse(text: &str) -> Result<Self, WindowError> {
        let err = |reason: String| WindowError {
            window: text.to_string(),
            reason,
        };
        let mut entries = Vec::new();
        if !text.trim().is_empty() {
            for part in text.split(';') {
                let part = part.trim();
                if part.is_empty() {
                    return Err(err("an empty window between `;`".into()));
                }
                entries.push(parse_entry(part).map_err(err)?);
            }
        }
        Ok(MaintenanceWindow {
            entries,
            source: text.trim().to_string(),
        })
    }

    /// No window configured: always open.
    pub fn is_always_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a turn may start at `now_ms` (Unix ms).
    pub fn is_open(&self, now_ms: i64) -> bool {
        self.is_always_open() || self.containing(now_ms).is_some()
    }

    /// When the window next opens: `now_ms` itself when it is open now.
    pub fn next_open(&self, now_ms: i64) -> i64 {
        if self.is_open(now_ms) {
            return now_ms;
        }
        self.entries
            .iter()
            .flat_map(|e| {
                let today = local_date(&e.tz, now_ms);
                (-1..=LOOKAHEAD_DAYS).filter_map(move |d| e.occurrence(shift(today, d)?))
            })
            .map(|(start, _)| start)
            .filter(|start| *start > now_ms)
            .min()
            // Parsing guarantees every entry opens at least once a week.
            .unwrap_or(now_ms)
    }

    /// When the window that is open at `now_ms` closes (following windows that start exactly
    /// where it ends); `None` when it is not open now or is always open.
    pub fn closes_at(&self, now_ms: i64) -> Option<i64> {
        let mut end = self.containing(now_ms)?;
        // Back-to-back windows (`Mon 00:00-24:00; Tue 00:00-24:00`) are one open stretch.
        for _ in 0..(self.entries.len() * LOOKAHEAD_DAYS as usize) {
            match self.containing(end) {
                Some(next) if next > end => end = next,
                _ => break,
            }
        }
        Some(end)
    }

    /// `ms` as RFC 3339 in the zone of the first window (the zone its writer thinks in).
    pub fn rfc3339(&self, ms: i64) -> String {
        let tz = self.entries.first().map_or(TimeZone::UTC, |e| e.tz.clone());
        match Timestamp::from_millisecond(ms) {
            Ok(ts) => ts.to_zoned(tz).strftime("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            Err(_) => format!("{ms} ms"),
        }
    }

    /// The text it was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The latest end among the occurrences open at `ms`.
    fn containing(&self, ms: i64) -> Option<i64> {
        self.entries
            .iter()
            .flat_map(|e| {
                let today = local_date(&e.tz, ms);
                // A window opens at most a day (plus a DST hour) before it closes.
                (-2..=0).filter_map(move |d| e.occurrence(shift(today, d)?))
            })
            .filter(|(start, end)| *start <= ms && ms < *end)
            .map(|(_, end)| end)
            .max()
    }
}

impl std::fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl Entry {
    /// The window opening on local date `day`, as Unix ms `[start, end)`; `None` when it does
    /// not open that weekday (or DST makes it empty).
    fn occurrence(&self, day: Date) -> Option<(i64, i64)> {
        let weekday = usize::try_from(day.weekday().to_monday_zero_offset()).ok()?;
        if !self.days[weekday] {
            return None;
        }
        let start = self.instant(day, self.start)?;
        let end_day = if self.end <= self.start {
            shift(day, 1)?
        } else {
            day
        };
        let end = self.instant(end_day, self.end)?;
        (start < end).then_some((start, end))
    }

    /// Local `day` + `secs` in the window's zone (DST: jiff's "compatible" choice).
    fn instant(&self, day: Date, secs: u32) -> Option<i64> {
        let (day, secs) = if secs >= DAY {
            (shift(day, 1)?, secs - DAY)
        } else {
            (day, secs)
        };
        let time = Time::new(
            i8::try_from(secs / 3600).ok()?,
            i8::try_from(secs / 60 % 60).ok()?,
            i8::try_from(secs % 60).ok()?,
            0,
        )
        .ok()?;
        let zoned = self.tz.to_zoned(day.to_datetime(time)).ok()?;
        Some(zoned.timestamp().as_millisecond())
    }
}

fn local_date(tz: &TimeZone, ms: i64) -> Date {
    let ts = Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH);
    tz.to_datetime(ts).date()
}

fn shift(day: Date, days: i64) -> Option<Date> {
    day.checked_add(jiff::Span::new().days(days)).ok()
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let is_range = |t: &str| t.starts_with(|c: char| c.is_ascii_digit()) && t.contains(':');
    let at = tokens
        .iter()
        .position(|t| is_range(t))
        .ok_or_else(|| format!("{text:?} has no time range (START-END, e.g. 22:00-06:00)"))?;
    let days = match &tokens[..at] {
        [] => [true; 7],
        [days] => parse_days(days)?,
        more => {
            return Err(format!(
                "{:?} before the time range: expected one day list such as Mon-Fri or Sat,Sun",
                more.join(" ")
            ));
        }
    };
    let (start, end) = parse_range(tokens[at])?;
    let tz = match &tokens[at + 1..] {
        [] => TimeZone::UTC,
        [zone] => TimeZone::get(zone).map_err(|e| {
            format!("unknown time zone {zone:?} (an IANA name such as Europe/Berlin): {e}")
        })?,
        more => {
            return Err(format!(
                "{:?} after the time range: expected one time zone such as Europe/Berlin",
                more.join(" ")
            ));
        }
    };
    Ok(Entry {
        days,
        start,
        end,
        tz,
    })
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    if text == "*" {
        return Ok([true; 7]);
    }
    let mut days = [false; 7];
    for item in text.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_day(a)?, parse_day(b)?);
                // `Fri-Mon` wraps around the week.
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[parse_day(item)?] = true,
        }
    }
    Ok(days)
}

fn parse_day(text: &str) -> Result<usize, String> {
    const NAMES: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let lower = text.trim().to_ascii_lowercase();
    NAMES
        .iter()
        .position(|n| {
            lower.len() >= 3 && n.starts_with(&lower) && (lower.len() == 3 || lower == *n)
        })
        .ok_or_else(|| format!("{text:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun or *)"))
}

fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not a time range START-END"))?;
    let (start, end) = (parse_time(a)?, parse_time(b)?);
    if start >= DAY {
        return Err(format!("{text:?} starts at 24:00; start at 00:00 instead"));
    }
    if start == end {
        return Err(format!(
            "{text:?} starts and ends at the same time (for a whole day write 00:00-24:00)"
        ));
    }
    Ok((start, end))
}

/// `HH:MM` or `HH:MM:SS` as seconds after midnight; `24:00` (`24:00:00`) is the end of the day.
fn parse_time(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time HH:MM or HH:MM:SS");
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len())
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let n = |i: usize| parts.get(i).map_or(Ok(0), |p| p.parse::<u32>());
    let (h, m, s) = (
        n(0).map_err(|_| bad())?,
        n(1).map_err(|_| bad())?,
        n(2).map_err(|_| bad())?,
    );
    if m > 59 || s > 59 || h > 24 || (h == 24 && (m, s) != (0, 0)) {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a local time in a zone.
    fn at(zone: &str, local: &str) -> i64 {
        let dt: jiff::civil::DateTime = local.parse().unwrap();
        dt.to_zoned(TimeZone::get(zone).unwrap())
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn utc(local: &str) -> i64 {
        at("UTC", local)
    }

    fn w(text: &str) -> MaintenanceWindow {
        MaintenanceWindow::parse(text).unwrap()
    }

    #[test]
    fn empty_means_always_open() {
        let win = w("  ");
        assert!(win.is_always_open());
        let now = utc("2026-11-30T12:00:00");
        assert!(win.is_open(now));
        assert_eq!(win.next_open(now), now);
        assert_eq!(win.closes_at(now), None);
    }

    #[test]
    fn a_window_crossing_midnight_belongs_to_the_day_it_opens() {
        // 2026-11-27 is a Friday.
        let win = w("Fri 22:00-02:00");
        assert!(!win.is_open(utc("2026-11-27T21:59:59")));
        assert!(win.is_open(utc("2026-11-27T22:00:00")));
        assert!(win.is_open(utc("2026-11-28T01:59:59")), "Saturday morning");
        assert!(!win.is_open(utc("2026-11-28T02:00:00")), "end is exclusive");
        assert!(
            !win.is_open(utc("2026-11-28T22:30:00")),
            "not on Saturday night"
        );
        assert!(
            !win.is_open(utc("2026-11-27T01:00:00")),
            "Thursday night is not Friday's"
        );
        assert_eq!(
            win.closes_at(utc("2026-11-27T23:00:00")),
            Some(utc("2026-11-28T02:00:00"))
        );
    }

    #[test]
    fn next_open_looks_across_the_week() {
        let win = w("Mon-Fri 22:00-06:00");
        // Saturday noon: the next opening is Monday 22:00.
        assert_eq!(
            win.next_open(utc("2026-11-28T12:00:00")),
            utc("2026-11-30T22:00:00")
        );
        // Saturday 05:00 is still Friday's window.
        let sat_early = utc("2026-11-28T05:00:00");
        assert!(win.is_open(sat_early));
        assert_eq!(win.next_open(sat_early), sat_early);
        // A weekly window, asked right after it closed: a week later.
        let weekly = w("Wed 10:00-11:00");
        assert_eq!(
            weekly.next_open(utc("2026-12-02T11:00:00")),
            utc("2026-12-09T10:00:00")
        );
        // Several windows: the earliest opening wins; seconds count.
        let two = w("Sun 03:00-04:00; Tue 08:00:30-08:00:45");
        assert_eq!(
            two.next_open(utc("2026-11-30T12:00:00")),
            utc("2026-12-01T08:00:30")
        );
        assert!(two.is_open(utc("2026-12-01T08:00:44")));
        assert!(!two.is_open(utc("2026-12-01T08:00:45")));
    }

    #[test]
    fn days_lists_ranges_wrapping_and_stars() {
        let weekend = w("Sat,Sun 00:00-24:00");
        assert!(weekend.is_open(utc("2026-11-29T23:59:59")));
        assert!(!weekend.is_open(utc("2026-11-30T00:00:00")));
        // Back-to-back days close at the end of the stretch.
        assert_eq!(
            weekend.closes_at(utc("2026-11-28T10:00:00")),
            Some(utc("2026-11-30T00:00:00"))
        );
        let wrap = w("fri-mon 10:00-11:00");
        for (day, open) in [
            ("2026-11-27", true),
            ("2026-11-28", true),
            ("2026-11-29", true),
            ("2026-11-30", true),
            ("2026-12-01", false),
            ("2026-12-02", false),
            ("2026-12-03", false),
        ] {
            assert_eq!(wrap.is_open(utc(&format!("{day}T10:30:00"))), open, "{day}");
        }
        let every = w("* 09:00-17:00");
        let omitted = w("09:00-17:00");
        for t in [
            "2026-11-30T08:59:59",
            "2026-11-30T09:00:00",
            "2026-12-05T16:59:59",
        ] {
            assert_eq!(every.is_open(utc(t)), omitted.is_open(utc(t)), "{t}");
        }
        assert!(every.is_open(utc("2026-12-05T16:59:59")));
    }

    #[test]
    fn a_zone_moves_the_window_and_dst_is_handled_by_the_zone() {
        let berlin = w("Mon-Fri 22:00-06:00 Europe/Berlin");
        // Winter: Berlin is UTC+1, so 22:00 Berlin is 21:00 UTC.
        assert!(berlin.is_open(utc("2026-11-30T21:00:00")));
        assert!(!berlin.is_open(utc("2026-11-30T20:59:59")));
        assert_eq!(
            berlin.rfc3339(berlin.next_open(utc("2026-11-30T12:00:00"))),
            "2026-11-30T22:00:00+01:00"
        );
        // 2026-03-29 (a Sunday) Berlin springs forward at 02:00 → 03:00: a window 01:00-04:00
        // that day lasts two hours, not three.
        let spring = w("Sun 01:00-04:00 Europe/Berlin");
        let opens = at("Europe/Berlin", "2026-03-29T01:00:00");
        assert_eq!(spring.next_open(opens - 1), opens);
        assert_eq!(spring.closes_at(opens), Some(opens + 2 * 3_600_000));
        // A start inside the gap opens when the gap ends (03:00 CEST = 01:00 UTC).
        let gap = w("Sun 02:30-05:00 Europe/Berlin");
        assert_eq!(
            gap.next_open(utc("2026-03-28T12:00:00")),
            utc("2026-03-29T01:30:00"),
            "02:30 does not exist that day; jiff's compatible choice is 03:30 CEST"
        );
        // 2026-10-25 falls back 03:00 → 02:00: 00:00-06:00 that day lasts seven hours.
        let autumn = w("Sun 00:00-06:00 Europe/Berlin");
        let opens = at("Europe/Berlin", "2026-10-25T00:00:00");
        assert_eq!(autumn.closes_at(opens), Some(opens + 7 * 3_600_000));
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for (text, needle) in [
            ("Mon-Fri", "no time range"),
            ("Mon-Fri 22:00", "not a time range"),
            ("Mon-Fri 25:00-06:00", "not a time"),
            ("Mon-Fri 22:60-06:00", "not a time"),
            ("Mon-Fri 22:00-06:00:61", "not a time"),
            ("Mon-Fri 2:00-06:00", "not a time"),
            ("Mon-Fri 24:00-06:00", "starts at 24:00"),
            ("Mon-Fri 24:30-06:00", "not a time"),
            ("Mon-Fri 06:00-06:00", "same time"),
            ("Mon-Fro 22:00-06:00", "not a day"),
            ("Mo 22:00-06:00", "not a day"),
            ("Mon Tue 22:00-06:00", "one day list"),
            ("22:00-06:00 Mars/Olympus", "unknown time zone"),
            ("22:00-06:00 Europe/Berlin extra", "one time zone"),
            ("22:00-06:00;", "empty window"),
        ] {
            let e = MaintenanceWindow::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(e.contains("Mon-Fri 22:00-06:00 Europe/Berlin"), "{e}");
        }
    }

    #[test]
    fn full_day_names_and_seconds_parse() {
        let win = w("Tuesday 10:00:05-10:00:10 Europe/Berlin");
        let start = at("Europe/Berlin", "2026-12-01T10:00:05");
        assert!(win.is_open(start));
        assert!(!win.is_open(start - 1));
        assert_eq!(win.closes_at(start), Some(start + 5_000));
        assert_eq!(win.source(), "Tuesday 10:00:05-10:00:10 Europe/Berlin");
    }
}
