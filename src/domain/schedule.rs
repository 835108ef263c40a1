//! Schedules: when a periodic task's slots fall, and which of them a scheduler step fires.
//!
//! A [`Cadence`] is a cron expression (five fields, or six with seconds first) read in an IANA
//! time zone. Slots are instants: the wall-clock times the expression matches, in that zone.
//! Daylight saving time is handled as cron users expect (the rules of the Open Cron Pattern
//! Specification, as the `croner` crate implements them):
//!
//! - **Spring forward** (a wall-clock hour is skipped): a slot at a fixed time inside the
//!   skipped hour (`30 2 * * *` on the day 02:00 becomes 03:00) fires once, at the first wall-clock
//!   time after the gap; slots of an interval expression (`*/15 * * * *`) that fall in the gap do
//!   not exist and are not made up.
//! - **Fall back** (a wall-clock hour repeats): a fixed-time slot fires once, in the first pass of
//!   the hour; an interval expression fires in both passes, because real time passes in both.
//!
//! [`due`] is the pure decision of one scheduler step: given the schedule's next unfired slot
//! and the time now, which slots to enqueue, which were missed, and the next slot after that.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use std::time::Duration;

use super::FieldError;

/// Slots due within this long are on time: they fire whatever the missed-run policy says.
/// Older ones were missed (every scheduler was down, or the schedule was paused).
pub const MISFIRE_GRACE: Duration = Duration::from_secs(30);

/// Most slots one step fires for one schedule (a one-second schedule fires at most
/// [`MISFIRE_GRACE`]'s 31 slots on time; a catch-up is limited to this too).
pub const MAX_SLOTS_PER_STEP: u32 = 100;

/// Longest accepted cron expression.
pub const MAX_CRON_LEN: usize = 200;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Cadence {
    cron: Cron,
    expression: String,
    zone: Tz,
}

impl PartialEq for Cadence {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression && self.zone == other.zone
    }
}

impl Cadence {
    /// Reads `expression` (five fields, or six with seconds first) in the IANA zone `zone`
    /// (e.g. `Europe/Madrid`). Errors name the field: `cron` or `time_zone`.
    pub fn parse(expression: &str, zone: &str) -> Result<Cadence, FieldError> {
        if expression.len() > MAX_CRON_LEN || expression.chars().any(char::is_control) {
            return Err(FieldError::new(
                "cron",
                "invalid_format",
                format!("must be a cron expression of at most {MAX_CRON_LEN} printable characters"),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression.trim())
            .map_err(|e| {
                FieldError::new(
                    "cron",
                    "invalid_format",
                    format!(
                        "not a cron expression ({e}); expected 5 fields (minute hour day month \
                         weekday) or 6 with seconds first, e.g. \"0 9 * * MON-FRI\""
                    ),
                )
            })?;
        let zone: Tz = zone.parse().map_err(|_| {
            FieldError::new(
                "time_zone",
                "invalid_value",
                format!("{zone:?} is not an IANA time zone (e.g. Europe/Madrid or UTC)"),
            )
        })?;
        let cadence = Cadence {
            cron,
            expression: expression.trim().to_owned(),
            zone,
        };
        // An expression that never matches (30 February) is refused rather than stored idle.
        if cadence.next_after(Utc::now()).is_none() {
            return Err(FieldError::new(
                "cron",
                "invalid_value",
                "matches no time in the coming years",
            ));
        }
        Ok(cadence)
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn zone(&self) -> &str {
        self.zone.name()
    }

    /// The first slot strictly after `t`, if any within croner's search range.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.find(t, false, true)
    }

    /// The first slot at or after `t`.
    pub fn next_from(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.find(t, true, true)
    }

    /// The last slot strictly before `t`.
    pub fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.find(t, false, false)
    }

    /// The next `n` slots after `t`.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next_after(at) {
                Some(s) => {
                    out.push(s);
                    at = s;
                }
                None => break,
            }
        }
        out
    }

    fn find(&self, t: DateTime<Utc>, inclusive: bool, forward: bool) -> Option<DateTime<Utc>> {
        // Slots are whole seconds: search from the second `t` falls in.
        let local = t.with_timezone(&self.zone);
        let found = if forward {
            self.cron.find_next_occurrence(&local, inclusive)
        } else {
            self.cron.find_previous_occurrence(&local, inclusive)
        };
        found.ok().map(|s| s.with_timezone(&Utc))
    }
}

