//! `/schedules`: periodic tasks. Admins create, change, pause, resume and delete schedules;
//! auditors and admins read them, their next slots, the tasks of past slots and their change log.

use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use serde_json::Value;
use uuid::Uuid;

use super::auth::{BearerAuth, Role};
use super::error::{
    ApiError, CreateScheduleFailures, Failure, ListFailures, ScheduleFailures,
    UpdateScheduleFailures,
};
use super::model::{TaskStatusName, TaskTypeName};
use super::ApiContext;
use crate::domain::schedule::{Cadence, MissedRuns};
use crate::domain::task::DEFAULT_MAX_ATTEMPTS;
use crate::domain::{validate_payload, FieldError, TaskType};
use crate::store::schedules::{self, NewSchedule, ScheduleChange, ScheduleEvent, ScheduleRow};
use crate::store::StoreError;

/// Largest page of the schedule listing.
pub const MAX_PAGE: u32 = 500;
/// Upcoming slots shown with a schedule.
const NEXT_RUNS: usize = 5;
/// Past slots shown with one schedule.
const RECENT_RUNS: i64 = 20;
/// Most missed slots a catch-up runs.
const MAX_CATCH_UP: i32 = 100;

#[derive(Tags)]
enum ApiTags {
    /// Periodic tasks: a cron expression in a time zone enqueues one task per slot.
    Schedules,
}

/// What happens to slots missed by more than 30 s (every scheduler down, or a clock jump):
/// `skip` (they do not run) or `catch_up` (the most recent `catch_up_limit` of them run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(rename = "MissedRuns", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum MissedRunsName {
    Skip,
    CatchUp,
}

impl From<MissedRuns> for MissedRunsName {
    fn from(m: MissedRuns) -> Self {
        match m {
            MissedRuns::Skip => MissedRunsName::Skip,
            MissedRuns::CatchUp { .. } => MissedRunsName::CatchUp,
        }
    }
}

/// A new schedule.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// A label for people (1 to 200 characters).
    #[oai(validator(min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001f]*$"))]
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week) or six with seconds first, e.g.
    /// `0 9 * * MON-FRI` or `*/10 * * * * *`.
    #[oai(validator(min_length = 1, max_length = 200))]
    pub cron: String,
    /// The IANA time zone the expression is read in, e.g. `Europe/Madrid` or `UTC`.
    #[oai(validator(min_length = 1, max_length = 64))]
    pub time_zone: String,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub task_type: TaskTypeName,
    /// The payload of each slot's task, as `POST /tasks` takes it for the type.
    pub payload: Value,
    /// Attempts of each slot's task (1 to 25; default 3).
    #[oai(validator(minimum(value = "1"), maximum(value = "25")))]
    pub max_attempts: Option<i32>,
    pub missed_runs: Option<MissedRunsName>,
    /// With `catch_up`: how many of the most recent missed slots run (1 to 100; default 10).
    #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
    pub catch_up_limit: Option<i32>,
    /// Create it paused (default false).
    pub paused: Option<bool>,
}

/// Changes to a schedule: the fields given replace the current ones. A new `cron` or
/// `time_zone` moves the next slot to the first one after now; a new `type` needs its `payload`.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(deny_unknown_fields)]
pub struct ScheduleUpdate {
    #[oai(validator(min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001f]*$"))]
    pub name: Option<String>,
    #[oai(validator(min_length = 1, max_length = 200))]
    pub cron: Option<String>,
    #[oai(validator(min_length = 1, max_length = 64))]
    pub time_zone: Option<String>,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub task_type: Option<TaskTypeName>,
    pub payload: Option<Value>,
    #[oai(validator(minimum(value = "1"), maximum(value = "25")))]
    pub max_attempts: Option<i32>,
    pub missed_runs: Option<MissedRunsName>,
    #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
    pub catch_up_limit: Option<i32>,
}

/// A past slot and its task.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ScheduleRun {
    pub slot: DateTime<Utc>,
    pub task_id: Uuid,
    #[oai(skip_serializing_if_is_none)]
    pub status: Option<TaskStatusName>,
}

