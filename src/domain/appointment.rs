//! The appointment a `sync_calendar` task carries in `appointment_data`, checked at enqueue with
//! the same rules the calendar channel applies when it sends, so a task that cannot be sent is
//! refused with 422 instead of dying when it runs.

use chrono::{DateTime, Duration, FixedOffset, NaiveDateTime};
use serde_json::{Map, Value};

use super::payload::{is_email, FieldError};

/// The fields the calendar channel reads from `appointment_data`; other fields (the clinic's own
/// ids, say) are kept with the task and ignored when it is sent.
pub const FIELDS: [&str; 8] = [
    "starts_at",
    "ends_at",
    "duration_minutes",
    "time_zone",
    "summary",
    "description",
    "location",
    "attendees",
];
/// Longest appointment, in minutes.
pub const MAX_DURATION_MINUTES: i64 = 24 * 60;
/// Longest `summary` and `location`, in characters.
pub const MAX_SHORT_TEXT: usize = 1024;
/// Longest `description`, in characters.
pub const MAX_DESCRIPTION: usize = 8192;
/// Longest time zone name (IANA names are far shorter).
pub const MAX_TIME_ZONE: usize = 64;
/// Most attendees of one appointment.
pub const MAX_ATTENDEES: usize = 100;

/// A start or end time: with its offset, or local to the event's time zone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EventTime {
    Offset(DateTime<FixedOffset>),
    Local(NaiveDateTime),
}

impl EventTime {
    /// RFC 3339 with an offset, or a local `YYYY-MM-DDTHH:MM[:SS]` without one.
    pub fn parse(s: &str) -> Option<EventTime> {
        DateTime::parse_from_rfc3339(s)
            .map(EventTime::Offset)
            .or_else(|_| {
                NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").map(EventTime::Local)
            })
            .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M").map(EventTime::Local))
            .ok()
    }

    pub fn plus_minutes(self, m: i64) -> EventTime {
        let d = Duration::minutes(m);
        match self {
            EventTime::Offset(t) => EventTime::Offset(t + d),
            EventTime::Local(t) => EventTime::Local(t + d),
        }
    }

    pub fn is_after(&self, other: &EventTime) -> bool {
        match (self, other) {
            (EventTime::Offset(a), EventTime::Offset(b)) => a > b,
            (EventTime::Local(a), EventTime::Local(b)) => a > b,
            // Mixed forms: compare wall-clock times (both are in the event's time zone).
            (EventTime::Offset(a), EventTime::Local(b)) => a.naive_local() > *b,
            (EventTime::Local(a), EventTime::Offset(b)) => *a > b.naive_local(),
        }
    }
}

impl std::fmt::Display for EventTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventTime::Offset(t) => write!(f, "{}", t.to_rfc3339()),
            EventTime::Local(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%S")),
        }
    }
}

/// A checked `appointment_data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Appointment {
    pub starts_at: EventTime,
    /// Given as `ends_at`, or computed from `duration_minutes` (or the channel's default length
    /// when both are absent: `None` here).
    pub ends_at: Option<EventTime>,
    pub duration_minutes: Option<i64>,
    pub time_zone: Option<String>,
    pub summary: Option<String>,
    pub description: Option<String>,
    pub location: Option<String>,
    pub attendees: Vec<String>,
}

