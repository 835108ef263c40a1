//! The handler contract: what a handler gets, what it answers, and the registry that maps task
//! types to handlers and time limits.

use crate::domain::TaskId;
use futures::future::BoxFuture;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::TaskType;

/// What a handler is given.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub task_id: TaskId,
    pub task_type: TaskType,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub payload: Value,
    /// `{task_id}:{attempt}`: stable across redeliveries of the same attempt, so providers that
    /// accept an idempotency key can drop a repeated request.
    pub idempotency_key: String,
    /// The trace the task belongs to (its attempt's span continues it).
    pub trace: Option<crate::domain::TraceContext>,
}

/// A failed attempt, and what to do next. Retry and dead-lettering are decided from this type,
/// never from the message text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    /// It may work later; `retry_after` is the least wait the provider asked for, if any.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// It will never work (a bad address, a rejected request): dead-letter the task at once.
    #[error("{message}")]
    Permanent { message: String },
}

impl HandlerError {
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError::Permanent {
            message: message.into(),
        }
    }
}

/// A successful attempt reports a result document (provider ids and the like), recorded in the
/// `attempt_succeeded` event.
pub type HandlerResult = Result<Value, HandlerError>;

/// Runs tasks of one or more types.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, task: &'a TaskContext) -> BoxFuture<'a, HandlerResult>;

    /// Waits for this task's turn with its provider (a rate limit). The worker awaits it before
    /// the handler's time limit starts, so waiting for a turn never times an attempt out. The
    /// default has no turn to wait for.
    fn slot<'a>(&'a self, _task: &'a TaskContext) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The time limit of a handler when none is configured for its type.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Task type → handler and time limit.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<TaskType, Arc<dyn Handler>>,
    timeouts: HashMap<TaskType, Duration>,
    default_timeout: Option<Duration>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `handler` for `task_type` (replacing any other).
    pub fn register(mut self, task_type: TaskType, handler: Arc<dyn Handler>) -> Registry {
        self.handlers.insert(task_type, handler);
        self
    }

    /// Sets the time limit of one type.
    pub fn with_timeout(mut self, task_type: TaskType, timeout: Duration) -> Registry {
        self.timeouts.insert(task_type, timeout);
        self
    }

    /// Sets the time limit of types without one of their own.
    pub fn with_default_timeout(mut self, timeout: Duration) -> Registry {
        self.default_timeout = Some(timeout);
        self
    }

    pub fn handler(&self, task_type: TaskType) -> Option<Arc<dyn Handler>> {
        self.handlers.get(&task_type).cloned()
    }

    pub fn timeout(&self, task_type: TaskType) -> Duration {
        self.timeouts
            .get(&task_type)
            .copied()
            .or(self.default_timeout)
            .unwrap_or(DEFAULT_TIMEOUT)
    }
}
