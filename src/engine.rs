//! What the engine's loops (relay, workers, rescuer) share: the error that stops one step.

use crate::binding::BindingError;
use crate::queue::QueueError;
use crate::store::StoreError;

/// Why one step of a loop stopped (the loop logs it and carries on with the next).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The Redis namespace serves another database: nothing is published, taken or touched.
    #[error(transparent)]
    Binding(#[from] BindingError),
}

impl From<crate::domain::task::InvalidTransition> for StepError {
    fn from(e: crate::domain::task::InvalidTransition) -> Self {
        StepError::Store(e.into())
    }
}

impl From<redis::RedisError> for StepError {
    fn from(e: redis::RedisError) -> Self {
        StepError::Queue(e.into())
    }
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Store(e.into())
    }
}

impl StepError {
    /// The database could not be reached (connection refused or lost, pool timed out): worth
    /// trying again later, unlike an error the database answered with.
    pub fn is_unavailable(&self) -> bool {
        let StepError::Store(StoreError::Database(e)) = self else {
            return false;
        };
        crate::store::is_unavailable(e)
    }
}
