//! The task lifecycle as a pure state machine: commands are decided into events, events are
//! applied to state. Nothing here touches a database, a clock or a random source; callers pass
//! the time and the backoff delay in.
//!
//! ```text
//!  enqueued ──▶ queued ──dispatched──▶ queued ──attempt_started──▶ running
//!                 ▲                                                   │
//!                 │ retry_scheduled ◀── attempt_failed (retryable) ◀──┤
//!   retrying ◀────┘                                                   ├─▶ succeeded
//!                                     attempt_failed (last/permanent) ┴─▶ dead ──requeued──▶ queued
//!  queued | retrying ──cancelled──▶ cancelled
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use super::event::{storable_json, storable_text, FailureKind, TaskEvent};
use super::payload::{TaskType, ValidPayload};

/// Default number of attempts a task gets.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
/// The most attempts a task may ask for.
pub const MAX_MAX_ATTEMPTS: i32 = 25;
/// Most attempts a task may have in all, requeues included (the table's check constraint).
pub const MAX_TOTAL_ATTEMPTS: i32 = 100;
/// How far ahead `run_at` may be by default (`SCHEDULE_HORIZON_DAYS`).
pub const DEFAULT_SCHEDULE_HORIZON_DAYS: i64 = 366;

/// A task's identity: the key of its event stream, its projection row and its deliveries.
/// A UUIDv7, so ids sort roughly by creation time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A new id, ordered after every id made before it in this process.
    pub fn new() -> TaskId {
        TaskId(Uuid::now_v7())
    }

    pub const fn from_uuid(id: Uuid) -> TaskId {
        TaskId(id)
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    pub const fn into_uuid(self) -> Uuid {
        self.0
    }

    /// The id's 16 bytes, as hashed into events and checkpoints.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl From<Uuid> for TaskId {
    fn from(id: Uuid) -> TaskId {
        TaskId(id)
    }
}

impl From<TaskId> for Uuid {
    fn from(id: TaskId) -> Uuid {
        id.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(TaskId)
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting to be delivered to a worker (possibly not yet due).
    Queued,
    /// A worker holds the current attempt.
    Running,
    /// An attempt failed; the next one is scheduled.
    Retrying,
    Succeeded,
    /// Out of attempts, or failed permanently.
    Dead,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Retrying,
        TaskStatus::Succeeded,
        TaskStatus::Dead,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Retrying => "retrying",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Dead => "dead",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// No further event happens to a task in this status without an operator.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Dead | TaskStatus::Cancelled
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown task status {s:?}"))
    }
}

/// A command that does not fit the task's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a task that is {status}")]
pub struct InvalidTransition {
    pub action: &'static str,
    pub status: TaskStatus,
}

/// The current state of one task, folded from its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub task_type: TaskType,
    pub payload: Value,
    pub status: TaskStatus,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    /// When the next delivery is due.
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub last_error: Option<String>,
    pub lease_owner: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Sequence number of the last applied event.
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The trace the task belongs to (see [`super::TraceContext`]).
    pub trace: Option<super::TraceContext>,
    /// Who the task belongs to: the enqueuing token's tenant, else its subject (empty for tasks
    /// written before owners were recorded).
    pub owner: String,
}

/// What a producer asks for.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub task_type: TaskType,
    pub payload: ValidPayload,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    /// Cache keys or patterns to drop once the task succeeds (checked by
    /// [`super::payload::validate_invalidates`]).
    pub invalidates: Vec<String>,
    /// Who the task belongs to: the enqueuing token's `tenant` claim, else its subject. Producers
    /// see and deduplicate only their own tasks. Empty for tasks written before owners existed.
    pub owner: String,
    /// The trace of the request that enqueued it.
    pub trace: Option<super::TraceContext>,
}

/// A task that reached `dead`: the copy for the failed list.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub task_id: TaskId,
    pub task_type: TaskType,
    pub attempts: i32,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// What the retry policy decided for a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Deliver the next attempt after this many milliseconds.
    RetryAfterMs(i64),
    /// Give up.
    DeadLetter,
}

impl Task {
    /// The first event of every task.
    pub fn enqueue(new: NewTask) -> TaskEvent {
        TaskEvent::Enqueued {
            task_type: new.task_type,
            payload: new.payload.into_json(),
            max_attempts: new.max_attempts,
            run_at: new.run_at,
            idempotency_key: new.idempotency_key,
            invalidates: new.invalidates,
            owner: new.owner,
            trace: new.trace,
        }
    }