impl Appointment {
    /// Checks `appointment_data`; errors name the field under `path`
    /// (e.g. `payload.appointment_data.starts_at`).
    pub fn parse(path: &str, value: &Value) -> Result<Appointment, FieldError> {
        let Value::Object(map) = value else {
            return Err(FieldError::new(
                path,
                "invalid_type",
                "must be a JSON object",
            ));
        };
        let time = |k: &str, example: &str| -> Result<Option<EventTime>, FieldError> {
            text(path, map, k, 64)?
                .map(|s| {
                    EventTime::parse(s).ok_or_else(|| {
                        FieldError::new(
                            format!("{path}.{k}"),
                            "invalid_format",
                            format!("must be a date-time like {example} (the offset may be left out: the time is then local to time_zone)"),
                        )
                    })
                })
                .transpose()
        };
        let starts_at = time("starts_at", "2026-12-01T10:00:00+01:00")?.ok_or_else(|| {
            FieldError::new(format!("{path}.starts_at"), "required", "is required")
        })?;
        let ends_at = time("ends_at", "2026-12-01T10:30:00+01:00")?;
        let duration_minutes = match map.get("duration_minutes") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .filter(|m| (1..=MAX_DURATION_MINUTES).contains(m))
                    .ok_or_else(|| {
                        FieldError::new(
                            format!("{path}.duration_minutes"),
                            "out_of_range",
                            format!(
                                "must be a whole number of minutes, 1 to {MAX_DURATION_MINUTES}"
                            ),
                        )
                    })?,
            ),
        };
        if let Some(end) = ends_at {
            if !end.is_after(&starts_at) {
                return Err(FieldError::new(
                    format!("{path}.ends_at"),
                    "out_of_range",
                    "must be after starts_at",
                ));
            }
        }
        let time_zone = text(path, map, "time_zone", MAX_TIME_ZONE)?;
        if let Some(tz) = time_zone {
            if !tz
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '/'))
            {
                return Err(FieldError::new(
                    format!("{path}.time_zone"),
                    "invalid_format",
                    "must be an IANA time zone name like Europe/Madrid",
                ));
            }
        }
        let attendees = match map.get("attendees") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => {
                if list.len() > MAX_ATTENDEES {
                    return Err(FieldError::new(
                        format!("{path}.attendees"),
                        "too_many",
                        format!("at most {MAX_ATTENDEES} attendees"),
                    ));
                }
                list.iter()
                    .enumerate()
                    .map(|(i, a)| match a.as_str() {
                        Some(e) if is_email(e) => Ok(e.to_owned()),
                        _ => Err(FieldError::new(
                            format!("{path}.attendees[{i}]"),
                            "invalid_format",
                            "must be an e-mail address like name@example.com",
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(_) => {
                return Err(FieldError::new(
                    format!("{path}.attendees"),
                    "invalid_type",
                    "must be a list of e-mail addresses",
                ))
            }
        };
        Ok(Appointment {
            starts_at,
            ends_at,
            duration_minutes,
            time_zone: time_zone.map(str::to_owned),
            summary: text(path, map, "summary", MAX_SHORT_TEXT)?.map(str::to_owned),
            description: text(path, map, "description", MAX_DESCRIPTION)?.map(str::to_owned),
            location: text(path, map, "location", MAX_SHORT_TEXT)?.map(str::to_owned),
            attendees,
        })
    }
}

/// An optional text field: a non-blank string of at most `max` characters.
fn text<'a>(
    path: &str,
    map: &'a Map<String, Value>,
    k: &str,
    max: usize,
) -> Result<Option<&'a str>, FieldError> {
    let field = || format!("{path}.{k}");
    match map.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(FieldError::new(field(), "required", "must not be empty"))
        }
        Some(Value::String(s)) if s.chars().count() > max => Err(FieldError::new(
            field(),
            "too_long",
            format!("the limit is {max} characters"),
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(field(), "invalid_type", "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(v: Value) -> String {
        Appointment::parse("a", &v).unwrap_err().field
    }

    #[test]
    fn times_keep_their_offset_or_stay_local() {
        let t = EventTime::parse("2026-03-29T01:30:00+01:00").unwrap();
        assert_eq!(t.plus_minutes(45).to_string(), "2026-03-29T02:15:00+01:00");
        let local = EventTime::parse("2026-12-01T10:00").unwrap();
        assert_eq!(local.to_string(), "2026-12-01T10:00:00");
        assert!(local.plus_minutes(30).is_after(&local));
    }

    #[test]
    fn a_full_appointment_is_read() {
        let a = Appointment::parse(
            "a",
            &json!({"starts_at": "2026-12-01T10:00:00+01:00", "duration_minutes": 45,
                    "time_zone": "Europe/Madrid", "summary": "Revisión", "attendees": ["ana@example.com"]}),
        )
        .unwrap();
        assert_eq!(a.duration_minutes, Some(45));
        assert_eq!(a.attendees, ["ana@example.com"]);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field_of(json!({"at": "x"})), "a.starts_at");
        assert_eq!(field_of(json!({})), "a.starts_at");
        assert_eq!(field_of(json!({"starts_at": "x"})), "a.starts_at");
        assert_eq!(
            field_of(json!({"starts_at": "2026-12-01T10:00", "ends_at": "2026-12-01T09:00"})),
            "a.ends_at"
        );
        assert_eq!(
            field_of(json!({"starts_at": "2026-12-01T10:00", "duration_minutes": 0})),
            "a.duration_minutes"
        );
        assert_eq!(
            field_of(json!({"starts_at": "2026-12-01T10:00", "attendees": ["x"]})),
            "a.attendees[0]"
        );
        assert_eq!(
            field_of(json!({"starts_at": "2026-12-01T10:00", "time_zone": "Madrid time"})),
            "a.time_zone"
        );
        assert_eq!(field_of(json!([1])), "a");
    }
}
