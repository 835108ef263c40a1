//! `/stats`: the task statistics of the operators' dashboard, served from the cache
//! (`stats:tasks`) and invalidated by the projector whenever events are projected.

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use std::collections::BTreeMap;

use super::auth::{BearerAuth, Role};
use super::error::{ApiError, Failure, StatsFailures};
use super::model::{StatusCounts, TaskStats, TaskTypeName, TypeStats};
use super::ApiContext;
use crate::cache::{keys, Ttl};
use crate::domain::{TaskStatus, TaskType};
use crate::store::projection;
use crate::store::replica::Source;

#[derive(Tags)]
enum ApiTags {
    /// Figures projected from the event log.
    Stats,
}

#[derive(ApiResponse)]
pub enum StatsResponse {
    /// Totals per task type and current counts per status.
    #[oai(status = 200)]
    Ok(
        Json<TaskStats>,
        /// `primary`, or `replica` when a streaming standby (`DATABASE_READ_URL`) served it.
        #[oai(header = "Arnela-Read-Source")]
        String,
        /// How far behind the primary the answer may be, in milliseconds (0 from the primary).
        #[oai(header = "Arnela-Read-Lag-Ms")]
        u64,
    ),
}

pub struct StatsApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Stats")]
impl StatsApi {
    /// Task statistics
    ///
    /// For each task type: totals counted from the event log by the `totals` projector
    /// (enqueued, attempts, successes, failures, retries, dead letters, cancellations) and how
    /// many tasks are in each status now. Served from the cache, or, when a read replica is
    /// configured, from the replica (the headers say which, and how stale it may be).
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/stats", method = "get", operation_id = "task_stats")]
    async fn stats(&self, auth: BearerAuth) -> Result<StatsResponse, Failure<StatsFailures>> {
        auth.require(&[Role::Auditor])?;
        if self.ctx.reads.has_replica() {
            // not cached: a value loaded from a lagging standby after the projector dropped
            // the key would stay in the cache without saying how stale it is
            let (rows, source) = self
                .ctx
                .reads
                .read(|pool| async move { load_rows(&pool).await })
                .await?;
            let stats = build(rows)?;
            return Ok(StatsResponse::Ok(
                Json(stats),
                source.name().to_owned(),
                source.lag_ms(),
            ));
        }
        let pool = &self.ctx.pool;
        let stats = self
            .ctx
            .cache
            .get_or_set(&keys::task_stats(), Ttl::Short, || async {
                build(load_rows(pool).await?)
            })
            .await?;
        let source = Source::Primary;
        Ok(StatsResponse::Ok(
            Json(stats),
            source.name().to_owned(),
            source.lag_ms(),
        ))
    }
}

/// What the statistics are made of: the `totals` projector's checkpoint, its totals, and the
/// counts per type and status.
struct Rows {
    projected_through: i64,
    totals: Vec<projection::TypeTotals>,
    statuses: Vec<(String, String, i64)>,
}

async fn load_rows(pool: &sqlx::PgPool) -> crate::store::Result<Rows> {
    // the checkpoint first: the totals read next include at least this much of the log
    let projected_through = projection::checkpoints(pool)
        .await?
        .into_iter()
        .find(|c| c.name == "totals")
        .map_or(0, |c| c.position);
    let totals = projection::totals(pool).await?;
    let statuses = projection::status_counts(pool).await?;
    Ok(Rows {
        projected_through,
        totals,
        statuses,
    })
}

fn build(rows: Rows) -> Result<TaskStats, ApiError> {
    let Rows {
        projected_through,
        totals,
        statuses,
    } = rows;
    let mut types: BTreeMap<TaskTypeName, TypeStats> = BTreeMap::new();
    let blank = |t: TaskTypeName| TypeStats {
        task_type: t,
        enqueued: 0,
        attempts_started: 0,
        succeeded: 0,
        attempts_failed: 0,
        retries: 0,
        dead: 0,
        cancelled: 0,
        requeued: 0,
        by_status: StatusCounts::default(),
    };
    let task_type = |t: &str| {
        t.parse::<TaskType>()
            .map(TaskTypeName::from)
            .map_err(|e| ApiError::internal(&e))
    };
    for t in totals {
        let name = task_type(&t.task_type)?;
        let s = types.entry(name).or_insert_with(|| blank(name));
        s.enqueued = t.enqueued;
        s.attempts_started = t.attempts_started;
        s.succeeded = t.succeeded;
        s.attempts_failed = t.attempts_failed;
        s.retries = t.retries;
        s.dead = t.dead;
        s.cancelled = t.cancelled;
        s.requeued = t.requeued;
    }
    for (t, status, n) in statuses {
        let name = task_type(&t)?;
        let status = status
            .parse::<TaskStatus>()
            .map_err(|e| ApiError::internal(&e))?;
        types
            .entry(name)
            .or_insert_with(|| blank(name))
            .by_status
            .set(status, n);
    }
    Ok(TaskStats {
        types: types.into_values().collect(),
        projected_through,
    })
}