/// What happens to slots missed by more than [`MISFIRE_GRACE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissedRuns {
    /// Missed slots do not run.
    Skip,
    /// The most recent `limit` missed slots run (oldest first); older ones do not.
    CatchUp { limit: u32 },
}

impl MissedRuns {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedRuns::Skip => "skip",
            MissedRuns::CatchUp { .. } => "catch_up",
        }
    }

    /// How many missed slots run.
    pub fn limit(self) -> u32 {
        match self {
            MissedRuns::Skip => 0,
            MissedRuns::CatchUp { limit } => limit,
        }
    }
}

/// The decision of one scheduler step for one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Slots to enqueue now, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// The first and last missed slot that will not run, if any.
    pub skipped: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The schedule's next unfired slot after this step (`None`: the expression matches no
    /// later time).
    pub next: Option<DateTime<Utc>>,
}

/// The slots a schedule whose next unfired slot is `next` fires at `now`, under `policy`.
///
/// Slots in `[next, now]` are due. Those within [`MISFIRE_GRACE`] of `now` fire; older ones
/// were missed and fire only as far as the policy's catch-up limit allows (the most recent
/// ones). At most [`MAX_SLOTS_PER_STEP`] slots fire per step; if more are due on time, the rest
/// stay due for the next step (`next` is the first of them).
pub fn due(cadence: &Cadence, next: DateTime<Utc>, now: DateTime<Utc>, policy: MissedRuns) -> Due {
    let cap = MAX_SLOTS_PER_STEP as usize;
    let grace_start = now - chrono::Duration::from_std(MISFIRE_GRACE).unwrap_or_default();
    let mut fire = Vec::new();
    let mut skipped = None;

    // Missed slots: [next, grace_start).
    if next < grace_start {
        let last_missed = cadence.previous_before(grace_start).filter(|s| *s >= next);
        if let Some(last) = last_missed {
            let mut caught = Vec::new();
            let mut at = Some(last);
            while let Some(s) = at.filter(|s| *s >= next) {
                if caught.len() >= (policy.limit() as usize).min(cap) {
                    break;
                }
                caught.push(s);
                at = cadence.previous_before(s);
            }
            caught.reverse();
            let first_missed = cadence.next_from(next).unwrap_or(next);
            let first_run = caught.first().copied();
            if first_run != Some(first_missed) {
                let until = match first_run {
                    Some(f) => cadence.previous_before(f).unwrap_or(first_missed),
                    None => last,
                };
                skipped = Some((first_missed, until));
            }
            fire.extend(caught);
        }
    }

    // On time: [max(next, grace_start), now].
    let mut at = cadence.next_from(next.max(grace_start));
    while let Some(s) = at.filter(|s| *s <= now) {
        if fire.len() >= cap {
            return Due {
                fire,
                skipped,
                next: Some(s),
            };
        }
        fire.push(s);
        at = cadence.next_after(s);
    }
    Due {
        fire,
        skipped,
        next: at,
    }
}

