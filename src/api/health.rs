//! `/health`: is this instance able to serve, and what are its dependencies doing.

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use std::time::Duration;

use super::auth::{BearerAuth, Denied, Role};
use super::ApiContext;

#[derive(Tags)]
enum ApiTags {
    /// Liveness and readiness for operators and orchestrators.
    Health,
}

/// Worker figures.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct WorkerStats {
    /// Reserved for the cluster-wide total projected from events (not yet projected: 0).
    pub tasks_processed: i64,
    /// Reserved for the cluster-wide total projected from events (not yet projected: 0).
    pub tasks_failed: i64,
    /// Workers in every process whose heartbeat (every 5 s, valid 15 s) is current.
    pub active_workers: i64,
}

/// The state of the service and its dependencies.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct HealthReport {
    /// `healthy` or `unhealthy`.
    pub status: String,
    /// `connected` or `disconnected`.
    pub database: String,
    /// `connected` or `disconnected`.
    pub redis: String,
    pub workers: WorkerStats,
    /// The delivery channel of each task type: `smtp`, `sendgrid`, `twilio_sms`,
    /// `twilio_whatsapp`, `google_calendar`, or `log` (not configured: messages are only logged).
    pub channels: std::collections::BTreeMap<String, String>,
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// Postgres and Redis answer.
    #[oai(status = 200)]
    Healthy(Json<HealthReport>),
    /// Postgres or Redis does not answer within the health timeout.
    #[oai(status = 503)]
    Unhealthy(Json<HealthReport>),
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
    /// Service health
    ///
    /// Pings Postgres and Redis (each with a short timeout); 503 when either does not answer.
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self, auth: BearerAuth) -> Result<HealthResponse, Denied> {
        auth.require(&[Role::Auditor])?;
        Ok(self.report().await)
    }

    /// Readiness: may this instance take traffic (same checks as `/health`)
    #[oai(path = "/health/ready", method = "get", operation_id = "health_ready")]
    async fn ready(&self) -> HealthResponse {
        self.report().await
    }

    /// Liveness: the process answers HTTP (no dependency is checked)
    #[oai(path = "/health/live", method = "get", operation_id = "health_live")]
    async fn live(&self) -> LiveResponse {
        LiveResponse::Live
    }
}

impl HealthApi {
    async fn report(&self) -> HealthResponse {
        let timeout = self.ctx.health_timeout;
        let (db, redis, workers) = tokio::join!(
            self.ping_db(timeout),
            self.ping_redis(timeout),
            self.live_workers(timeout)
        );
        let word = |ok: bool| if ok { "connected" } else { "disconnected" }.to_owned();
        let healthy = db && redis;
        let report = HealthReport {
            status: if healthy { "healthy" } else { "unhealthy" }.into(),
            database: word(db),
            redis: word(redis),
            workers: WorkerStats {
                tasks_processed: 0,
                tasks_failed: 0,
                active_workers: workers,
            },
            channels: self.ctx.channels.clone(),
        };
        if healthy {
            HealthResponse::Healthy(Json(report))
        } else {
            HealthResponse::Unhealthy(Json(report))
        }
    }

    async fn ping_db(&self, timeout: Duration) -> bool {
        let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.ctx.pool);
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health: database ping failed");
                false
            }
            Err(_) => {
                tracing::warn!(?timeout, "health: database ping timed out");
                false
            }
        }
    }

    /// Workers of every process whose heartbeat is current (0 when Redis does not answer).
    async fn live_workers(&self, timeout: Duration) -> i64 {
        let mut conn = self.ctx.redis.clone();
        let count = crate::queue::live_workers(&mut conn, &self.ctx.keys);
        match tokio::time::timeout(timeout, count).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health: cannot count live workers");
                0
            }
            Err(_) => 0,
        }
    }

    async fn ping_redis(&self, timeout: Duration) -> bool {
        let mut conn = self.ctx.redis.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health: redis ping failed");
                false
            }
            Err(_) => {
                tracing::warn!(?timeout, "health: redis ping timed out");
                false
            }
        }
    }
}
