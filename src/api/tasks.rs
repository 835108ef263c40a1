//! `/tasks`: enqueue (one or a batch), current state, history and the filtered listing.

use chrono::{DateTime, Utc};
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use uuid::Uuid;

use super::auth::{BearerAuth, Claims, Role};
use super::contract::{Documented, TaskBatch, TaskRequest};
use super::error::{
    ApiError, EnqueueFailures, ErrorBody, ErrorCode, Failure, HistoryFailures, ListFailures,
    OperatorFailures, TaskFailures, VerifyFailures,
};
use super::model::{
    BatchRequest, BatchResult, EnqueueRequest, Event, TaskPage, TaskStatusName, TaskTypeName,
    TaskView,
};
use super::ApiContext;
use crate::cache::invalidation::is_pattern;
use crate::cache::{keys, Ttl};
use crate::domain::event::db_time;
use crate::domain::task::{DEFAULT_MAX_ATTEMPTS, MAX_MAX_ATTEMPTS};
use crate::domain::TaskId;
use crate::domain::{
    validate_invalidates, validate_payload, FieldError, NewTask, Task, TaskStatus, TaskType,
};
use crate::store::replica::Source;
use crate::store::tasks::{self, Enqueued, TaskFilter};
use crate::store::{audit, events, operator, retention, Tx};

/// Most tasks in one batch.
pub const MAX_BATCH: usize = 1000;
/// Largest page of the listing.
pub const MAX_PAGE: u32 = 500;

#[derive(Tags)]
enum ApiTags {
    /// Enqueue tasks and read their state and history.
    Tasks,
}

#[derive(ApiResponse)]
pub enum EnqueueResponse {
    /// The task was created.
    #[oai(status = 201)]
    Created(
        Json<TaskView>,
        /// The task's URL (`/tasks/{id}`).
        #[oai(header = "Location")]
        String,
    ),
    /// The idempotency key was already used for this same request: the existing task.
    #[oai(status = 200)]
    Existing(Json<TaskView>),
}

#[derive(ApiResponse)]
pub enum BatchResponse {
    /// At least one task was created.
    #[oai(status = 201)]
    Created(Json<BatchResult>),
    /// Every task already existed under its idempotency key.
    #[oai(status = 200)]
    AllExisting(Json<BatchResult>),
}

#[derive(ApiResponse)]
pub enum TaskResponse {
    /// The task's current state.
    #[oai(status = 200)]
    Ok(Json<TaskView>),
}

#[derive(ApiResponse)]
pub enum OperatorResponse {
    /// The task after the operation.
    #[oai(status = 200)]
    Ok(Json<TaskView>),
}

#[derive(ApiResponse)]
pub enum HistoryResponse {
    /// Every event of the task, in order.
    #[oai(status = 200)]
    Ok(
        Json<Vec<Event>>,
        /// `primary`, or `replica` when a streaming standby (`DATABASE_READ_URL`) served it.
        #[oai(header = "Arnela-Read-Source")]
        String,
        /// How far behind the primary the answer may be, in milliseconds (0 from the primary).
        #[oai(header = "Arnela-Read-Lag-Ms")]
        u64,
    ),
}

/// The verdict on one task's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, poem_openapi::Object, serde::Deserialize)]
pub struct ChainVerdict {
    pub task_id: Uuid,
    /// Every link holds.
    pub ok: bool,
    /// Events checked.
    pub events: u64,
    /// The first problem found; absent when `ok`.
    #[oai(skip_serializing_if_is_none)]
    pub problem: Option<String>,
}

#[derive(ApiResponse)]
pub enum VerifyResponse {
    /// The verdict.
    #[oai(status = 200)]
    Ok(Json<ChainVerdict>),
}

#[derive(ApiResponse)]
pub enum ListResponse {
    /// A page of tasks, oldest first.
    #[oai(status = 200)]
    Ok(
        Json<TaskPage>,
        /// `primary`, or `replica` when a streaming standby (`DATABASE_READ_URL`) served it.
        #[oai(header = "Arnela-Read-Source")]
        String,
        /// How far behind the primary the answer may be, in milliseconds (0 from the primary).
        #[oai(header = "Arnela-Read-Lag-Ms")]
        u64,
    ),
}

