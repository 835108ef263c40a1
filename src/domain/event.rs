//! The events of a task's life, their stable names and the hash chain that makes history
//! tamper-evident.
//!
//! Every event is stored with a SHA-256 over its canonical content ([`canonical_bytes`]) and the
//! hash of the previous event of the same task, so editing, removing or reordering any stored
//! event breaks the chain at that point.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::payload::TaskType;

/// What the failed attempt tells the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler said it may work later.
    Retryable,
    /// The handler said it will never work.
    Permanent,
    /// The handler ran past its time limit.
    Timeout,
    /// The worker holding the attempt stopped renewing its lease (it died or hung).
    LeaseExpired,
}

/// One thing that happened to a task. The serde tag is the stable event type name stored in
/// `task_events.event_type`; the data is the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskEvent {
    /// The task was accepted.
    Enqueued {
        task_type: TaskType,
        payload: Value,
        max_attempts: i32,
        run_at: DateTime<Utc>,
        idempotency_key: Option<String>,
        /// Cache keys or glob patterns to drop once the task succeeds (absent when none, so
        /// events stored before the field existed keep their canonical form and hash).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        invalidates: Vec<String>,
        /// Who the task belongs to (absent when empty, so older events keep their hash).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        owner: String,
        /// The W3C trace context of the request that enqueued the task (absent in events
        /// stored before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<super::TraceContext>,
    },
    /// The relay put a delivery for `attempt` on the Redis queue.
    Dispatched { attempt: i32 },
    /// A worker claimed `attempt` and holds its lease until `lease_expires_at`.
    AttemptStarted {
        attempt: i32,
        worker_id: Uuid,
        lease_expires_at: DateTime<Utc>,
    },
    /// The handler finished; `result` is what it reported (provider ids and the like).
    AttemptSucceeded {
        attempt: i32,
        result: Value,
        duration_ms: i64,
    },
    /// The attempt failed.
    AttemptFailed {
        attempt: i32,
        kind: FailureKind,
        error: String,
        duration_ms: i64,
    },
    /// Another attempt will be delivered at `available_at`.
    RetryScheduled {
        next_attempt: i32,
        delay_ms: i64,
        available_at: DateTime<Utc>,
    },
    /// The worker gave the attempt back unfinished (it is shutting down): the task is queued
    /// again and the same attempt number runs again, with the same idempotency key.
    AttemptReleased { attempt: i32, reason: String },
    /// The worker that held `attempt` stopped its handler because it no longer held the lease
    /// (another process took the attempt over after the lease ran out). An audit record only:
    /// the attempt's end was recorded by whoever took it over.
    AttemptStopped {
        attempt: i32,
        worker_id: Uuid,
        reason: String,
    },
    /// The task will not run again by itself.
    DeadLettered { reason: String },
    /// An operator gave a dead task a new attempt budget.
    Requeued { max_attempts: i32, by: String },
    /// An operator cancelled the task.
    Cancelled { reason: String, by: String },
    /// An admin erased the task's personal data: its data key was destroyed, so the sealed
    /// fields of its payload and results can no longer be read (the events stay, and verify).
    Erased { reason: String, by: String },
}

/// The kind of a [`TaskEvent`], without its data: what the projectors and the read models
/// count and match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    Enqueued,
    Dispatched,
    AttemptStarted,
    AttemptSucceeded,
    AttemptFailed,
    RetryScheduled,
    AttemptReleased,
    AttemptStopped,
    DeadLettered,
    Requeued,
    Cancelled,
    Erased,
}

impl EventType {
    pub const ALL: [EventType; 12] = [
        EventType::Enqueued,
        EventType::Dispatched,
        EventType::AttemptStarted,
        EventType::AttemptSucceeded,
        EventType::AttemptFailed,
        EventType::RetryScheduled,
        EventType::AttemptReleased,
        EventType::AttemptStopped,
        EventType::DeadLettered,
        EventType::Requeued,
        EventType::Cancelled,
        EventType::Erased,
    ];

    /// The stable name stored in `task_events.event_type` (the serde tag of [`TaskEvent`]).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Enqueued => "enqueued",
            EventType::Dispatched => "dispatched",
            EventType::AttemptStarted => "attempt_started",
            EventType::AttemptSucceeded => "attempt_succeeded",
            EventType::AttemptFailed => "attempt_failed",
            EventType::RetryScheduled => "retry_scheduled",
            EventType::AttemptReleased => "attempt_released",
            EventType::AttemptStopped => "attempt_stopped",
            EventType::DeadLettered => "dead_lettered",
            EventType::Requeued => "requeued",
            EventType::Cancelled => "cancelled",
            EventType::Erased => "erased",
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

/// An event type name this version does not know (a newer version may have written it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl TaskEvent {
    /// The event's kind.
    pub fn event_type(&self) -> EventType {
        match self {
            TaskEvent::Enqueued { .. } => EventType::Enqueued,
            TaskEvent::Dispatched { .. } => EventType::Dispatched,
            TaskEvent::AttemptStarted { .. } => EventType::AttemptStarted,
            TaskEvent::AttemptSucceeded { .. } => EventType::AttemptSucceeded,
            TaskEvent::AttemptFailed { .. } => EventType::AttemptFailed,
            TaskEvent::RetryScheduled { .. } => EventType::RetryScheduled,
            TaskEvent::AttemptReleased { .. } => EventType::AttemptReleased,
            TaskEvent::AttemptStopped { .. } => EventType::AttemptStopped,
            TaskEvent::DeadLettered { .. } => EventType::DeadLettered,
            TaskEvent::Requeued { .. } => EventType::Requeued,
            TaskEvent::Cancelled { .. } => EventType::Cancelled,
            TaskEvent::Erased { .. } => EventType::Erased,
        }
    }

