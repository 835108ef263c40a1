//! Operator operations beyond one task: who a token is, pausing and resuming task types, and
//! acting on dead letters in bulk. The console (`/ui`) and `arnela tasks …` use them.

use chrono::{DateTime, Utc};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use super::auth::{BearerAuth, Role};
use super::error::{ApiError, BulkFailures, Failure, StatsFailures, TypeFailures, WhoamiFailures};
use super::model::TaskTypeName;
use super::ApiContext;
use crate::cache::keys;
use crate::domain::task::DEFAULT_MAX_ATTEMPTS;
use crate::domain::TaskType;
use crate::store::operator::{self, DeadAction, DeadFilter};
use crate::store::pauses;

#[derive(Tags)]
enum ApiTags {
    /// Operator controls: task types, dead letters in bulk, the token's identity.
    Operations,
}

/// Who the token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Deserialize)]
pub struct Whoami {
    /// The token's subject (recorded as `by` of operator actions).
    pub subject: String,
    pub role: super::error::RoleName,
    /// The tenant whose tasks a producer sees (its `tenant` claim, else its subject).
    pub owner: String,
}

/// A task type and whether it is paused.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Deserialize)]
pub struct TaskTypeState {
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub task_type: TaskTypeName,
    /// A paused type's tasks stay queued: no relay publishes them and no worker starts them.
    pub paused: bool,
    #[oai(skip_serializing_if_is_none)]
    pub paused_at: Option<DateTime<Utc>>,
    /// Who paused it (the token's subject).
    #[oai(skip_serializing_if_is_none)]
    pub paused_by: Option<String>,
}

/// Every task type.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Deserialize)]
pub struct TaskTypeList {
    pub types: Vec<TaskTypeState>,
}

/// Which dead letters a bulk action takes (`type`: only dead letters of this type), and whether
/// only to count them.
#[derive(Debug, Clone, Default, Object, serde::Serialize)]
pub struct DeadLetterFilter {
    #[oai(rename = "type")]
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub task_type: Option<TaskTypeName>,
    /// Only dead letters whose reason (`last_error`) contains this text, case-insensitively.
    #[oai(validator(min_length = 1, max_length = 500, pattern = r"^[^\u0000]*$"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Only tasks dead-lettered at or after this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_from: Option<DateTime<Utc>>,
    /// Only tasks dead-lettered before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_to: Option<DateTime<Utc>>,
    /// Only count the matching dead letters (the preview before a confirmation).
    #[oai(default)]
    #[serde(default)]
    pub dry_run: bool,
}

/// The outcome of a bulk action.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Deserialize)]
pub struct BulkResult {
    /// Dead letters the filter matched.
    pub matched: u64,
    /// Tasks changed (0 with `dry_run`; fewer than `matched` when some left `dead` meanwhile or
    /// would pass the attempt budget).
    pub changed: u64,
    pub dry_run: bool,
}

#[derive(ApiResponse)]
pub enum WhoamiResponse {
    /// The token's holder.
    #[oai(status = 200)]
    Ok(Json<Whoami>),
}

#[derive(ApiResponse)]
pub enum TaskTypesResponse {
    /// Every task type with its pause state.
    #[oai(status = 200)]
    Ok(Json<TaskTypeList>),
}

#[derive(ApiResponse)]
pub enum TaskTypeResponse {
    /// The type after the operation.
    #[oai(status = 200)]
    Ok(Json<TaskTypeState>),
}

#[derive(ApiResponse)]
pub enum BulkResponse {
    /// What matched and what changed.
    #[oai(status = 200)]
    Ok(Json<BulkResult>),
}

pub struct OperationsApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Operations")]
impl OperationsApi {
    /// The token's holder
    ///
    /// The subject, role and tenant of the bearer token (the console shows them and offers
    /// actions only to admins).
    ///
    /// Roles: producer, auditor, admin.
    #[oai(path = "/whoami", method = "get", operation_id = "whoami")]
    async fn whoami(&self, auth: BearerAuth) -> Result<WhoamiResponse, Failure<WhoamiFailures>> {
        let claims = auth.require(&[Role::Producer, Role::Auditor])?;
        Ok(WhoamiResponse::Ok(Json(Whoami {
            subject: claims.sub.clone(),
            role: claims.role.into(),
            owner: claims.owner().to_owned(),
        })))
    }

    /// Task types and their pause state
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/task-types", method = "get", operation_id = "list_task_types")]
    async fn task_types(
        &self,
        auth: BearerAuth,
    ) -> Result<TaskTypesResponse, Failure<StatsFailures>> {
        auth.require(&[Role::Auditor])?;
        let paused = pauses::list(&self.ctx.pool).await?;
        let types = TaskType::ALL
            .into_iter()
            .map(|t| state(t, paused.iter().find(|p| p.task_type == t.as_str())))
            .collect();
        Ok(TaskTypesResponse::Ok(Json(TaskTypeList { types })))
    }