    /// Builds the state from the first event. Panics if it is not `Enqueued`: a stream that
    /// starts otherwise is corrupt and must not be silently folded.
    pub fn from_first(id: TaskId, first: &TaskEvent, at: DateTime<Utc>) -> Task {
        let TaskEvent::Enqueued {
            task_type,
            payload,
            max_attempts,
            run_at,
            idempotency_key,
            trace,
            owner,
            ..
        } = first
        else {
            panic!(
                "a task stream must start with enqueued, not {}",
                first.type_name()
            );
        };
        Task {
            id,
            task_type: *task_type,
            payload: payload.clone(),
            status: TaskStatus::Queued,
            attempts: 0,
            max_attempts: *max_attempts,
            run_at: *run_at,
            idempotency_key: idempotency_key.clone(),
            last_error: None,
            lease_owner: None,
            lease_expires_at: None,
            version: 1,
            created_at: at,
            updated_at: at,
            trace: trace.clone(),
            owner: owner.clone(),
        }
    }

    /// Folds one more event into the state.
    pub fn apply(&mut self, event: &TaskEvent, at: DateTime<Utc>) {
        match event {
            TaskEvent::Enqueued { .. } => {
                panic!("enqueued can only be the first event of a task")
            }
            TaskEvent::Dispatched { .. } | TaskEvent::AttemptStopped { .. } => {}
            TaskEvent::AttemptStarted {
                attempt,
                worker_id,
                lease_expires_at,
            } => {
                self.status = TaskStatus::Running;
                self.attempts = *attempt;
                self.lease_owner = Some(*worker_id);
                self.lease_expires_at = Some(*lease_expires_at);
            }
            TaskEvent::AttemptSucceeded { .. } => {
                // the outcome of an attempt that was cancelled while it ran is recorded, but
                // the task stays cancelled
                if self.status == TaskStatus::Running {
                    self.status = TaskStatus::Succeeded;
                    self.last_error = None;
                }
                self.clear_lease();
            }
            TaskEvent::AttemptFailed { error, .. } => {
                self.last_error = Some(error.clone());
                self.clear_lease();
            }
            TaskEvent::RetryScheduled { available_at, .. } => {
                self.status = TaskStatus::Retrying;
                self.run_at = *available_at;
            }
            TaskEvent::AttemptReleased { attempt, .. } => {
                self.status = TaskStatus::Queued;
                self.attempts = attempt - 1;
                self.run_at = at;
                self.clear_lease();
            }
            TaskEvent::DeadLettered { reason } => {
                self.status = TaskStatus::Dead;
                self.last_error = Some(reason.clone());
                self.clear_lease();
            }
            TaskEvent::Requeued { max_attempts, .. } => {
                self.status = TaskStatus::Queued;
                self.max_attempts = *max_attempts;
                self.run_at = at;
            }
            TaskEvent::Cancelled { .. } => {
                // a running attempt keeps its lease so that its outcome can still be recorded
                self.status = TaskStatus::Cancelled;
            }
            // the data is gone, the state stays
            TaskEvent::Erased { .. } => {}
        }
        self.version += 1;
        self.updated_at = at;
    }

    fn clear_lease(&mut self) {
        self.lease_owner = None;
        self.lease_expires_at = None;
    }

    /// The attempt number the next delivery is for.
    pub fn next_attempt(&self) -> i32 {
        self.attempts + 1
    }

    /// The relay published a delivery.
    pub fn dispatch(&self, attempt: i32) -> Result<TaskEvent, InvalidTransition> {
        match self.status {
            TaskStatus::Queued | TaskStatus::Retrying => Ok(TaskEvent::Dispatched { attempt }),
            status => Err(InvalidTransition {
                action: "dispatch",
                status,
            }),
        }
    }

    /// A worker asks to run the next attempt. Only a due, waiting task can be claimed, so a
    /// second delivery of the same attempt is refused.
    pub fn start_attempt(
        &self,
        worker_id: Uuid,
        now: DateTime<Utc>,
        lease_expires_at: DateTime<Utc>,
    ) -> Result<TaskEvent, InvalidTransition> {
        let waiting = matches!(self.status, TaskStatus::Queued | TaskStatus::Retrying);
        if !waiting || self.run_at > now || self.attempts >= self.max_attempts {
            return Err(InvalidTransition {
                action: "start an attempt of",
                status: self.status,
            });
        }
        Ok(TaskEvent::AttemptStarted {
            attempt: self.next_attempt(),
            worker_id,
            lease_expires_at,
        })
    }