pub struct TasksApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Tasks")]
impl TasksApi {
    /// Enqueue a task
    ///
    /// Writes the `enqueued` event, the task and its outbox row in one transaction. With an
    /// `idempotency_key` already used for the same request, returns that task with 200; used for
    /// a different request, 409.
    ///
    /// Roles: producer, admin.
    #[oai(path = "/tasks", method = "post", operation_id = "enqueue_task")]
    async fn enqueue(
        &self,
        auth: BearerAuth,
        body: Json<Documented<TaskRequest, EnqueueRequest>>,
        /// W3C trace context: the task's attempts continue this trace (an invalid value is
        /// ignored and a new trace started, as when it is absent).
        traceparent: Header<Option<String>>,
        /// W3C vendor trace state, kept with `traceparent`.
        tracestate: Header<Option<String>>,
    ) -> Result<EnqueueResponse, Failure<EnqueueFailures>> {
        let claims = auth.require(&[Role::Producer])?;
        let mut new = parse_request(body.0.value, Utc::now(), self.ctx.schedule_horizon, claims)?;
        new.trace = crate::telemetry::context_for_enqueue(
            traceparent.0.as_deref(),
            tracestate.0.as_deref(),
        );
        let result = write(&self.ctx, vec![new]).await?;
        match result.into_iter().next() {
            Some(Enqueued::Created(row)) => {
                let view = TaskView::from(row);
                let location = format!("/tasks/{}", view.id);
                Ok(EnqueueResponse::Created(Json(view), location))
            }
            Some(Enqueued::Existing(row)) => {
                Ok(EnqueueResponse::Existing(Json(TaskView::from(row))))
            }
            None => Err(ApiError::internal(&"enqueue returned no task").into()),
        }
    }

    /// Enqueue up to 1000 tasks at once
    ///
    /// All or nothing: if any task is invalid (the error names it, e.g. `tasks[3].payload.to`) or
    /// conflicts, none is written.
    ///
    /// Roles: producer, admin.
    #[oai(path = "/tasks/batch", method = "post", operation_id = "enqueue_batch")]
    async fn enqueue_batch(
        &self,
        auth: BearerAuth,
        body: Json<Documented<TaskBatch, BatchRequest>>,
        /// W3C trace context shared by every task of the batch (see `POST /tasks`).
        traceparent: Header<Option<String>>,
        /// W3C vendor trace state, kept with `traceparent`.
        tracestate: Header<Option<String>>,
    ) -> Result<BatchResponse, Failure<EnqueueFailures>> {
        let claims = auth.require(&[Role::Producer])?;
        let requests = body.0.value.tasks;
        if requests.is_empty() || requests.len() > MAX_BATCH {
            return Err(FieldError::new(
                "tasks",
                "invalid_length",
                format!("must hold 1 to {MAX_BATCH} tasks, not {}", requests.len()),
            )
            .into());
        }
        let now = Utc::now();
        let trace = crate::telemetry::context_for_enqueue(
            traceparent.0.as_deref(),
            tracestate.0.as_deref(),
        );
        let mut news = Vec::with_capacity(requests.len());
        for (i, r) in requests.into_iter().enumerate() {
            let mut new = parse_request(r, now, self.ctx.schedule_horizon, claims)
                .map_err(|e| e.within(&format!("tasks[{i}].")))?;
            new.trace = trace.clone();
            news.push(new);
        }
        let results = write(&self.ctx, news).await?;
        let created = results
            .iter()
            .filter(|r| matches!(r, Enqueued::Created(_)))
            .count() as u32;
        let existing = results.len() as u32 - created;
        let tasks = results
            .into_iter()
            .map(|r| TaskView::from(r.into_task()))
            .collect();
        let result = Json(BatchResult {
            tasks,
            created,
            existing,
        });
        Ok(if created > 0 {
            BatchResponse::Created(result)
        } else {
            BatchResponse::AllExisting(result)
        })
    }

