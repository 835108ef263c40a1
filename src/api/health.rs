//! `/health`: is this instance able to serve, and what are its dependencies doing.

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use std::time::{Duration, Instant};

use super::auth::{BearerAuth, Denied, Role};
use super::error::RETRY_AFTER_SECS;
use super::ApiContext;
use crate::store::replica::State as ReplicaStateOf;
use crate::store::{outbox, projection};

#[derive(Tags)]
enum ApiTags {
    /// Liveness and readiness for operators and orchestrators.
    Health,
}

/// Whether the instance can serve: `healthy` when Postgres and Redis answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
}

/// Whether a dependency answered its ping within the health timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    Connected,
    Disconnected,
}

/// Worker figures.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct WorkerStats {
    /// Successful attempts (`attempt_succeeded` events), cluster-wide since the first event:
    /// counted from the event log by the `totals` projector (unaffected by restarts or the
    /// number of processes).
    pub tasks_processed: i64,
    /// Tasks dead-lettered (`dead_lettered` events), cluster-wide, counted from the event log.
    pub tasks_failed: i64,
    /// Workers in every process whose heartbeat (every 5 s, valid 15 s) is current.
    pub active_workers: i64,
    /// Each live worker process and how many workers it runs.
    pub processes: Vec<ProcessWorkers>,
}

/// One live worker process.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ProcessWorkers {
    /// The process's id (a UUID chosen at start).
    pub process: String,
    pub workers: i64,
}

/// One dependency's check.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct DependencyCheck {
    pub status: Connection,
    /// How long the ping took (up to the health timeout when it did not answer).
    pub latency_ms: f64,
}

/// The dependencies' checks.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct Dependencies {
    pub database: DependencyCheck,
    pub redis: DependencyCheck,
}

/// Whether the read replica serves the audit reads now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// It serves them.
    Serving,
    /// Further behind than `DATABASE_READ_MAX_LAG_MS`: the primary serves them.
    Behind,
    /// Not in recovery (promoted, or a primary): the primary serves them.
    NotStandby,
    /// It does not answer: the primary serves them.
    Unreachable,
    /// It holds another database than the primary's: it is never read.
    OtherDatabase,
}

/// The read replica (`DATABASE_READ_URL`). It does not make the service unhealthy: while it
/// cannot serve, the primary does.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ReplicaCheck {
    pub status: ReplicaState,
    /// How far behind the primary it is (absent when it did not answer or is not a standby).
    #[oai(skip_serializing_if_is_none)]
    pub lag_ms: Option<u64>,
}

/// Lengths of the Redis lists.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct QueueDepths {
    /// `arnela:tasks`: deliveries waiting for a worker.
    pub tasks: i64,
    /// `arnela:tasks:processing`: deliveries taken by a worker and not yet acknowledged.
    pub processing: i64,
    /// `arnela:tasks:failed`: copies of dead-lettered tasks and undecodable entries.
    pub failed: i64,
}

/// Outbox rows due and not yet moved to Redis.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct OutboxBacklog {
    pub backlog: i64,
    /// Age of the oldest due row (0 when none).
    pub oldest_due_age_seconds: f64,
}

/// Where a projector is in the event log.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ProjectorStatus {
    /// `totals` or `cache_invalidation`.
    pub name: String,
    /// The last log position applied.
    pub position: i64,
    /// Events applied since the projector first ran.
    pub events: i64,
    /// Age of the oldest committed event not yet applied (0 when caught up).
    pub lag_seconds: f64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The state of the service and its dependencies.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct HealthReport {
    pub status: HealthStatus,
    pub database: Connection,
    pub redis: Connection,
    pub workers: WorkerStats,
    pub dependencies: Dependencies,
    /// Absent when Redis does not answer.
    #[oai(skip_serializing_if_is_none)]
    pub queues: Option<QueueDepths>,
    /// Absent when Postgres does not answer.
    #[oai(skip_serializing_if_is_none)]
    pub outbox: Option<OutboxBacklog>,
    /// Empty when Postgres does not answer.
    pub projectors: Vec<ProjectorStatus>,
    /// Absent when no read replica is configured.
    #[oai(skip_serializing_if_is_none)]
    pub read_replica: Option<ReplicaCheck>,
    /// The delivery channel of each task type: `smtp`, `sendgrid`, `twilio_sms`,
    /// `twilio_whatsapp`, `google_calendar`, or `log` (not configured: messages are only logged).
    pub channels: std::collections::BTreeMap<String, String>,
}

/// Whether this instance can serve: its dependencies answer.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ReadyReport {
    pub status: HealthStatus,
    pub database: Connection,
    pub redis: Connection,
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// Postgres and Redis answer.
    #[oai(status = 200)]
    Healthy(Json<HealthReport>),
    /// Postgres or Redis does not answer within the health timeout.
    #[oai(status = 503)]
    Unhealthy(
        Json<HealthReport>,
        /// Seconds to wait before asking again.
        #[oai(header = "Retry-After")]
        u32,
    ),
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Postgres and Redis answer: send traffic.
    #[oai(status = 200)]
    Ready(Json<ReadyReport>),
    /// Postgres or Redis does not answer within the health timeout.
    #[oai(status = 503)]
    NotReady(
        Json<ReadyReport>,
        /// Seconds to wait before asking again.
        #[oai(header = "Retry-After")]
        u32,
    ),
}

#[derive(ApiResponse)]
pub enum LiveResponse {
    /// The process is up and serving HTTP.
    #[oai(status = 200)]
    Live,
}