/// A schedule.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ScheduleView {
    pub id: Uuid,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub task_type: TaskTypeName,
    pub payload: Value,
    pub max_attempts: i32,
    pub missed_runs: MissedRunsName,
    /// Missed slots a catch-up runs (0 with `skip`).
    pub catch_up_limit: i32,
    pub paused: bool,
    /// The next slot to fire; absent while paused or when the expression matches no later time.
    #[oai(skip_serializing_if_is_none)]
    pub next_run_at: Option<DateTime<Utc>>,
    /// The last slot fired.
    #[oai(skip_serializing_if_is_none)]
    pub last_run_at: Option<DateTime<Utc>>,
    /// The upcoming slots (empty while paused).
    pub next_runs: Vec<DateTime<Utc>>,
    /// The most recent past slots and their tasks, newest first (`GET /schedules/{id}` only).
    #[oai(skip_serializing_if_is_none)]
    pub recent_runs: Option<Vec<ScheduleRun>>,
    /// Whose tasks the slots become.
    pub owner: String,
    /// Events in the schedule's change log.
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of schedules, oldest first.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct SchedulePage {
    pub schedules: Vec<ScheduleView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_after: Option<Uuid>,
}

/// One event of a schedule's change log: `created`, `updated` (data: the changed fields),
/// `paused`, `resumed`, `deleted` or `slots_skipped` (missed slots that did not run: `from`,
/// `to`). Hash-chained per schedule like a task's events.
#[derive(Debug, Clone, PartialEq, Object, serde::Deserialize)]
pub struct ScheduleEventView {
    pub schedule_id: Uuid,
    pub sequence: i32,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// SHA-256 (hex) over this event's canonical content and `prev_hash`.
    pub hash: String,
    #[oai(skip_serializing_if_is_none)]
    pub prev_hash: Option<String>,
}

impl From<ScheduleEvent> for ScheduleEventView {
    fn from(e: ScheduleEvent) -> Self {
        ScheduleEventView {
            schedule_id: e.schedule_id,
            sequence: e.sequence,
            event_type: e.event_type,
            data: e.data,
            occurred_at: e.occurred_at,
            recorded_at: e.recorded_at,
            hash: hex::encode(e.hash),
            prev_hash: e.prev_hash.map(hex::encode),
        }
    }
}

#[derive(ApiResponse)]
pub enum CreatedResponse {
    /// The schedule was created.
    #[oai(status = 201)]
    Created(
        Json<ScheduleView>,
        /// The schedule's URL (`/schedules/{id}`).
        #[oai(header = "Location")]
        String,
    ),
}

#[derive(ApiResponse)]
pub enum ScheduleResponse {
    /// The schedule.
    #[oai(status = 200)]
    Ok(Json<ScheduleView>),
}

#[derive(ApiResponse)]
pub enum PageResponse {
    /// A page of schedules.
    #[oai(status = 200)]
    Ok(Json<SchedulePage>),
}

#[derive(ApiResponse)]
pub enum DeletedResponse {
    /// The schedule was deleted; its change log and the tasks of past slots remain.
    #[oai(status = 204)]
    Deleted,
}

#[derive(ApiResponse)]
pub enum ScheduleEventsResponse {
    /// Every event of the schedule, in order (also after it was deleted).
    #[oai(status = 200)]
    Ok(Json<Vec<ScheduleEventView>>),
}