    /// A task's current state
    ///
    /// A producer reads only the tasks of its tenant (the token's `tenant` claim, else its
    /// subject); auditors and admins read every task.
    ///
    /// Served from the cache (`task:{id}`), which the invalidation projector clears after each
    /// event of the task: a read may lag a committed event by the projector's interval
    /// (`PROJECTOR_INTERVAL_MS`), never longer once the event is projected. A request with
    /// `Cache-Control: no-cache` reads Postgres directly.
    ///
    /// A finished task retired by retention (`RETENTION_FINISHED_TASKS_DAYS`) still reads, with
    /// its payload as `"[retired]"` and without its idempotency key and last error.
    ///
    /// Roles: producer, auditor, admin.
    #[oai(path = "/tasks/:id", method = "get", operation_id = "get_task")]
    async fn get(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// `no-cache` to read the current state from Postgres, bypassing the cache.
        #[oai(name = "Cache-Control")]
        cache_control: Header<Option<String>>,
    ) -> Result<TaskResponse, Failure<TaskFailures>> {
        let claims = auth.require(&[Role::Producer, Role::Auditor])?;
        let pool = &self.ctx.pool;
        let not_found = || ApiError::not_found(format!("task {} not found", id.0));
        let load = || async {
            match tasks::get(pool, id.0.into()).await? {
                Some(task) => Ok(TaskView::from(self.ctx.open_task(task).await?)),
                // retention removed the row: what is left of it (payload "[retired]")
                None => match retention::retired(pool, id.0.into()).await? {
                    Some(r) => Ok(TaskView::from(r.into_task(false))),
                    _ => Err(ApiError::not_found(format!("task {} not found", id.0))),
                },
            }
        };
        let bypass = cache_control
            .0
            .as_deref()
            .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"));
        let view = if bypass {
            load().await?
        } else {
            self.ctx
                .cache
                .get_or_set(&keys::task(id.0), Ttl::Short, load)
                .await?
        };
        // A producer reads only its own tasks; another's is answered exactly like a missing one.
        if claims.role == Role::Producer && view.owner != claims.owner() {
            return Err(not_found().into());
        }
        Ok(TaskResponse::Ok(Json(view)))
    }

