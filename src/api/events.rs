//! `/events`: the global event log for auditors, in commit-safe order.

use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};

use super::auth::{BearerAuth, Role};
use super::error::{Failure, ListFailures};
use super::model::{Event, EventPage};
use super::ApiContext;
use crate::store::events;

#[derive(Tags)]
enum ApiTags {
    /// The global, tamper-evident event log.
    Events,
}

#[derive(ApiResponse)]
pub enum LogResponse {
    /// A page of the log.
    #[oai(status = 200)]
    Ok(Json<EventPage>),
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
        let rows = events::global_log(&self.ctx.pool, after, i64::from(limit)).await?;
        let next_after = rows.last().map_or(after, |e| e.position);
        Ok(LogResponse::Ok(Json(EventPage {
            events: rows.into_iter().map(Event::from).collect(),
            next_after,
        })))
    }
}
