//! The documents the API exchanges, and their conversion from store rows.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::TaskStatus;
use crate::store::events::StoredEvent;

/// The kinds of task.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Enum, serde::Serialize, serde::Deserialize,
)]
#[oai(
    rename = "TaskType",
    rename_all = "snake_case",
    remote = "crate::domain::TaskType"
)]
#[serde(rename_all = "snake_case")]
pub enum TaskTypeName {
    SendEmail,
    SendSms,
    SendWhatsapp,
    SyncCalendar,
}

/// Where a task is in its life: `queued` (waiting, possibly not yet due), `running` (a worker
/// holds the attempt), `retrying` (an attempt failed, the next is scheduled), `succeeded`, `dead`
/// (out of attempts or failed for good) or `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(
    rename = "TaskStatus",
    rename_all = "snake_case",
    remote = "crate::domain::TaskStatus"
)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatusName {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Dead,
    Cancelled,
}

/// Why an attempt failed: `retryable` (may work later), `permanent` (never will), `timeout`
/// (ran past its time limit), `lease_expired` (its worker stopped renewing the lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(
    rename = "FailureKind",
    rename_all = "snake_case",
    remote = "crate::domain::FailureKind"
)]
#[serde(rename_all = "snake_case")]
pub enum FailureKindName {
    Retryable,
    Permanent,
    Timeout,
    LeaseExpired,
}

/// A task to enqueue, as the handler reads it: loosely typed, so that
/// [`crate::domain::validate_payload`] can name the field that is wrong. The spec documents it
/// as [`super::contract::TaskRequest`].
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

/// Up to 1000 tasks to enqueue in one transaction, all or nothing (documented as
/// [`super::contract::TaskBatch`]).
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
    pub task_type: TaskTypeName,
    /// The payload of the task's type, as it was enqueued; its personal fields read
    /// `"[erased]"` once the task was erased (`POST /tasks/{id}/erase`).
    pub payload: Value,
    pub status: TaskStatusName,
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
    /// Who the task belongs to: the enqueuing token's tenant, else its subject (empty for
    /// tasks written before owners were recorded).
    #[serde(default)]
    pub owner: String,
}

impl From<crate::domain::Task> for TaskView {
    fn from(r: crate::domain::Task) -> Self {
        TaskView {
            id: r.id.into(),
            task_type: r.task_type.into(),
            payload: r.payload,
            status: r.status.into(),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            idempotency_key: r.idempotency_key,
            last_error: r.last_error,
            version: r.version,
            lease_expires_at: r.lease_expires_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            owner: r.owner,
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

/// One event of a task's history (documented as [`super::contract::Event`], whose members
/// type `data` per event type).
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
    /// SHA-256 (hex) over `prev_hash` and this event's canonical content; from `hash_version` 2
    /// on also over `position` and `recorded_at`.
    pub hash: String,
    /// The form of `hash` (1 or 2).
    pub hash_version: i16,
    /// The hash of the previous event of the same task (absent for the first).
    #[oai(skip_serializing_if_is_none)]
    pub prev_hash: Option<String>,
}

impl From<StoredEvent> for EventView {
    fn from(e: StoredEvent) -> Self {
        EventView {
            position: e.position,
            task_id: e.task_id.into(),
            sequence: e.sequence,
            event_type: e.event_type,
            version: i32::from(e.event_version),
            data: e.data,
            occurred_at: e.occurred_at,
            recorded_at: e.recorded_at,
            hash: hex::encode(e.hash),
            hash_version: e.hash_version,
            prev_hash: e.prev_hash.map(hex::encode),
        }
    }
}

/// A page of the global event log.
#[derive(Object)]
pub struct EventPage {
    pub events: Vec<Event>,
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
    pub task_type: TaskTypeName,
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
    pub by_status: StatusCounts,
}

/// How many tasks of a type are in each status now (`by_status` of [`TypeStats`]).
#[derive(Debug, Clone, Default, PartialEq, Object, serde::Serialize, serde::Deserialize)]
pub struct StatusCounts {
    pub queued: i64,
    pub running: i64,
    pub retrying: i64,
    pub succeeded: i64,
    pub dead: i64,
    pub cancelled: i64,
}

impl StatusCounts {
    pub fn set(&mut self, status: TaskStatus, n: i64) {
        *match status {
            TaskStatus::Queued => &mut self.queued,
            TaskStatus::Running => &mut self.running,
            TaskStatus::Retrying => &mut self.retrying,
            TaskStatus::Succeeded => &mut self.succeeded,
            TaskStatus::Dead => &mut self.dead,
            TaskStatus::Cancelled => &mut self.cancelled,
        } = n;
    }
}

/// The task statistics of the operators' dashboard.
#[derive(Debug, Clone, PartialEq, Object, serde::Serialize, serde::Deserialize)]
pub struct TaskStats {
    pub types: Vec<TypeStats>,
    /// The log position the totals include at least (the `totals` projector's checkpoint).
    pub projected_through: i64,
}

/// An event as the API sends it: documented per event type, written as [`EventView`].
pub type Event = super::contract::Documented<super::contract::Event, EventView>;

impl From<StoredEvent> for Event {
    fn from(e: StoredEvent) -> Self {
        super::contract::Documented::new(EventView::from(e))
    }
}