pub struct SchedulesApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Schedules")]
impl SchedulesApi {
    /// Create a schedule
    ///
    /// From the first slot after now, each slot of `cron` (read in `time_zone`) enqueues one
    /// task of `type` with `payload`, whose idempotency key is `schedule:{id}:{slot}` (the slot
    /// in UTC, e.g. `2026-03-02T08:00:00Z`): one task per slot, however many processes run.
    /// Recorded as a `created` event.
    ///
    /// Roles: admin. The token's tenant (or subject) owns the slots' tasks.
    #[oai(path = "/schedules", method = "post", operation_id = "create_schedule")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: Json<ScheduleRequest>,
    ) -> Result<CreatedResponse, Failure<CreateScheduleFailures>> {
        let claims = auth.require(&[Role::Admin])?;
        let r = body.0;
        let cadence = Cadence::parse(&r.cron, &r.time_zone)?;
        let task_type = TaskType::from(r.task_type);
        let payload = validate_payload(task_type, r.payload)?;
        let missed = missed_runs(
            r.missed_runs.unwrap_or(MissedRunsName::Skip),
            r.catch_up_limit,
        )?;
        let new = NewSchedule {
            name: r.name,
            cadence,
            task_type,
            payload,
            max_attempts: r.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            missed,
            paused: r.paused.unwrap_or(false),
            owner: claims.owner().to_owned(),
        };
        let row = schedules::create(&self.ctx.pool, new, &claims.sub, Utc::now()).await?;
        tracing::info!(schedule.id = %row.id, by = %claims.sub, "schedule created");
        let view = view(row, None)?;
        let location = format!("/schedules/{}", view.id);
        Ok(CreatedResponse::Created(Json(view), location))
    }

    /// List schedules
    ///
    /// Oldest first, `limit` per page (default 100, at most 500); pass `next_after` back as
    /// `after` for the next page.
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/schedules", method = "get", operation_id = "list_schedules")]
    async fn list(
        &self,
        auth: BearerAuth,
        after: Query<Option<Uuid>>,
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))] limit: Query<Option<u32>>,
    ) -> Result<PageResponse, Failure<ListFailures>> {
        auth.require(&[Role::Auditor])?;
        let limit = limit.0.unwrap_or(100).min(MAX_PAGE);
        let rows = schedules::list(&self.ctx.pool, after.0, i64::from(limit) + 1).await?;
        let more = rows.len() > limit as usize;
        let schedules = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| view(r, None))
            .collect::<Result<Vec<_>, _>>()?;
        let next_after = if more {
            schedules.last().map(|s| s.id)
        } else {
            None
        };
        Ok(PageResponse::Ok(Json(SchedulePage {
            schedules,
            next_after,
        })))
    }

    /// A schedule, its next slots and the tasks of its past slots
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/schedules/:id", method = "get", operation_id = "get_schedule")]
    async fn get(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<ScheduleResponse, Failure<ScheduleFailures>> {
        auth.require(&[Role::Auditor])?;
        let row = schedules::get(&self.ctx.pool, id.0)
            .await?
            .ok_or_else(|| not_found(id.0))?;
        let runs = schedules::runs(&self.ctx.pool, id.0, RECENT_RUNS).await?;
        let runs = runs
            .into_iter()
            .map(|r| ScheduleRun {
                slot: r.slot,
                task_id: r.task_id.into(),
                status: r
                    .status
                    .as_deref()
                    .and_then(|s| s.parse::<crate::domain::TaskStatus>().ok())
                    .map(Into::into),
            })
            .collect();
        Ok(ScheduleResponse::Ok(Json(view(row, Some(runs))?)))
    }

    /// Change a schedule
    ///
    /// Recorded as an `updated` event listing the changed fields. Slots already fired keep
    /// their tasks.
    ///
    /// Roles: admin.
    #[oai(
        path = "/schedules/:id",
        method = "patch",
        operation_id = "update_schedule"
    )]
    async fn update(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<ScheduleUpdate>,
    ) -> Result<ScheduleResponse, Failure<UpdateScheduleFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let u = body.0;
        let current = schedules::get(&self.ctx.pool, id.0)
            .await?
            .ok_or_else(|| not_found(id.0))?;
        let cadence = match (&u.cron, &u.time_zone) {
            (None, None) => None,
            (cron, zone) => Some(Cadence::parse(
                cron.as_deref().unwrap_or(&current.cron),
                zone.as_deref().unwrap_or(&current.time_zone),
            )?),
        };
        let task = match (u.task_type, u.payload) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(
                    FieldError::new("payload", "required", "a new type needs its payload").into(),
                )
            }
            (t, Some(payload)) => {
                let t = match t {
                    Some(t) => TaskType::from(t),
                    None => current.task()?.0,
                };
                Some((t, validate_payload(t, payload)?))
            }
        };
        let missed = match (u.missed_runs, u.catch_up_limit) {
            (None, None) => None,
            (m, limit) => {
                let m = m.unwrap_or_else(|| current.missed().into());
                Some(missed_runs(m, limit)?)
            }
        };
        let change = ScheduleChange {
            name: u.name,
            cadence,
            task,
            max_attempts: u.max_attempts,
            missed,
        };
        let row = schedules::update(&self.ctx.pool, id.0, change, by, Utc::now())
            .await
            .map_err(|e| schedule_error(e, id.0))?;
        Ok(ScheduleResponse::Ok(Json(view(row, None)?)))
    }

    /// Delete a schedule
    ///
    /// No further slot fires. Recorded as a `deleted` event; the change log and the tasks of
    /// past slots remain.
    ///
    /// Roles: admin.
    #[oai(
        path = "/schedules/:id",
        method = "delete",
        operation_id = "delete_schedule"
    )]
    async fn delete(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<DeletedResponse, Failure<ScheduleFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        schedules::delete(&self.ctx.pool, id.0, by, Utc::now())
            .await
            .map_err(|e| schedule_error(e, id.0))?;
        tracing::info!(schedule.id = %id.0, by = %by, "schedule deleted");
        Ok(DeletedResponse::Deleted)
    }

    /// Pause a schedule
    ///
    /// No slot fires until it is resumed. Recorded as a `paused` event (pausing a paused
    /// schedule changes nothing).
    ///
    /// Roles: admin.
    #[oai(
        path = "/schedules/:id/pause",
        method = "post",
        operation_id = "pause_schedule"
    )]
    async fn pause(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<ScheduleResponse, Failure<ScheduleFailures>> {
        self.set_paused(auth, id.0, true).await
    }

    /// Resume a schedule
    ///
    /// Slots fire again from the first one after now; the slots of the pause do not run.
    /// Recorded as a `resumed` event.
    ///
    /// Roles: admin.
    #[oai(
        path = "/schedules/:id/resume",
        method = "post",
        operation_id = "resume_schedule"
    )]
    async fn resume(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<ScheduleResponse, Failure<ScheduleFailures>> {
        self.set_paused(auth, id.0, false).await
    }

    /// A schedule's change log
    ///
    /// Every event, in order, with its hash-chain links (also after the schedule was deleted).
    ///
    /// Roles: auditor, admin.
    #[oai(
        path = "/schedules/:id/events",
        method = "get",
        operation_id = "get_schedule_events"
    )]
    async fn events(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<ScheduleEventsResponse, Failure<ScheduleFailures>> {
        auth.require(&[Role::Auditor])?;
        let events = schedules::history(&self.ctx.pool, id.0).await?;
        if events.is_empty() {
            return Err(not_found(id.0).into());
        }
        Ok(ScheduleEventsResponse::Ok(Json(
            events.into_iter().map(Into::into).collect(),
        )))
    }
}