    /// The stable type name stored with the event.
    pub fn type_name(&self) -> &'static str {
        self.event_type().as_str()
    }

    /// Schema version of the event's data; bump when a field changes meaning.
    pub fn version(&self) -> i16 {
        1
    }

    /// The event's data without the type tag, as stored in `task_events.data`.
    pub fn data(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("events serialize to JSON");
        if let Value::Object(map) = &mut v {
            map.remove("type");
        }
        v
    }

    /// Rebuilds an event from its stored type name and data.
    pub fn from_stored(type_name: &str, data: &Value) -> Result<TaskEvent, serde_json::Error> {
        let mut v = data.clone();
        if let Value::Object(map) = &mut v {
            map.insert("type".into(), Value::String(type_name.into()));
        }
        serde_json::from_value(v)
    }
}

/// Text from outside (a provider's answer, an error message) as Postgres can store it: NUL,
/// which `text` and `jsonb` refuse, becomes U+FFFD. An outcome that cannot be stored would be
/// lost, and the attempt run again.
pub fn storable_text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

/// A JSON document from outside as Postgres can store it and give back: NUL in strings and keys
/// replaced (see [`storable_text`]), numbers beyond ±1e300 kept as their text.
pub fn storable_json(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(storable_text(s)),
        Value::Number(n) if n.as_f64().is_some_and(|f| f.abs() > 1e300) => {
            Value::String(n.to_string())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(storable_json).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (storable_text(k), storable_json(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Postgres keeps microseconds: every timestamp that is hashed is cut to them first.
pub fn db_time(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Makes `v` what jsonb gives back, so that an event's hash, computed before it is stored, holds
/// for the stored copy: `-0.0` becomes `0.0` (Postgres's numeric has no negative zero). Other
/// numbers already come back as they went in (serde_json writes the shortest form that reads
/// back as the same number, and numeric keeps every digit).
pub fn jsonb_stable(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() && n.as_f64().is_some_and(|f| f == 0.0) => {
            *v = Value::from(0.0);
        }
        Value::Array(items) => items.iter_mut().for_each(jsonb_stable),
        Value::Object(map) => map.values_mut().for_each(jsonb_stable),
        _ => {}
    }
}

/// The form of an event's hash new events are stored with (see [`event_hash`]).
pub const HASH_VERSION: i16 = 2;

/// The canonical JSON document of an event: sorted keys holding the task id, the sequence
/// number, the type name and version, the data and the time, in that fixed form; from hash
/// version 2 on also `"hash_version"`, so a document of one version never reads as another's.
pub fn canonical_bytes(
    hash_version: i16,
    task_id: Uuid,
    sequence: i32,
    event_type: &str,
    event_version: i16,
    data: &Value,
    occurred_at: DateTime<Utc>,
) -> Vec<u8> {
    /// The document, fields in key order (serde_json's map, and so `data`, is ordered by key
    /// too): serialized as is, without copying `data` into a map first.
    #[derive(Serialize)]
    struct Canonical<'a> {
        data: &'a Value,
        event_type: &'a str,
        event_version: i16,
        #[serde(skip_serializing_if = "Option::is_none")]
        hash_version: Option<i16>,
        occurred_at: String,
        sequence: i32,
        task_id: Uuid,
    }
    serde_json::to_vec(&Canonical {
        data,
        event_type,
        event_version,
        hash_version: (hash_version >= 2).then_some(hash_version),
        occurred_at: db_time(occurred_at).to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        sequence,
        task_id,
    })
    .expect("canonical document serializes")
}

/// Where and when an event was stored: its global position and `recorded_at`, which hash
/// version 2 covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
}

/// An event's hash. Version 1: `SHA-256(prev_hash || document)`. Version 2:
/// `SHA-256(prev_hash || document || position || recorded_at)`, the last two as 8 bytes
/// big-endian (`recorded_at` in microseconds since the Unix epoch), which is what the SQL
/// function `event_hash_v2` computes. The first event of a task chains to 32 zero bytes.
pub fn event_hash(
    prev_hash: Option<&[u8]>,
    document: &[u8],
    placed: Option<Placement>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash.unwrap_or(&[0u8; 32]));
    h.update(document);
    if let Some(p) = placed {
        h.update(p.position.to_be_bytes());
        h.update(db_time(p.recorded_at).timestamp_micros().to_be_bytes());
    }
    h.finalize().into()
}

/// `SHA-256(prev_hash || canonical)` (hash version 1, and the schedules' chains); the first event
/// chains to 32 zero bytes.
pub fn chain_hash(prev_hash: Option<&[u8]>, canonical: &[u8]) -> [u8; 32] {
    event_hash(prev_hash, canonical, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_name_parses_back_and_is_unique() {
        let names: std::collections::BTreeSet<&str> =
            EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names.len(), EventType::ALL.len());
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
        }
        assert!("attempt_exploded".parse::<EventType>().is_err());
    }
    use serde_json::json;

    #[test]
    fn the_canonical_form_is_the_sorted_json_document() {
        let id = Uuid::now_v7();
        let at = Utc::now();
        let data = json!({"payload": {"to": "a@example.com", "b": [1, {"z": null, "a": "é\\\"\u{1}"}]},
                          "task_type": "send_email", "max_attempts": 3});
        let expected = serde_json::to_vec(&json!({
            "task_id": id,
            "sequence": 7,
            "event_type": "enqueued",
            "event_version": 2,
            "data": data,
            "occurred_at": db_time(at).to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        }))
        .unwrap();
        assert_eq!(
            canonical_bytes(1, id, 7, "enqueued", 2, &data, at),
            expected
        );
        // version 2 adds the key `hash_version`, in its sorted place
        let mut v2: Value = serde_json::from_slice(&expected).unwrap();
        v2["hash_version"] = json!(2);
        assert_eq!(
            canonical_bytes(2, id, 7, "enqueued", 2, &data, at),
            serde_json::to_vec(&v2).unwrap()
        );
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let e = TaskEvent::AttemptFailed {
            attempt: 2,
            kind: FailureKind::LeaseExpired,
            error: "worker stopped".into(),
            duration_ms: 30_000,
        };
        assert_eq!(e.type_name(), "attempt_failed");
        let data = e.data();
        assert!(data.get("type").is_none());
        assert_eq!(data["kind"], json!("lease_expired"));
        assert_eq!(TaskEvent::from_stored(e.type_name(), &data).unwrap(), e);
    }

    #[test]
    fn the_hash_covers_every_field_and_the_previous_link() {
        let id = Uuid::nil();
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let base = canonical_bytes(1, id, 1, "enqueued", 1, &json!({"a": 1, "b": [1, 2]}), t);
        // key order of the data does not matter, nanoseconds below the microsecond do not either
        let same = canonical_bytes(
            1,
            id,
            1,
            "enqueued",
            1,
            &serde_json::from_str(r#"{"b":[1,2],"a":1}"#).unwrap(),
            db_time(t),
        );
        assert_eq!(base, same);
        let h = chain_hash(None, &base);
        assert_ne!(h, chain_hash(Some(&[1u8; 32]), &base));
        let variants = [
            canonical_bytes(
                1,
                Uuid::from_u128(1),
                1,
                "enqueued",
                1,
                &json!({"a": 1, "b": [1, 2]}),
                t,
            ),
            canonical_bytes(1, id, 2, "enqueued", 1, &json!({"a": 1, "b": [1, 2]}), t),
            canonical_bytes(1, id, 1, "dispatched", 1, &json!({"a": 1, "b": [1, 2]}), t),
            canonical_bytes(1, id, 1, "enqueued", 2, &json!({"a": 1, "b": [1, 2]}), t),
            canonical_bytes(1, id, 1, "enqueued", 1, &json!({"a": 2, "b": [1, 2]}), t),
            canonical_bytes(
                1,
                id,
                1,
                "enqueued",
                1,
                &json!({"a": 1, "b": [1, 2]}),
                t + chrono::Duration::microseconds(1),
            ),
        ];
        for v in variants {
            assert_ne!(chain_hash(None, &v), h);
        }
    }

    #[test]
    fn version_2_covers_the_position_and_the_recording_time() {
        let t = DateTime::parse_from_rfc3339("2026-11-30T03:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let doc = canonical_bytes(2, Uuid::nil(), 1, "enqueued", 1, &json!({}), t);
        let placed = Placement {
            position: (1234 << 20) + 7,
            recorded_at: t,
        };
        let h = event_hash(None, &doc, Some(placed));
        // the formula, spelled out: prev (zeros) || document || position || microseconds
        let mut d = Sha256::new();
        d.update([0u8; 32]);
        d.update(&doc);
        d.update(((1234i64 << 20) + 7).to_be_bytes());
        d.update(1_796_007_845_123_456i64.to_be_bytes());
        assert_eq!(h, <[u8; 32]>::from(d.finalize()));
        assert_ne!(
            h,
            chain_hash(None, &doc),
            "version 1 leaves the placement out"
        );
        let moved = Placement {
            position: placed.position + 1,
            ..placed
        };
        let later = Placement {
            recorded_at: t + chrono::Duration::microseconds(1),
            ..placed
        };
        assert_ne!(event_hash(None, &doc, Some(moved)), h);
        assert_ne!(event_hash(None, &doc, Some(later)), h);
    }
}
