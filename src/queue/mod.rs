//! Redis as transport: the queue's key names in one place, and the connection.
//!
//! Redis never holds the only copy of a task (Postgres does); the lists are how deliveries travel
//! from the relay to the workers. Every Redis error is returned to the caller.

pub mod keys;

pub use keys::Keys;

use redis::aio::ConnectionManager;

/// Errors of the Redis transport.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("undecodable delivery: {0}")]
    Decode(String),
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// Opens a managed (auto-reconnecting) connection.
pub async fn connect(info: redis::ConnectionInfo) -> Result<ConnectionManager> {
    let client = redis::Client::open(info)?;
    Ok(ConnectionManager::new(client).await?)
}