impl SchedulesApi {
    async fn set_paused(
        &self,
        auth: BearerAuth,
        id: Uuid,
        paused: bool,
    ) -> Result<ScheduleResponse, Failure<ScheduleFailures>> {
        let by = &auth.require(&[Role::Admin])?.sub;
        let row = schedules::set_paused(&self.ctx.pool, id, paused, by, Utc::now())
            .await
            .map_err(|e| schedule_error(e, id))?;
        tracing::info!(schedule.id = %id, by = %by, paused, "schedule paused or resumed");
        Ok(ScheduleResponse::Ok(Json(view(row, None)?)))
    }
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("schedule {id} not found"))
}

fn schedule_error(e: StoreError, id: Uuid) -> ApiError {
    match e {
        StoreError::NotFound(_) => not_found(id),
        other => other.into(),
    }
}

fn missed_runs(m: MissedRunsName, limit: Option<i32>) -> Result<MissedRuns, FieldError> {
    match (m, limit) {
        (MissedRunsName::Skip, Some(_)) => Err(FieldError::new(
            "catch_up_limit",
            "invalid_combination",
            "only with missed_runs catch_up",
        )),
        (MissedRunsName::Skip, None) => Ok(MissedRuns::Skip),
        (MissedRunsName::CatchUp, limit) => {
            let limit = limit.unwrap_or(10);
            if !(1..=MAX_CATCH_UP).contains(&limit) {
                return Err(FieldError::new(
                    "catch_up_limit",
                    "out_of_range",
                    format!("must be 1 to {MAX_CATCH_UP}"),
                ));
            }
            Ok(MissedRuns::CatchUp {
                limit: limit as u32,
            })
        }
    }
}

fn view(row: ScheduleRow, recent_runs: Option<Vec<ScheduleRun>>) -> Result<ScheduleView, ApiError> {
    let (task_type, _) = row.task().map_err(|e| ApiError::internal(&e))?;
    let next_runs = match (row.paused, row.next_run_at) {
        (false, Some(next)) => {
            let cadence = row.cadence().map_err(|e| ApiError::internal(&e))?;
            let mut runs = vec![next];
            runs.extend(cadence.upcoming(next, NEXT_RUNS - 1));
            runs
        }
        _ => Vec::new(),
    };
    let missed_runs = row.missed().into();
    Ok(ScheduleView {
        id: row.id,
        name: row.name,
        cron: row.cron,
        time_zone: row.time_zone,
        task_type: task_type.into(),
        payload: row.payload,
        max_attempts: row.max_attempts,
        missed_runs,
        catch_up_limit: row.catch_up_limit,
        next_run_at: if row.paused { None } else { row.next_run_at },
        paused: row.paused,
        last_run_at: row.last_run_at,
        next_runs,
        recent_runs,
        owner: row.owner,
        version: row.version,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}