    /// The lease holder reports success.
    pub fn succeed(&self, result: Value, duration_ms: i64) -> Result<TaskEvent, InvalidTransition> {
        self.require_attempt_in_flight("record the success of")?;
        Ok(TaskEvent::AttemptSucceeded {
            attempt: self.attempts,
            result: storable_json(result),
            duration_ms,
        })
    }

    /// The running attempt failed. `decide` is the retry policy's answer for this attempt; a
    /// permanent failure or an exhausted budget is dead-lettered whatever it says.
    pub fn fail(
        &self,
        kind: FailureKind,
        error: String,
        duration_ms: i64,
        now: DateTime<Utc>,
        decide: RetryDecision,
    ) -> Result<Vec<TaskEvent>, InvalidTransition> {
        self.require_attempt_in_flight("record the failure of")?;
        let error = storable_text(error);
        let attempt = self.attempts;
        let mut events = vec![TaskEvent::AttemptFailed {
            attempt,
            kind,
            error: error.clone(),
            duration_ms,
        }];
        if self.status == TaskStatus::Cancelled {
            // cancelled while running: never retried
            return Ok(events);
        }
        let exhausted = attempt >= self.max_attempts;
        match decide {
            RetryDecision::RetryAfterMs(delay_ms)
                if kind != FailureKind::Permanent && !exhausted =>
            {
                events.push(TaskEvent::RetryScheduled {
                    next_attempt: attempt + 1,
                    delay_ms,
                    available_at: now + chrono::Duration::milliseconds(delay_ms),
                });
            }
            _ => {
                let reason = if kind == FailureKind::Permanent {
                    format!("permanent failure on attempt {attempt}: {error}")
                } else if exhausted {
                    format!(
                        "{attempt} of {} attempts failed; last: {error}",
                        self.max_attempts
                    )
                } else {
                    format!("not retried after attempt {attempt}: {error}")
                };
                events.push(TaskEvent::DeadLettered { reason });
            }
        }
        Ok(events)
    }

    /// A delivery that can never run (no handler for its type) goes to dead letters at once.
    pub fn dead_letter(&self, reason: String) -> Result<TaskEvent, InvalidTransition> {
        if self.status.is_terminal() {
            return Err(InvalidTransition {
                action: "dead-letter",
                status: self.status,
            });
        }
        Ok(TaskEvent::DeadLettered {
            reason: storable_text(reason),
        })
    }

    /// An operator gives a dead task `extra_attempts` more attempts.
    pub fn requeue(&self, extra_attempts: i32, by: String) -> Result<TaskEvent, InvalidTransition> {
        if self.status != TaskStatus::Dead {
            return Err(InvalidTransition {
                action: "requeue",
                status: self.status,
            });
        }
        Ok(TaskEvent::Requeued {
            max_attempts: self.attempts + extra_attempts,
            by,
        })
    }

    /// An operator cancels a waiting task; a running one is cancelled too and its outcome, when
    /// it arrives, is not retried; a dead one is discarded (it leaves the dead letters).
    pub fn cancel(&self, reason: String, by: String) -> Result<TaskEvent, InvalidTransition> {
        // a dead task may be cancelled too: the operator discards the dead letter
        if matches!(self.status, TaskStatus::Succeeded | TaskStatus::Cancelled) {
            return Err(InvalidTransition {
                action: "cancel",
                status: self.status,
            });
        }
        Ok(TaskEvent::Cancelled { reason, by })
    }

    /// An admin erases the task's personal data. A task that could still run is cancelled first
    /// (it has nothing left to send); a running one must end first: its handler holds the data.
    pub fn erase(&self, reason: String, by: String) -> Result<Vec<TaskEvent>, InvalidTransition> {
        let erased = TaskEvent::Erased {
            reason: reason.clone(),
            by: by.clone(),
        };
        match self.status {
            TaskStatus::Running => Err(InvalidTransition {
                action: "erase",
                status: self.status,
            }),
            TaskStatus::Succeeded | TaskStatus::Cancelled => Ok(vec![erased]),
            TaskStatus::Queued | TaskStatus::Retrying | TaskStatus::Dead => Ok(vec![
                TaskEvent::Cancelled {
                    reason: format!("erased: {reason}"),
                    by,
                },
                erased,
            ]),
        }
    }

    /// The worker gives the running attempt back unfinished.
    pub fn release(&self, reason: String) -> Result<TaskEvent, InvalidTransition> {
        if self.status != TaskStatus::Running {
            return Err(InvalidTransition {
                action: "release",
                status: self.status,
            });
        }
        Ok(TaskEvent::AttemptReleased {
            attempt: self.attempts,
            reason,
        })
    }