pub struct HealthApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Service health, with the details an operator needs
    ///
    /// Pings Postgres and Redis (each with a short timeout, latency reported); 503 when either
    /// does not answer. Adds the Redis queue depths, the outbox backlog, the projectors' lag,
    /// the live worker processes, the cluster-wide task totals projected from events, and the
    /// read replica's state when one is configured.
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self, auth: BearerAuth) -> Result<HealthResponse, Denied> {
        auth.require(&[Role::Auditor])?;
        Ok(self.report().await)
    }

    /// Readiness: may this instance take traffic (Postgres and Redis answer)
    #[oai(path = "/health/ready", method = "get", operation_id = "health_ready")]
    async fn ready(&self) -> ReadyResponse {
        let timeout = self.ctx.health_timeout;
        let (db, redis) = tokio::join!(self.ping_db(timeout), self.ping_redis(timeout));
        let report = ReadyReport {
            status: status_word(db.ok && redis.ok),
            database: db.word(),
            redis: redis.word(),
        };
        if db.ok && redis.ok {
            ReadyResponse::Ready(Json(report))
        } else {
            ReadyResponse::NotReady(Json(report), RETRY_AFTER_SECS)
        }
    }

    /// Liveness: the process answers HTTP (no dependency is checked)
    #[oai(path = "/health/live", method = "get", operation_id = "health_live")]
    async fn live(&self) -> LiveResponse {
        LiveResponse::Live
    }
}

/// One ping's outcome.
struct Ping {
    ok: bool,
    latency_ms: f64,
}

impl Ping {
    fn word(&self) -> Connection {
        if self.ok {
            Connection::Connected
        } else {
            Connection::Disconnected
        }
    }

    fn check(&self) -> DependencyCheck {
        DependencyCheck {
            status: self.word(),
            latency_ms: self.latency_ms,
        }
    }
}

fn status_word(healthy: bool) -> HealthStatus {
    if healthy {
        HealthStatus::Healthy
    } else {
        HealthStatus::Unhealthy
    }
}

/// Runs `f` with the health timeout; `None` (logged) if it fails or times out.
async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health: {what} failed");
            None
        }
        Err(_) => {
            tracing::warn!(?timeout, "health: {what} timed out");
            None
        }
    }
}

impl HealthApi {
    async fn report(&self) -> HealthResponse {
        let timeout = self.ctx.health_timeout;
        let pool = &self.ctx.pool;
        let keys = &self.ctx.keys;
        let (mut c1, mut c2) = (self.ctx.redis.clone(), self.ctx.redis.clone());
        let (db, redis, processes, depths, outbox, totals, checkpoints, replica) = tokio::join!(
            self.ping_db(timeout),
            self.ping_redis(timeout),
            within(
                timeout,
                "listing live workers",
                crate::queue::live_processes(&mut c1, keys)
            ),
            within(
                timeout,
                "reading queue depths",
                crate::queue::depths(&mut c2, keys)
            ),
            within(timeout, "reading the outbox backlog", outbox::backlog(pool)),
            within(timeout, "reading task totals", projection::totals(pool)),
            within(
                timeout,
                "reading projector checkpoints",
                projection::checkpoints(pool)
            ),
            self.ctx.reads.replica_state(),
        );
        let healthy = db.ok && redis.ok;
        let totals = totals.unwrap_or_default();
        let processes = processes.unwrap_or_default();
        let report = HealthReport {
            status: status_word(healthy),
            database: db.word(),
            redis: redis.word(),
            workers: WorkerStats {
                tasks_processed: totals.iter().map(|t| t.succeeded).sum(),
                tasks_failed: totals.iter().map(|t| t.dead).sum(),
                active_workers: processes.iter().map(|p| p.1).sum(),
                processes: processes
                    .into_iter()
                    .map(|(process, workers)| ProcessWorkers { process, workers })
                    .collect(),
            },
            dependencies: Dependencies {
                database: db.check(),
                redis: redis.check(),
            },
            queues: depths.map(|(tasks, processing, failed)| QueueDepths {
                tasks,
                processing,
                failed,
            }),
            outbox: outbox.map(|(backlog, age)| OutboxBacklog {
                backlog,
                oldest_due_age_seconds: age,
            }),
            projectors: checkpoints
                .unwrap_or_default()
                .into_iter()
                .map(|c| ProjectorStatus {
                    name: c.name,
                    position: c.position,
                    events: c.events,
                    lag_seconds: c.lag_seconds,
                    updated_at: c.updated_at,
                })
                .collect(),
            channels: self.ctx.channels.clone(),
            read_replica: replica.map(|(state, lag)| ReplicaCheck {
                status: match state {
                    ReplicaStateOf::Serving => ReplicaState::Serving,
                    ReplicaStateOf::Behind => ReplicaState::Behind,
                    ReplicaStateOf::NotStandby => ReplicaState::NotStandby,
                    ReplicaStateOf::Unreachable => ReplicaState::Unreachable,
                    ReplicaStateOf::OtherDatabase => ReplicaState::OtherDatabase,
                },
                lag_ms: lag.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
            }),
        };
        if healthy {
            HealthResponse::Healthy(Json(report))
        } else {
            HealthResponse::Unhealthy(Json(report), RETRY_AFTER_SECS)
        }
    }

    async fn ping_db(&self, timeout: Duration) -> Ping {
        let started = Instant::now();
        let ping = crate::store::ping(&self.ctx.pool);
        let ok = within(timeout, "database ping", ping).await.is_some();
        Ping {
            ok,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }

    async fn ping_redis(&self, timeout: Duration) -> Ping {
        let started = Instant::now();
        let mut conn = self.ctx.redis.clone();
        let ping = crate::queue::ping(&mut conn, &self.ctx.keys);
        let ok = within(timeout, "redis ping", ping).await.is_some();
        Ping {
            ok,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }
}