    /// Requeue a dead task
    ///
    /// Gives a dead-lettered task a new budget of attempts (`attempts`, default the task's
    /// original budget) and queues it now; recorded as a `requeued` event. 409 unless the task
    /// is dead.
    ///
    /// Roles: admin. The token's subject is recorded as who requeued it.
    #[oai(
        path = "/tasks/:id/retry",
        method = "post",
        operation_id = "retry_task"
    )]
    async fn retry(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// New attempts to allow (default 3).
        #[oai(validator(minimum(value = "1"), maximum(value = "25")))]
        attempts: Query<Option<i32>>,
    ) -> Result<OperatorResponse, Failure<OperatorFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let extra = attempts.0.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        let row = operator::requeue(&self.ctx.pool, id.0.into(), extra, by).await?;
        self.acted_on(row).await
    }

    /// Cancel a task
    ///
    /// A queued or scheduled task never runs; a running attempt is allowed to end but its
    /// outcome is not retried; a dead task is discarded (it leaves the dead letters). Recorded
    /// as a `cancelled` event. 409 if the task succeeded or was cancelled already.
    ///
    /// Roles: admin. The token's subject is recorded as who cancelled it.
    #[oai(
        path = "/tasks/:id/cancel",
        method = "post",
        operation_id = "cancel_task"
    )]
    async fn cancel(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Why, for the audit trail.
        #[oai(validator(min_length = 1, max_length = 500, pattern = r"^[^\u0000]*$"))]
        reason: Query<Option<String>>,
    ) -> Result<OperatorResponse, Failure<OperatorFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let reason = reason
            .0
            .unwrap_or_else(|| "cancelled by an operator".into());
        let row = operator::cancel(&self.ctx.pool, id.0.into(), reason, by).await?;
        self.acted_on(row).await
    }

    /// Erase a task's personal data
    ///
    /// Destroys the task's data key: the personal fields of its payload (recipient, message,
    /// appointment details) and its provider results, stored sealed under that key, can no
    /// longer be read by anyone, and show as `"[erased]"`. Recorded as an `erased` event; the
    /// history keeps every event and still verifies. A task that could still run (queued,
    /// retrying, dead) is cancelled first. Erasing twice changes nothing (200). A task retired
    /// by retention (`RETENTION_FINISHED_TASKS_DAYS`) is erased too; its payload reads
    /// `"[erased]"`.
    ///
    /// 409 `invalid_transition` while an attempt runs (cancel it, or wait for it to end);
    /// 409 `not_erasable` for a task stored before `AUDIT_DATA_KEY` was set.
    ///
    /// Roles: admin. The token's subject is recorded as who erased it.
    #[oai(
        path = "/tasks/:id/erase",
        method = "post",
        operation_id = "erase_task"
    )]
    async fn erase(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Why (for example the data subject's request), for the audit trail.
        #[oai(validator(min_length = 1, max_length = 500, pattern = r"^[^\u0000]*$"))]
        reason: Query<Option<String>>,
    ) -> Result<OperatorResponse, Failure<OperatorFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let reason = reason
            .0
            .unwrap_or_else(|| "personal data erased on request".into());
        let row = match operator::erase(&self.ctx.pool, id.0.into(), reason, by).await? {
            operator::Erasure::Erased(row) | operator::Erasure::AlreadyErased(row) => row,
        };
        self.acted_on(row).await
    }

    /// A task's full history
    ///
    /// Every event, in order, with its hash-chain links.
    ///
    /// Roles: auditor, admin.
    #[oai(
        path = "/tasks/:id/events",
        method = "get",
        operation_id = "get_task_events"
    )]
    async fn history(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<HistoryResponse, Failure<HistoryFailures>> {
        auth.require(&[Role::Auditor])?;
        let task: TaskId = id.0.into();
        let history = |pool: sqlx::PgPool| async move { events::history(&pool, task).await };
        let (mut events, mut source) = self.ctx.reads.read(history).await?;
        if events.is_empty() && source != Source::Primary {
            // a task enqueued after what the standby has replayed: the primary knows it
            (events, source) = self.ctx.reads.read_primary(history).await?;
        }
        self.ctx.open_events(&mut events).await?;
        if events.is_empty() {
            let message = match retention::archived_in(&self.ctx.pool, id.0.into()).await? {
                Some(archive) => format!(
                    "the history of task {} is archived ({archive}): check it with \
                     `arnela audit verify --archive`",
                    id.0
                ),
                None => format!("task {} not found", id.0),
            };
            return Err(ApiError::not_found(message).into());
        }
        Ok(HistoryResponse::Ok(
            Json(events.into_iter().map(Event::from).collect()),
            source.name().to_owned(),
            source.lag_ms(),
        ))
    }

    /// Check a task's hash chain
    ///
    /// Recomputes every event's hash from its stored content and checks the links, the
    /// numbering and that the task's projection points at the last event (as `arnela audit
    /// verify --task`). `ok` is false with the first problem found.
    ///
    /// Roles: auditor, admin.
    #[oai(
        path = "/tasks/:id/verify",
        method = "get",
        operation_id = "verify_task"
    )]
    async fn verify(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<VerifyResponse, Failure<VerifyFailures>> {
        auth.require(&[Role::Auditor])?;
        Ok(VerifyResponse::Ok(Json(
            verdict(&self.ctx.pool, id.0).await?,
        )))
    }

    /// List tasks
    ///
    /// Oldest first, filtered by type, status and creation time, paged by the `next_after`
    /// cursor. Paging never skips a task whose enqueue committed late; a task appears once every
    /// transaction that started before its own has ended.
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/tasks", method = "get", operation_id = "list_tasks")]
    // One argument per query parameter (and the token): that is how poem-openapi documents them.
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only tasks of this type.
        #[oai(name = "type")]
        task_type: Query<Option<TaskTypeName>>,
        /// Only tasks in this status.
        status: Query<Option<TaskStatusName>>,
        /// Only tasks created at or after this time (RFC 3339).
        created_from: Query<Option<DateTime<Utc>>>,
        /// Only tasks created before this time (RFC 3339).
        created_to: Query<Option<DateTime<Utc>>>,
        /// Only the task enqueued with this idempotency key (by any tenant).
        #[oai(validator(min_length = 1, max_length = 255))]
        idempotency_key: Query<Option<String>>,
        /// The `next_after` of the previous page.
        #[oai(validator(minimum(value = "0")))]
        after: Query<Option<i64>>,
        /// Page size (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<ListResponse, Failure<ListFailures>> {
        auth.require(&[Role::Auditor])?;
        let filter = TaskFilter {
            task_type: task_type.0.map(TaskType::from),
            status: status.0.map(TaskStatus::from),
            created_from: created_from.0,
            created_to: created_to.0,
            idempotency_key: idempotency_key.0,
        };
        let limit = limit.0.unwrap_or(50);
        let after = after.0.unwrap_or(0);
        let filter = &filter;
        let (mut page, source) = self
            .ctx
            .reads
            .read(|pool| async move { tasks::list(&pool, filter, after, i64::from(limit)).await })
            .await?;
        self.ctx.open_tasks(&mut page.tasks).await?;
        let next_after = (page.tasks.len() == limit as usize)
            .then_some(page.last_position)
            .flatten();
        Ok(ListResponse::Ok(
            Json(TaskPage {
                items: page.tasks.into_iter().map(TaskView::from).collect(),
                next_after,
            }),
            source.name().to_owned(),
            source.lag_ms(),
        ))
    }
}

