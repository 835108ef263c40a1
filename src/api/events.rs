//! `/events`: the global event log for auditors, in commit-safe order.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};

use super::auth::{BearerAuth, Role};
use super::error::{Failure, ListFailures, VerifyFailures};
use super::model::{Event, EventPage};
use super::tasks::{verdict, VerifyResponse};
use super::ApiContext;
use crate::store::events;

#[derive(Tags)]
enum ApiTags {
    /// The global, tamper-evident event log.
    Events,
}

/// A signed checkpoint of the log (see README, "Audit"); binary fields are hex.
#[derive(
    Debug, Clone, PartialEq, Eq, poem_openapi::Object, serde::Serialize, serde::Deserialize,
)]
pub struct CheckpointView {
    /// 1, 2, 3, ...
    pub seq: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// It covers the events whose position is below this.
    pub upto_position: i64,
    /// Task heads it records.
    pub tasks: i32,
    pub merkle_root: String,
    /// The previous checkpoint's hash (absent for the first).
    #[oai(skip_serializing_if_is_none)]
    pub prev_hash: Option<String>,
    /// SHA-256 over the number, `upto_position`, `tasks`, `merkle_root` and `prev_hash`.
    pub hash: String,
    /// The Ed25519 key it is signed with.
    pub public_key: String,
    /// The Ed25519 signature of `hash`.
    pub signature: String,
}

impl From<crate::store::checkpoints::Checkpoint> for CheckpointView {
    fn from(c: crate::store::checkpoints::Checkpoint) -> Self {
        CheckpointView {
            seq: c.seq,
            created_at: c.created_at,
            upto_position: c.upto_position,
            tasks: c.tasks,
            merkle_root: hex::encode(c.merkle_root),
            prev_hash: c.prev_hash.map(hex::encode),
            hash: hex::encode(c.hash),
            public_key: hex::encode(c.public_key),
            signature: hex::encode(c.signature),
        }
    }
}

impl TryFrom<CheckpointView> for crate::store::checkpoints::Checkpoint {
    type Error = String;

    /// Reads an exported checkpoint back (hex fields decoded).
    fn try_from(v: CheckpointView) -> Result<Self, String> {
        let bytes = |field: &str, s: &str| {
            hex::decode(s).map_err(|_| format!("checkpoint {}: {field} is not hex", v.seq))
        };
        Ok(crate::store::checkpoints::Checkpoint {
            seq: v.seq,
            created_at: v.created_at,
            upto_position: v.upto_position,
            tasks: v.tasks,
            merkle_root: bytes("merkle_root", &v.merkle_root)?,
            prev_hash: v
                .prev_hash
                .as_deref()
                .map(|p| bytes("prev_hash", p))
                .transpose()?,
            hash: bytes("hash", &v.hash)?,
            public_key: bytes("public_key", &v.public_key)?,
            signature: bytes("signature", &v.signature)?,
        })
    }
}

/// A page of checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, poem_openapi::Object, serde::Deserialize)]
pub struct CheckpointPage {
    pub checkpoints: Vec<CheckpointView>,
    /// Pass as `after` to continue: the last number returned, or the `after` given.
    pub next_after: i64,
}

#[derive(ApiResponse)]
pub enum CheckpointsResponse {
    /// A page of checkpoints, oldest first.
    #[oai(status = 200)]
    Ok(Json<CheckpointPage>),
}

#[derive(ApiResponse)]
pub enum LogResponse {
    /// A page of the log.
    #[oai(status = 200)]
    Ok(
        Json<EventPage>,
        /// `primary`, or `replica` when a streaming standby (`DATABASE_READ_URL`) served it.
        #[oai(header = "Arnela-Read-Source")]
        String,
        /// How far behind the primary the answer may be, in milliseconds (0 from the primary).
        #[oai(header = "Arnela-Read-Lag-Ms")]
        u64,
    ),
}

pub struct EventsApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Events")]
impl EventsApi {
    /// Read the global event log
    ///
    /// Events after position `after`, in position order. Only events of transactions that have
    /// ended (together with every older transaction) are returned, so a reader that always
    /// continues from `next_after` never skips an event, even one whose transaction committed
    /// late. An empty page means nothing new has committed yet: poll again.
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/events", method = "get", operation_id = "read_event_log")]
    async fn log(
        &self,
        auth: BearerAuth,
        /// The last position already read (0 to start from the beginning).
        #[oai(validator(minimum(value = "0")))]
        after: Query<Option<i64>>,
        /// Page size (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
    ) -> Result<LogResponse, Failure<ListFailures>> {
        auth.require(&[Role::Auditor])?;
        let after = after.0.unwrap_or(0);
        let limit = limit.0.unwrap_or(100);
        let (mut rows, source) = self
            .ctx
            .reads
            .read(|pool| async move { events::global_log(&pool, after, i64::from(limit)).await })
            .await?;
        self.ctx.open_events(&mut rows).await?;
        let next_after = rows.last().map_or(after, |e| e.position);
        Ok(LogResponse::Ok(
            Json(EventPage {
                events: rows.into_iter().map(Event::from).collect(),
                next_after,
            }),
            source.name().to_owned(),
            source.lag_ms(),
        ))
    }

    /// Read the signed checkpoints
    ///
    /// The checkpoints after number `after`, oldest first, for an auditor to keep outside the
    /// database and check against the public key they were given (`arnela audit verify` checks
    /// them against the log). Empty when `AUDIT_SIGNING_KEY` was never set.
    ///
    /// Roles: auditor, admin.
    #[oai(
        path = "/audit/checkpoints",
        method = "get",
        operation_id = "read_audit_checkpoints"
    )]
    async fn checkpoints(
        &self,
        auth: BearerAuth,
        /// The last checkpoint number already read (0 to start from the first).
        #[oai(validator(minimum(value = "0")))]
        after: Query<Option<i64>>,
        /// Page size (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
    ) -> Result<CheckpointsResponse, Failure<ListFailures>> {
        auth.require(&[Role::Auditor])?;
        let after = after.0.unwrap_or(0);
        let rows = crate::store::checkpoints::page(
            &self.ctx.pool,
            after,
            i64::from(limit.0.unwrap_or(100)),
        )
        .await?;
        let next_after = rows.last().map_or(after, |c| c.seq);
        let checkpoints = rows.into_iter().map(CheckpointView::from).collect();
        Ok(CheckpointsResponse::Ok(Json(CheckpointPage {
            checkpoints,
            next_after,
        })))
    }

    /// An auditor's verdict on one task's hash chain
    ///
    /// Recomputes every event's hash from its stored content and checks the links, the
    /// numbering and that the task's projection points at the last event, as `arnela audit
    /// verify --task` does (the same verdict as `GET /tasks/{id}/verify`). 404 when the task has
    /// neither events nor a projection row.
    ///
    /// Roles: auditor, admin.
    #[oai(
        path = "/audit/verify/:task_id",
        method = "get",
        operation_id = "audit_verify_task"
    )]
    async fn verify(
        &self,
        auth: BearerAuth,
        task_id: Path<uuid::Uuid>,
    ) -> Result<VerifyResponse, Failure<VerifyFailures>> {
        auth.require(&[Role::Auditor])?;
        Ok(VerifyResponse::Ok(Json(
            verdict(&self.ctx.pool, task_id.0).await?,
        )))
    }
}
