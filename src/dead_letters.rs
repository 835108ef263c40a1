//! The copies of dead-lettered tasks on Redis's failed list (`{prefix}:tasks:failed`), through
//! an outbox of their own.
//!
//! A transition that dead-letters a task writes the task's copy to `failed_copies` in its own
//! transaction ([`crate::store::transition::apply`]). [`push_pending`] moves the copies from
//! there to the list: it deletes a batch of rows, pushes their copies and commits, so a copy
//! leaves Postgres only once Redis took it. The process that dead-lettered a task pushes right
//! after its commit; every rescuer pass pushes whatever is left, so a copy that Redis refused,
//! or whose process died before pushing it, reaches the list within a rescuer interval of
//! Redis taking pushes again (README "Recovery bounds").
//!
//! A copy is pushed twice only if the push went through and its transaction's commit then
//! failed; the list is a convenience for operators, and Postgres stays the record.

use sqlx::PgPool;

use crate::engine::StepError;
use crate::queue::{self, Keys, RedisConn, FAILED_LIST_CAP};
use crate::store::{failed_copies, Tx};

/// Copies pushed per transaction (one `MULTI`).
const BATCH: i64 = 1_000;

/// Pushes the copies that wait in `failed_copies`, oldest first, a batch per transaction, and
/// returns how many it pushed. At most [`FAILED_LIST_CAP`] per call (more would be trimmed
/// anyway). Copies another call is pushing are left to it. On an error the batch in hand stays
/// in Postgres for the next call.
pub async fn push_pending(
    pool: &PgPool,
    conn: &mut RedisConn,
    keys: &Keys,
) -> Result<usize, StepError> {
    let mut pushed = 0;
    while pushed < FAILED_LIST_CAP as usize {
        let mut tx = Tx::begin(pool).await?;
        let copies = failed_copies::take(&mut tx, BATCH).await?;
        if copies.is_empty() {
            tx.commit().await?;
            break;
        }
        if let Err(e) = queue::push_failed(conn, keys, &copies).await {
            if let Err(r) = tx.rollback().await {
                // the rows are freed when the server drops the transaction with its connection
                tracing::warn!(error = %r, "cannot roll back after a refused push of dead-letter copies");
            }
            return Err(e.into());
        }
        tx.commit().await?;
        pushed += copies.len();
        if copies.len() < BATCH as usize {
            break;
        }
    }
    Ok(pushed)
}