impl TasksApi {
    /// The answer of an operator action: the task's new state, after its cached view (which
    /// holds opened personal fields) is dropped.
    async fn acted_on(&self, task: Task) -> Result<OperatorResponse, Failure<OperatorFailures>> {
        self.forget(task.id).await;
        let task = self.ctx.open_task(task).await?;
        Ok(OperatorResponse::Ok(Json(TaskView::from(task))))
    }

    /// Drops the cached view of a task this request changed, so the caller reads its own write
    /// at once (the projector drops it too, moments later; a failure here is only logged).
    async fn forget(&self, id: TaskId) {
        if let Err(e) = self.ctx.cache.delete(&keys::task(id)).await {
            tracing::warn!(task.id = %id, error = %e, "cannot drop the cached task; the projector will");
        }
    }
}

/// Writes the tasks of one request and publishes the deliveries of those due now (see
/// [`crate::relay::Publisher`]); the relays are woken for the rest.
async fn write(ctx: &ApiContext, news: Vec<NewTask>) -> Result<Vec<Enqueued>, ApiError> {
    let now = Utc::now();
    let due = news.iter().filter(|n| n.run_at <= now).count();
    let direct = due > 0 && ctx.publisher.ready(due).await;
    let mut tx = writer(&ctx.pool, &news).await?;
    let (results, dispatched) = if direct {
        tasks::enqueue_dispatched(&mut tx, news, now, ctx.data_key.as_deref()).await?
    } else {
        let results = tasks::enqueue(&mut tx, news, now, ctx.data_key.as_deref()).await?;
        (results, Vec::new())
    };
    tx.commit().await?;
    let published = dispatched.len();
    ctx.publisher.publish(dispatched).await;
    let created = results
        .iter()
        .filter(|r| matches!(r, Enqueued::Created(_)))
        .count();
    if created > published {
        ctx.waker.wake();
    }
    Ok(results)
}

/// The connection an enqueue writes on. Without idempotency keys the enqueue is one statement,
/// atomic by itself, so it needs no explicit transaction; with keys a conflict found after the
/// insert must roll the whole request back, so it runs in one.
async fn writer(pool: &sqlx::PgPool, news: &[NewTask]) -> Result<Tx, ApiError> {
    let keyed = news.iter().any(|n| n.idempotency_key.is_some());
    Ok(if keyed {
        Tx::begin(pool).await?
    } else {
        Tx::autocommit(pool).await?
    })
}