/// The idempotency key of a schedule's task for one slot: at most one task per slot, whichever
/// process fires it and however often.
pub fn slot_key(schedule: uuid::Uuid, slot: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule}:{}",
        slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn madrid(cron: &str) -> Cadence {
        Cadence::parse(cron, "Europe/Madrid").unwrap()
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    /// Slots in `[from, to)`.
    fn slots(c: &Cadence, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = c.next_from(from);
        while let Some(s) = at.filter(|s| *s < to) {
            out.push(s);
            at = c.next_after(s);
        }
        out
    }

    #[test]
    fn five_and_six_field_expressions_are_read_in_their_zone() {
        let c = madrid("0 9 * * *");
        // 2026-01-15 09:00 in Madrid (CET, UTC+1) is 08:00 UTC.
        assert_eq!(
            c.next_after(utc(2026, 1, 15, 0, 0, 0)),
            Some(utc(2026, 1, 15, 8, 0, 0))
        );
        // In July (CEST, UTC+2), 07:00 UTC.
        assert_eq!(
            c.next_after(utc(2026, 7, 15, 0, 0, 0)),
            Some(utc(2026, 7, 15, 7, 0, 0))
        );
        let every_second = Cadence::parse("* * * * * *", "UTC").unwrap();
        let t = utc(2026, 1, 1, 0, 0, 0);
        assert_eq!(
            every_second.upcoming(t, 3),
            vec![
                utc(2026, 1, 1, 0, 0, 1),
                utc(2026, 1, 1, 0, 0, 2),
                utc(2026, 1, 1, 0, 0, 3)
            ]
        );
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        assert_eq!(
            Cadence::parse("61 * * * *", "UTC").unwrap_err().field,
            "cron"
        );
        assert_eq!(Cadence::parse("* * *", "UTC").unwrap_err().field, "cron");
        assert_eq!(Cadence::parse("", "UTC").unwrap_err().field, "cron");
        assert_eq!(
            Cadence::parse("0 0 30 2 *", "UTC").unwrap_err().code,
            "invalid_value"
        );
        let e = Cadence::parse("* * * * *", "Europe/Atlantis").unwrap_err();
        assert_eq!((e.field.as_str(), e.code), ("time_zone", "invalid_value"));
    }

    /// 2026-03-29 in Madrid: at 02:00 CET the clock jumps to 03:00 CEST (01:00 UTC).
    #[test]
    fn spring_forward_fires_a_fixed_time_slot_in_the_gap_once_after_it() {
        let c = madrid("30 2 * * *");
        let day = slots(&c, utc(2026, 3, 28, 0, 0, 0), utc(2026, 3, 30, 12, 0, 0));
        assert_eq!(
            day,
            vec![
                // 28 March 02:30 CET
                utc(2026, 3, 28, 1, 30, 0),
                // 29 March: 02:30 does not exist; the slot fires once, at 03:00 CEST
                utc(2026, 3, 29, 1, 0, 0),
                // 30 March 02:30 CEST
                utc(2026, 3, 30, 0, 30, 0),
            ]
        );
    }

    #[test]
    fn spring_forward_makes_up_no_interval_slots() {
        let c = madrid("*/30 * * * *");
        // 00:00 to 01:30 UTC covers 01:00, 01:30 CET, then (gap) 03:00, 03:30 CEST.
        let got = slots(&c, utc(2026, 3, 29, 0, 0, 0), utc(2026, 3, 29, 2, 0, 0));
        assert_eq!(
            got,
            vec![
                utc(2026, 3, 29, 0, 0, 0),
                utc(2026, 3, 29, 0, 30, 0),
                utc(2026, 3, 29, 1, 0, 0),
                utc(2026, 3, 29, 1, 30, 0),
            ]
        );
    }

    /// 2026-10-25 in Madrid: at 03:00 CEST the clock goes back to 02:00 CET (01:00 UTC), so
    /// 02:00–02:59 happens twice.
    #[test]
    fn fall_back_fires_a_fixed_time_slot_once() {
        let c = madrid("30 2 * * *");
        let got = slots(&c, utc(2026, 10, 24, 12, 0, 0), utc(2026, 10, 26, 12, 0, 0));
        assert_eq!(
            got,
            vec![
                // 25 October: 02:30 CEST only (not again at 02:30 CET, 01:30 UTC)
                utc(2026, 10, 25, 0, 30, 0),
                // 26 October 02:30 CET
                utc(2026, 10, 26, 1, 30, 0),
            ]
        );
    }

    #[test]
    fn fall_back_fires_interval_slots_in_both_passes() {
        let c = madrid("*/30 * * * *");
        let got = slots(&c, utc(2026, 10, 25, 0, 0, 0), utc(2026, 10, 25, 2, 0, 0));
        assert_eq!(
            got,
            vec![
                utc(2026, 10, 25, 0, 0, 0),  // 02:00 CEST
                utc(2026, 10, 25, 0, 30, 0), // 02:30 CEST
                utc(2026, 10, 25, 1, 0, 0),  // 02:00 CET
                utc(2026, 10, 25, 1, 30, 0), // 02:30 CET
            ]
        );
    }

    #[test]
    fn on_time_slots_fire_and_the_next_slot_follows() {
        let c = Cadence::parse("* * * * * *", "UTC").unwrap();
        let now = utc(2026, 1, 1, 12, 0, 3);
        let d = due(&c, utc(2026, 1, 1, 12, 0, 1), now, MissedRuns::Skip);
        assert_eq!(
            d.fire,
            vec![
                utc(2026, 1, 1, 12, 0, 1),
                utc(2026, 1, 1, 12, 0, 2),
                utc(2026, 1, 1, 12, 0, 3)
            ]
        );
        assert_eq!(d.skipped, None);
        assert_eq!(d.next, Some(utc(2026, 1, 1, 12, 0, 4)));
        // Nothing due yet: nothing fires and the next slot stays.
        let d = due(&c, utc(2026, 1, 1, 12, 0, 4), now, MissedRuns::Skip);
        assert!(d.fire.is_empty());
        assert_eq!(d.next, Some(utc(2026, 1, 1, 12, 0, 4)));
    }

    #[test]
    fn skip_drops_missed_slots_and_keeps_on_time_ones() {
        let c = Cadence::parse("0 * * * * *", "UTC").unwrap(); // every minute
        let now = utc(2026, 1, 1, 12, 0, 10);
        // Down since 09:00: 09:00 … 11:59 were missed; 12:00 is within the grace.
        let d = due(&c, utc(2026, 1, 1, 9, 0, 0), now, MissedRuns::Skip);
        assert_eq!(d.fire, vec![utc(2026, 1, 1, 12, 0, 0)]);
        assert_eq!(
            d.skipped,
            Some((utc(2026, 1, 1, 9, 0, 0), utc(2026, 1, 1, 11, 59, 0)))
        );
        assert_eq!(d.next, Some(utc(2026, 1, 1, 12, 1, 0)));
    }

    #[test]
    fn catch_up_runs_the_most_recent_missed_slots_up_to_its_limit() {
        let c = Cadence::parse("0 * * * *", "UTC").unwrap(); // hourly
        let now = utc(2026, 1, 1, 12, 30, 0);
        let d = due(
            &c,
            utc(2026, 1, 1, 7, 0, 0),
            now,
            MissedRuns::CatchUp { limit: 2 },
        );
        assert_eq!(
            d.fire,
            vec![utc(2026, 1, 1, 11, 0, 0), utc(2026, 1, 1, 12, 0, 0)]
        );
        assert_eq!(
            d.skipped,
            Some((utc(2026, 1, 1, 7, 0, 0), utc(2026, 1, 1, 10, 0, 0)))
        );
        // A limit above the number missed runs them all and skips nothing.
        let d = due(
            &c,
            utc(2026, 1, 1, 10, 0, 0),
            now,
            MissedRuns::CatchUp { limit: 10 },
        );
        assert_eq!(d.fire.len(), 3);
        assert_eq!(d.skipped, None);
        assert_eq!(d.next, Some(utc(2026, 1, 1, 13, 0, 0)));
    }

    #[test]
    fn one_step_fires_at_most_its_cap_and_leaves_the_rest_due() {
        let c = Cadence::parse("* * * * * *", "UTC").unwrap();
        let now = utc(2026, 1, 1, 12, 10, 0);
        let d = due(
            &c,
            utc(2026, 1, 1, 12, 0, 0),
            now,
            MissedRuns::CatchUp { limit: 1000 },
        );
        assert_eq!(d.fire.len(), MAX_SLOTS_PER_STEP as usize);
        // The rest of the on-time slots stay due.
        assert_eq!(d.next, Some(utc(2026, 1, 1, 12, 9, 30)));
        assert!(d.skipped.is_some());
    }

    #[test]
    fn slot_keys_name_the_schedule_and_the_second() {
        let id = uuid::Uuid::nil();
        assert_eq!(
            slot_key(id, utc(2026, 3, 29, 1, 0, 0)),
            "schedule:00000000-0000-0000-0000-000000000000:2026-03-29T01:00:00Z"
        );
    }
}