    /// Pause a task type
    ///
    /// The type's tasks stay queued (or retrying) until it is resumed: neither enqueues nor
    /// relays publish them, and a delivery already in Redis is given back to the outbox instead of being
    /// claimed. Running attempts finish. The state is kept in Postgres: it holds across restarts
    /// and for every process. Pausing a paused type changes nothing.
    ///
    /// Roles: admin. The token's subject is recorded as who paused it.
    #[oai(
        path = "/task-types/:task_type/pause",
        method = "post",
        operation_id = "pause_task_type"
    )]
    async fn pause(
        &self,
        auth: BearerAuth,
        task_type: Path<TaskTypeName>,
    ) -> Result<TaskTypeResponse, Failure<TypeFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let t = TaskType::from(task_type.0);
        let p = pauses::pause(&self.ctx.pool, t, by).await?;
        tracing::info!(task.r#type = %t, by = %by, "task type paused");
        Ok(TaskTypeResponse::Ok(Json(state(t, Some(&p)))))
    }

    /// Resume a task type
    ///
    /// The type's waiting deliveries are published again at once. Resuming a type that is not
    /// paused changes nothing.
    ///
    /// Roles: admin.
    #[oai(
        path = "/task-types/:task_type/resume",
        method = "post",
        operation_id = "resume_task_type"
    )]
    async fn resume(
        &self,
        auth: BearerAuth,
        task_type: Path<TaskTypeName>,
    ) -> Result<TaskTypeResponse, Failure<TypeFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let t = TaskType::from(task_type.0);
        if pauses::resume(&self.ctx.pool, t).await? {
            tracing::info!(task.r#type = %t, by = %by, "task type resumed");
        }
        Ok(TaskTypeResponse::Ok(Json(state(t, None))))
    }

    /// Requeue dead letters in bulk
    ///
    /// Every dead task matching the filter gets 3 more attempts (as `POST /tasks/{id}/retry`
    /// without `attempts`) and is queued now; each is a
    /// `requeued` event recorded with the token's subject. With `dry_run` only counts them: the
    /// preview an operator confirms. The list is read once (all of `tasks`: there is no status
    /// index), then changed 500 tasks per transaction.
    ///
    /// Roles: admin.
    #[oai(
        path = "/dead-letters/retry",
        method = "post",
        operation_id = "retry_dead_letters"
    )]
    async fn retry_dead(
        &self,
        auth: BearerAuth,
        filter: Json<DeadLetterFilter>,
    ) -> Result<BulkResponse, Failure<BulkFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let action = DeadAction::Requeue {
            extra_attempts: DEFAULT_MAX_ATTEMPTS,
        };
        self.bulk(filter.0, action, by).await
    }

    /// Discard dead letters in bulk
    ///
    /// Every dead task matching the filter is cancelled (a `cancelled` event with the token's
    /// subject and the reason "discarded dead letter"): it leaves the dead letters for good.
    /// With `dry_run` only counts them.
    ///
    /// Roles: admin.
    #[oai(
        path = "/dead-letters/cancel",
        method = "post",
        operation_id = "cancel_dead_letters"
    )]
    async fn cancel_dead(
        &self,
        auth: BearerAuth,
        filter: Json<DeadLetterFilter>,
    ) -> Result<BulkResponse, Failure<BulkFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let action = DeadAction::Cancel {
            reason: "discarded dead letter".into(),
        };
        self.bulk(filter.0, action, by).await
    }
}

impl OperationsApi {
    async fn bulk(
        &self,
        filter: DeadLetterFilter,
        action: DeadAction,
        by: &str,
    ) -> Result<BulkResponse, Failure<BulkFailures>> {
        if let (Some(from), Some(to)) = (filter.failed_from, filter.failed_to) {
            if from >= to {
                return Err(ApiError::from(crate::domain::FieldError::new(
                    "failed_to",
                    "out_of_range",
                    "must be later than failed_from",
                ))
                .into());
            }
        }
        let dead = DeadFilter {
            task_type: filter.task_type.map(TaskType::from),
            reason: filter.reason,
            failed_from: filter.failed_from,
            failed_to: filter.failed_to,
        };
        let (outcome, changed) =
            operator::bulk(&self.ctx.pool, &dead, &action, by, filter.dry_run).await?;
        // the projector drops these cached views too, moments later
        for id in changed {
            if let Err(e) = self.ctx.cache.delete(&keys::task(id)).await {
                tracing::warn!(task.id = %id, error = %e, "cannot drop the cached task; the projector will");
                break;
            }
        }
        if !filter.dry_run {
            tracing::info!(by = %by, matched = outcome.matched, changed = outcome.changed, ?action, "dead letters changed in bulk");
        }
        Ok(BulkResponse::Ok(Json(BulkResult {
            matched: outcome.matched,
            changed: outcome.changed,
            dry_run: filter.dry_run,
        })))
    }
}

fn state(t: TaskType, pause: Option<&pauses::Pause>) -> TaskTypeState {
    TaskTypeState {
        task_type: t.into(),
        paused: pause.is_some(),
        paused_at: pause.map(|p| p.paused_at),
        paused_by: pause.map(|p| p.paused_by.clone()),
    }
}
