//! The pure core: task types and payloads, events, the task state machine and the retry policy.
//! No I/O happens here; every other module depends on this one and not the other way round.

pub mod appointment;
pub mod checkpoint;
pub mod event;
pub mod payload;
pub mod retry;
pub mod schedule;
pub mod sealing;
pub mod task;
pub mod trace;

pub use event::{EventType, FailureKind, TaskEvent};
pub use payload::{validate_invalidates, validate_payload, FieldError, TaskType, ValidPayload};
pub use retry::RetryPolicy;
pub use task::{NewTask, RetryDecision, Task, TaskId, TaskStatus};
pub use trace::TraceContext;