/// Turns a request into a validated [`NewTask`], naming the first bad field.
/// `run_at` may be at most `horizon` ahead; a time in the past counts as now (a time far in the
/// past would otherwise jump ahead of the whole queue).
/// The verdict on task `id`'s chain (404 when the task has neither events nor a row).
pub async fn verdict(pool: &sqlx::PgPool, id: Uuid) -> Result<ChainVerdict, ApiError> {
    let report = audit::verify_task(pool, id.into())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
    Ok(ChainVerdict {
        task_id: id,
        ok: report.ok(),
        events: report.events,
        problem: report
            .broken
            .first()
            .map(|b| format!("event {}: {}", b.sequence, b.reason)),
    })
}

pub fn parse_request(
    r: EnqueueRequest,
    now: DateTime<Utc>,
    horizon: chrono::Duration,
    claims: &Claims,
) -> Result<NewTask, ApiError> {
    let task_type = r.task_type.parse::<TaskType>().map_err(|_| {
        FieldError::new(
            "type",
            "invalid_value",
            format!(
                "{:?} is not a task type (expected send_email, send_sms, send_whatsapp or sync_calendar)",
                r.task_type
            ),
        )
    })?;
    let payload = validate_payload(task_type, r.payload)?;
    let max_attempts = r.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=MAX_MAX_ATTEMPTS).contains(&max_attempts) {
        return Err(FieldError::new(
            "max_attempts",
            "out_of_range",
            format!("must be 1 to {MAX_MAX_ATTEMPTS}"),
        )
        .into());
    }
    let run_at = match r.run_at.as_deref() {
        None => now,
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| {
                FieldError::new(
                    "run_at",
                    "invalid_format",
                    "must be an RFC 3339 time like 2026-01-15T09:30:00+01:00",
                )
            })?
            .with_timezone(&Utc),
    };
    if run_at > now + horizon {
        return Err(FieldError::new(
            "run_at",
            "out_of_range",
            format!("must be at most {} days ahead", horizon.num_days()),
        )
        .into());
    }
    // A time in the past counts as now: it cannot jump ahead of the tasks already waiting, and
    // a keyed request retried later with the same body still finds its task.
    let run_at = run_at.max(now);
    let idempotency_key = match r.idempotency_key {
        Some(k) if k.is_empty() || k.chars().count() > 255 => {
            return Err(FieldError::new(
                "idempotency_key",
                "invalid_length",
                "must be 1 to 255 characters",
            )
            .into())
        }
        Some(k) if k.chars().any(char::is_control) => {
            return Err(FieldError::new(
                "idempotency_key",
                "invalid_format",
                "must not contain control characters",
            )
            .into())
        }
        other => other,
    };
    let invalidates = validate_invalidates(r.invalidates.unwrap_or_default())?;
    for (i, entry) in invalidates.iter().enumerate() {
        if !is_pattern(entry) {
            continue;
        }
        if !claims.may_use_patterns() {
            return Err(ApiError::Forbidden(Json(ErrorBody {
                code: ErrorCode::Forbidden,
                message: "declaring invalidation patterns needs a token granted them \
                          (`arnela token --patterns`) or an admin token; declare keys instead"
                    .into(),
                field: Some(format!("invalidates[{i}]")),
                reason: None,
                roles: None,
            })));
        }
        if keys::pattern_family(entry).is_none() {
            return Err(FieldError::new(
                format!("invalidates[{i}]"),
                "invalid_value",
                format!(
                    "a pattern must start with one of the cache's key families: {}",
                    keys::PATTERN_FAMILIES.join(", ")
                ),
            )
            .into());
        }
    }
    Ok(NewTask {
        task_type,
        payload,
        max_attempts,
        run_at: db_time(run_at),
        idempotency_key,
        invalidates,
        owner: claims.owner().to_owned(),
        trace: None,
    })
}
