//! The documents the API exchanges, and their conversion from store rows.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde_json::Value;
use uuid::Uuid;

use crate::store::events::StoredEvent;
use crate::store::tasks::TaskRow;

/// A task to enqueue.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// One of `send_email`, `send_sms`, `send_whatsapp`, `sync_calendar`.
    #[oai(rename = "type")]
    pub task_type: String,
    /// The task's data. `send_email`: `{to, subject, body}`; `send_sms` and `send_whatsapp`:
    /// `{phone (E.164), message}`; `sync_calendar`: `{event_id, action: create|update|delete,
    /// appointment_data}` (`appointment_data` may be omitted for `delete`).
    pub payload: Value,
    /// A key that makes the request safe to repeat: the same key again returns the task it
    /// created (1 to 255 characters).
    pub idempotency_key: Option<String>,
    /// Attempts before the task is dead-lettered (1 to 25; default 3).
    pub max_attempts: Option<i32>,
    /// When the task should first run (RFC 3339); default now, at most a year ahead.
    pub run_at: Option<String>,
    /// Cache keys (e.g. `client:42`) or glob patterns (e.g. `appointments:client:*`) to drop once
    /// the task succeeds; each is also published on `arnela:cache:invalidations`. At most 64
    /// entries of 1 to 200 characters; a pattern must start with 3 literal characters.
    pub invalidates: Option<Vec<String>>,
}

/// Up to 1000 tasks to enqueue in one transaction, all or nothing.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct BatchRequest {
    pub tasks: Vec<EnqueueRequest>,
}

/// The current state of a task.
#[derive(Debug, Clone, PartialEq, Object, serde::Serialize, serde::Deserialize)]
pub struct TaskView {
    pub id: Uuid,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub task_type: String,
    pub payload: Value,
    /// `queued`, `running`, `retrying`, `succeeded`, `dead` or `cancelled`.
    pub status: String,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    /// When the next attempt is due.
    pub run_at: DateTime<Utc>,
    /// The key the task was enqueued with; absent when none was given.
    #[oai(skip_serializing_if_is_none)]
    pub idempotency_key: Option<String>,
    /// The error of the last failed attempt, or why the task was dead-lettered; absent when
    /// no attempt has failed.
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
    /// Number of events in the task's history.
    pub version: i32,
    /// Until when the worker running the current attempt holds it; absent when no attempt
    /// is running.
    #[oai(skip_serializing_if_is_none)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<TaskRow> for TaskView {
    fn from(r: TaskRow) -> Self {
        TaskView {
            id: r.id,
            task_type: r.task_type,
            payload: r.payload,
            status: r.status,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            idempotency_key: r.idempotency_key,
            last_error: r.last_error,
            version: r.version,
            lease_expires_at: r.lease_expires_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The outcome of a batch.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct BatchResult {
    /// The tasks in request order (existing ones where an idempotency key was reused).
    pub tasks: Vec<TaskView>,
    /// How many were new.
    pub created: u32,
    /// How many already existed under their idempotency key.
    pub existing: u32,
}

/// A page of tasks.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct TaskPage {
    pub items: Vec<TaskView>,
    /// Pass as `after` to get the next page; absent when this page was not full.
    #[oai(skip_serializing_if_is_none)]
    pub next_after: Option<i64>,
}

/// One event of a task's history.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct EventView {
    /// Position in the global log (commit-safe order).
    pub position: i64,
    pub task_id: Uuid,
    /// 1, 2, 3, ... within the task.
    pub sequence: i32,
    /// `enqueued`, `dispatched`, `attempt_started`, `attempt_succeeded`, `attempt_failed`,
    /// `retry_scheduled`, `dead_lettered`, `requeued` or `cancelled`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    /// Version of the event's data schema.
    pub version: i32,
    pub data: Value,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// SHA-256 (hex) over this event's canonical content and `prev_hash`.
    pub hash: String,
    /// The hash of the previous event of the same task (absent for the first).
    #[oai(skip_serializing_if_is_none)]
    pub prev_hash: Option<String>,
}

impl From<StoredEvent> for EventView {
    fn from(e: StoredEvent) -> Self {
        EventView {
            position: e.position,
            task_id: e.task_id,
            sequence: e.sequence,
            event_type: e.event_type,
            version: i32::from(e.event_version),
            data: e.data,
            occurred_at: e.occurred_at,
            recorded_at: e.recorded_at,
            hash: hex::encode(e.hash),
            prev_hash: e.prev_hash.map(hex::encode),
        }
    }
}

/// A page of the global event log.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `after` to continue: the last position returned, or the `after` given when
    /// nothing new has committed yet.
    pub next_after: i64,
}

/// Figures of one task type: totals counted from the event log, and how many tasks are in each
/// status now.
#[derive(Debug, Clone, PartialEq, Object, serde::Serialize, serde::Deserialize)]
pub struct TypeStats {
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub task_type: String,
    pub enqueued: i64,
    pub attempts_started: i64,
    /// Tasks that finished successfully.
    pub succeeded: i64,
    pub attempts_failed: i64,
    /// Retries scheduled after failed attempts.
    pub retries: i64,
    /// Tasks dead-lettered (failed for good).
    pub dead: i64,
    pub cancelled: i64,
    pub requeued: i64,
    /// Current number of tasks per status (`queued`, `running`, `retrying`, `succeeded`,
    /// `dead`, `cancelled`).
    pub by_status: std::collections::BTreeMap<String, i64>,
}

/// The task statistics of the operators' dashboard.
#[derive(Debug, Clone, PartialEq, Object, serde::Serialize, serde::Deserialize)]
pub struct TaskStats {
    pub types: Vec<TypeStats>,
    /// The log position the totals include at least (the `totals` projector's checkpoint).
    pub projected_through: i64,
}