    /// Whether `worker` holds the lease of `attempt` (fencing: only the holder records outcomes).
    pub fn is_held_by(&self, worker: Uuid, attempt: i32) -> bool {
        self.lease_owner == Some(worker)
            && self.attempts == attempt
            && matches!(self.status, TaskStatus::Running | TaskStatus::Cancelled)
    }

    fn require_attempt_in_flight(&self, action: &'static str) -> Result<(), InvalidTransition> {
        let in_flight = self.status == TaskStatus::Running
            || (self.status == TaskStatus::Cancelled && self.lease_owner.is_some());
        if !in_flight {
            return Err(InvalidTransition {
                action,
                status: self.status,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::payload::validate_payload;
    use serde_json::json;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn new_task(max_attempts: i32) -> Task {
        let payload = validate_payload(
            TaskType::SendSms,
            json!({"phone": "+34123456789", "message": "hola"}),
        )
        .unwrap();
        let first = Task::enqueue(NewTask {
            task_type: TaskType::SendSms,
            payload,
            max_attempts,
            run_at: t0(),
            idempotency_key: None,
            invalidates: Vec::new(),
            owner: String::new(),
            trace: None,
        });
        Task::from_first(TaskId::default(), &first, t0())
    }

    fn start(task: &mut Task) {
        let e = task
            .start_attempt(
                Uuid::from_u128(7),
                t0(),
                t0() + chrono::Duration::seconds(30),
            )
            .unwrap();
        task.apply(&e, t0());
    }

    #[test]
    fn erasing_cancels_what_could_still_run_and_waits_for_a_running_attempt() {
        let erase = |t: &Task| t.erase("request".into(), "admin".into());
        let types = |events: Vec<TaskEvent>| -> Vec<&'static str> {
            events.iter().map(TaskEvent::type_name).collect()
        };
        let mut task = new_task(3);
        assert_eq!(types(erase(&task).unwrap()), ["cancelled", "erased"]);
        task.apply(&task.dispatch(1).unwrap(), t0());
        start(&mut task);
        assert!(erase(&task).is_err(), "the handler holds the data");
        task.apply(&task.succeed(json!({}), 1).unwrap(), t0());
        let events = erase(&task).unwrap();
        assert_eq!(types(events.clone()), ["erased"]);
        let version = task.version;
        task.apply(&events[0], t0());
        assert_eq!(
            (task.status, task.version),
            (TaskStatus::Succeeded, version + 1)
        );
    }

    #[test]
    fn a_task_runs_and_succeeds() {
        let mut task = new_task(3);
        assert_eq!(task.status, TaskStatus::Queued);
        task.apply(&task.dispatch(1).unwrap(), t0());
        start(&mut task);
        assert_eq!((task.status, task.attempts), (TaskStatus::Running, 1));
        assert_eq!(task.lease_owner, Some(Uuid::from_u128(7)));
        task.apply(&task.succeed(json!({"sid": "SM1"}), 12).unwrap(), t0());
        assert_eq!(task.status, TaskStatus::Succeeded);
        assert_eq!(task.lease_owner, None);
        assert_eq!(task.version, 4);
    }

    #[test]
    fn outcomes_from_outside_are_made_storable() {
        let mut task = new_task(3);
        start(&mut task);
        let TaskEvent::AttemptSucceeded { result, .. } = task
            .succeed(
                json!({"sid": "SM\u{0}1", "k\u{0}": [1.7976931348623157e308]}),
                1,
            )
            .unwrap()
        else {
            panic!("not a success")
        };
        assert_eq!(
            result,
            json!({"sid": "SM\u{FFFD}1", "k\u{FFFD}": ["1.7976931348623157e+308"]})
        );
        let events = task
            .fail(
                FailureKind::Permanent,
                "bad\u{0}".into(),
                1,
                t0(),
                RetryDecision::DeadLetter,
            )
            .unwrap();
        assert!(events
            .iter()
            .all(|e| !e.data().to_string().contains("\\u0000")));
    }

    #[test]
    fn a_second_claim_of_the_same_attempt_is_refused() {
        let mut task = new_task(3);
        start(&mut task);
        assert!(task.start_attempt(Uuid::from_u128(8), t0(), t0()).is_err());
    }

    #[test]
    fn a_task_is_not_started_before_it_is_due() {
        let task = new_task(3);
        let early = t0() - chrono::Duration::seconds(1);
        assert!(task.start_attempt(Uuid::nil(), early, early).is_err());
    }

    #[test]
    fn a_retryable_failure_schedules_the_next_attempt() {
        let mut task = new_task(3);
        start(&mut task);
        let events = task
            .fail(
                FailureKind::Retryable,
                "503".into(),
                5,
                t0(),
                RetryDecision::RetryAfterMs(2000),
            )
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[1],
            TaskEvent::RetryScheduled {
                next_attempt: 2,
                delay_ms: 2000,
                available_at: t0() + chrono::Duration::seconds(2),
            }
        );
        for e in &events {
            task.apply(e, t0());
        }
        assert_eq!(task.status, TaskStatus::Retrying);
        assert_eq!(task.run_at, t0() + chrono::Duration::seconds(2));
        assert_eq!(task.last_error.as_deref(), Some("503"));
    }

    #[test]
    fn the_last_attempt_and_permanent_errors_dead_letter() {
        let mut task = new_task(1);
        start(&mut task);
        let events = task
            .fail(
                FailureKind::Retryable,
                "503".into(),
                5,
                t0(),
                RetryDecision::RetryAfterMs(10),
            )
            .unwrap();
        assert!(matches!(events[1], TaskEvent::DeadLettered { .. }));

        let mut task = new_task(5);
        start(&mut task);
        let events = task
            .fail(
                FailureKind::Permanent,
                "400 bad number".into(),
                5,
                t0(),
                RetryDecision::RetryAfterMs(10),
            )
            .unwrap();
        let TaskEvent::DeadLettered { reason } = &events[1] else {
            panic!("expected a dead letter")
        };
        assert!(reason.contains("permanent"), "{reason}");
    }

    #[test]
    fn a_released_attempt_runs_again_with_the_same_number() {
        let mut task = new_task(1);
        start(&mut task);
        task.apply(&task.release("shutting down".into()).unwrap(), t0());
        assert_eq!(
            (task.status, task.attempts, task.lease_owner),
            (TaskStatus::Queued, 0, None)
        );
        let again = task.start_attempt(Uuid::nil(), t0(), t0()).unwrap();
        assert!(matches!(
            again,
            TaskEvent::AttemptStarted { attempt: 1, .. }
        ));
    }

    #[test]
    fn an_attempt_cancelled_while_running_is_recorded_but_not_retried() {
        let mut task = new_task(3);
        start(&mut task);
        task.apply(
            &task
                .cancel("no longer needed".into(), "ops".into())
                .unwrap(),
            t0(),
        );
        assert!(task.is_held_by(Uuid::from_u128(7), 1));
        let events = task
            .fail(
                FailureKind::Retryable,
                "503".into(),
                1,
                t0(),
                RetryDecision::RetryAfterMs(5),
            )
            .unwrap();
        assert_eq!(events.len(), 1, "no retry after a cancel: {events:?}");
        for e in &events {
            task.apply(e, t0());
        }
        assert_eq!(
            (task.status, task.lease_owner),
            (TaskStatus::Cancelled, None)
        );

        let mut task = new_task(3);
        start(&mut task);
        task.apply(&task.cancel("x".into(), "ops".into()).unwrap(), t0());
        task.apply(&task.succeed(json!({}), 1).unwrap(), t0());
        assert_eq!(task.status, TaskStatus::Cancelled);
    }

    #[test]
    fn only_a_running_attempt_records_outcomes() {
        let task = new_task(3);
        assert!(task.succeed(json!({}), 1).is_err());
        assert!(task
            .fail(
                FailureKind::Retryable,
                "x".into(),
                1,
                t0(),
                RetryDecision::DeadLetter
            )
            .is_err());
    }

    #[test]
    fn dead_tasks_can_be_requeued_and_waiting_tasks_cancelled() {
        let mut task = new_task(1);
        assert!(task.requeue(3, "ops".into()).is_err());
        start(&mut task);
        for e in task
            .fail(
                FailureKind::Permanent,
                "x".into(),
                1,
                t0(),
                RetryDecision::DeadLetter,
            )
            .unwrap()
        {
            task.apply(&e, t0());
        }
        assert_eq!(task.status, TaskStatus::Dead);
        let later = t0() + chrono::Duration::hours(1);
        task.apply(&task.requeue(3, "ops".into()).unwrap(), later);
        assert_eq!(
            (task.status, task.max_attempts, task.run_at),
            (TaskStatus::Queued, 4, later)
        );
        assert!(task.start_attempt(Uuid::nil(), later, later).is_ok());

        task.apply(
            &task.cancel("duplicate".into(), "ops".into()).unwrap(),
            later,
        );
        assert_eq!(task.status, TaskStatus::Cancelled);
        assert!(task.cancel("again".into(), "ops".into()).is_err());
        assert!(task.start_attempt(Uuid::nil(), later, later).is_err());
    }
}
