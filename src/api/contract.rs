//! The request and event documents as the spec describes them: one schema per task type (a
//! `oneOf` on `type`), typed payloads with their formats and limits, and the data of each event
//! type. Clients generated from the spec get a model per task type and per event.
//!
//! These types describe; the handlers still read the body as [`super::model::EnqueueRequest`]
//! and check it with [`crate::domain::validate_payload`], so a bad field is answered with 422
//! naming it (`payload.to`, `tasks[3].payload.phone`) rather than a parser's message.
//! [`Documented`] joins the two: the schema of one type, the reading and writing of another.
//! The limits here are the validators' own constants, and Schemathesis checks in CI that data
//! generated from these schemas is accepted.

use chrono::{DateTime, Utc};
use poem_openapi::registry::{MetaDiscriminatorObject, MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::types::{
    ParseError, ParseFromJSON, ParseFromParameter, ParseResult, ToJSON, Type,
};
use poem_openapi::{Enum, Object, Union};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use uuid::Uuid;

use super::model::FailureKindName;

/// A value the spec documents with `S`'s schema, read and written as `T`.
pub struct Documented<S, T> {
    pub value: T,
    schema: PhantomData<fn() -> S>,
}

impl<S, T> Documented<S, T> {
    pub fn new(value: T) -> Self {
        Documented {
            value,
            schema: PhantomData,
        }
    }
}

impl<S: Type, T: Send + Sync> Type for Documented<S, T> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        S::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        S::schema_ref()
    }

    fn register(registry: &mut Registry) {
        S::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(std::iter::once(self))
    }
}

impl<S: Type, T: ParseFromJSON> ParseFromJSON for Documented<S, T> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        T::parse_from_json(value)
            .map(Documented::new)
            .map_err(ParseError::propagate)
    }
}

impl<S: Type, T: ParseFromParameter> ParseFromParameter for Documented<S, T> {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        T::parse_from_parameter(value)
            .map(Documented::new)
            .map_err(ParseError::propagate)
    }
}

impl<S: Type, T: ToJSON> ToJSON for Documented<S, T> {
    fn to_json(&self) -> Option<Value> {
        self.value.to_json()
    }
}

/// A schema registered under `NAME` from a function: the documents whose shape poem-openapi's
/// derives cannot say (a `oneOf` whose members carry the discriminator themselves).
macro_rules! described {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $build:expr) => {
        $(#[$doc])*
        pub struct $ty;

        impl Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn schema_ref() -> MetaSchemaRef {
                MetaSchemaRef::Reference($name.to_owned())
            }

            fn register(registry: &mut Registry) {
                registry.create_schema::<Self, _>($name.to_owned(), $build);
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(
                &'a self,
            ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(std::iter::once(self))
            }
        }
    };
}

/// One member of a `oneOf`: its `type` value, its schema's name, and how to register it.
type Member = (&'static str, String, fn(&mut Registry));

/// A `oneOf` of object schemas told apart by their `type` property.
fn discriminated(
    registry: &mut Registry,
    description: &'static str,
    members: Vec<Member>,
) -> MetaSchema {
    let mut one_of = Vec::new();
    let mut mapping = Vec::new();
    for (tag, schema, register) in members {
        register(registry);
        mapping.push((tag.to_owned(), format!("#/components/schemas/{schema}")));
        one_of.push(MetaSchemaRef::Reference(schema));
    }
    MetaSchema {
        description: Some(description),
        one_of,
        discriminator: Some(MetaDiscriminatorObject {
            property_name: "type",
            mapping,
        }),
        ..MetaSchema::new("object")
    }
}

fn member<T: Type>(tag: &'static str) -> Member {
    (tag, T::name().into_owned(), T::register)
}

// --- small types ------------------------------------------------------------------------------

/// An e-mail address (`format: email`), as [`crate::domain::payload::is_email`] checks it.
#[derive(Debug, Clone)]
pub struct EmailAddress(pub String);

impl Type for EmailAddress {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        Cow::Borrowed("string_email")
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            format: Some("email"),
            max_length: Some(254),
            example: Some(Value::from("ana.garcia@example.com")),
            ..MetaSchema::new("string")
        }))
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(std::iter::once(&self.0))
    }
}

impl ParseFromJSON for EmailAddress {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        String::parse_from_json(value)
            .map(EmailAddress)
            .map_err(ParseError::propagate)
    }
}

impl ToJSON for EmailAddress {
    fn to_json(&self) -> Option<Value> {
        Some(Value::from(self.0.clone()))
    }
}

/// The clinic's message templates.
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum TemplateName {
    Confirmation,
    Reminder,
    Cancellation,
    Change,
}

/// The templates' languages (default `es`).
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum Locale {
    Es,
    En,
}

/// A template's values by name.
type TemplateData = BTreeMap<String, Value>;

// --- payloads ---------------------------------------------------------------------------------

/// An e-mail with literal text.
#[derive(Debug, Clone, Object)]
pub struct EmailMessage {
    pub to: EmailAddress,
    /// One line.
    #[oai(validator(
        min_length = 1,
        max_length = 998,
        pattern = r"^[^\r\n\u0000]*[^\s\u0000][^\r\n\u0000]*$"
    ))]
    pub subject: String,
    /// Plain text or HTML (a plain-text part is derived from HTML).
    #[oai(validator(
        min_length = 1,
        max_length = 65536,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub body: String,
}

/// An e-mail rendered from one of the clinic's templates when it is sent.
#[derive(Debug, Clone, Object)]
pub struct EmailTemplate {
    pub to: EmailAddress,
    pub template: TemplateName,
    /// What the template is filled with (e.g. `patient_name`, `starts_at`): strings without
    /// NUL, numbers between -1e300 and 1e300.
    pub data: TemplateData,
    pub locale: Option<Locale>,
}

/// The payload of `send_email`: literal text, or a template. Serialized, at most 65,536 bytes.
#[derive(Debug, Clone, Union)]
#[oai(one_of)]
pub enum EmailPayload {
    Message(EmailMessage),
    Template(EmailTemplate),
}

/// An SMS or WhatsApp message with literal text.
#[derive(Debug, Clone, Object)]
pub struct TextMessage {
    /// E.164, e.g. `+34600111222`.
    #[oai(validator(pattern = r"^\+[1-9][0-9]{7,14}$"))]
    pub phone: String,
    #[oai(validator(
        min_length = 1,
        max_length = 1600,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub message: String,
}

/// An SMS or WhatsApp message rendered from one of the clinic's templates when it is sent.
#[derive(Debug, Clone, Object)]
pub struct TemplateMessage {
    /// E.164, e.g. `+34600111222`.
    #[oai(validator(pattern = r"^\+[1-9][0-9]{7,14}$"))]
    pub phone: String,
    pub template: TemplateName,
    /// What the template is filled with (e.g. `patient_name`, `starts_at`): strings without
    /// NUL, numbers between -1e300 and 1e300.
    pub data: TemplateData,
    pub locale: Option<Locale>,
}

/// The payload of `send_sms` and `send_whatsapp`: literal text, or a template. Serialized, at
/// most 65,536 bytes.
#[derive(Debug, Clone, Union)]
#[oai(one_of)]
pub enum MessagePayload {
    Text(TextMessage),
    Template(TemplateMessage),
}

/// The appointment of a calendar event. Other fields (the clinic's own ids) are kept with the
/// task and ignored by the calendar channel.
#[derive(Debug, Clone, Object)]
pub struct AppointmentData {
    /// `2026-12-01T10:00:00+01:00`, or without the offset: local to `time_zone`.
    #[oai(validator(
        pattern = r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,9})?)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?$"
    ))]
    pub starts_at: String,
    /// After `starts_at`; default `starts_at` plus `duration_minutes`.
    #[oai(validator(
        pattern = r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,9})?)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?$"
    ))]
    pub ends_at: Option<String>,
    /// Used when `ends_at` is absent; default the channel's `GOOGLE_APPOINTMENT_MINUTES`.
    #[oai(validator(minimum(value = "1"), maximum(value = "1440")))]
    pub duration_minutes: Option<i64>,
    /// IANA name, e.g. `Europe/Madrid`; default the channel's `GOOGLE_CALENDAR_TIME_ZONE`.
    #[oai(validator(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_+\-/]+$"))]
    pub time_zone: Option<String>,
    /// The event's title (default `Cita`).
    #[oai(validator(
        min_length = 1,
        max_length = 1024,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub summary: Option<String>,
    #[oai(validator(
        min_length = 1,
        max_length = 8192,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub description: Option<String>,
    #[oai(validator(
        min_length = 1,
        max_length = 1024,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub location: Option<String>,
    #[oai(validator(max_items = 100))]
    pub attendees: Option<Vec<EmailAddress>>,
}

/// Creates or replaces the calendar event.
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum ChangeAction {
    Create,
    Update,
}

/// Deletes the calendar event.
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum DeleteAction {
    Delete,
}

/// Creates or updates the appointment's calendar event.
#[derive(Debug, Clone, Object)]
pub struct CalendarChange {
    /// The clinic's appointment id; every action on it addresses the same calendar event.
    #[oai(validator(
        min_length = 1,
        max_length = 1024,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub event_id: String,
    pub action: ChangeAction,
    pub appointment_data: AppointmentData,
}

/// Deletes the appointment's calendar event (`appointment_data` is not needed; when given it is
/// checked like a change's).
#[derive(Debug, Clone, Object)]
pub struct CalendarDelete {
    /// The clinic's appointment id.
    #[oai(validator(
        min_length = 1,
        max_length = 1024,
        pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    ))]
    pub event_id: String,
    pub action: DeleteAction,
    pub appointment_data: Option<AppointmentData>,
}

/// The payload of `sync_calendar`.
#[derive(Debug, Clone, Union)]
#[oai(one_of)]
pub enum CalendarPayload {
    Change(CalendarChange),
    Delete(CalendarDelete),
}

// --- tasks ------------------------------------------------------------------------------------

/// How a task runs, common to every task type.
#[derive(Debug, Clone, Object)]
pub struct TaskOptions {
    /// Makes the request safe to repeat: the same key again returns the task it created (200);
    /// with a different request, 409.
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$"
    ))]
    pub idempotency_key: Option<String>,
    /// Attempts before the task is dead-lettered.
    #[oai(
        default = "default_attempts",
        validator(minimum(value = "1"), maximum(value = "25"))
    )]
    pub max_attempts: Option<i32>,
    /// When the task should first run; default now, at most `SCHEDULE_HORIZON_DAYS` (default
    /// 366) days ahead. A time in the past counts as now.
    pub run_at: Option<DateTime<Utc>>,
    /// Cache keys (`client:42`) or glob patterns starting with one of the clinic's key families
    /// (`appointments:client:42:*`) to drop once the task succeeds; each is also published on
    /// `arnela:cache:invalidations`. Patterns need a token granted them (else 403).
    #[oai(validator(
        max_items = 64,
        min_length = 1,
        max_length = 200,
        pattern = r"^(?:[^\s\u0000-\u001f\u007f-\u009f*?\[]+|(?:appointments:employee:|appointments:client:|employees:specialty:|employees:list|clients:list|stats:dashboard|appointment:|employee:|client:)[^\s\u0000-\u001f\u007f-\u009f]*)$"
    ))]
    pub invalidates: Option<Vec<String>>,
}

fn default_attempts() -> Option<i32> {
    Some(crate::domain::task::DEFAULT_MAX_ATTEMPTS)
}

macro_rules! task_schema {
    ($(#[$doc:meta])* $task:ident, $tag_ty:ident, $tag:literal, $payload:ty) => {
        /// The task type.
        #[derive(Debug, Clone, Copy, Enum)]
        pub enum $tag_ty {
            #[oai(rename = $tag)]
            Tag,
        }

        $(#[$doc])*
        #[derive(Debug, Clone, Object)]
        pub struct $task {
            #[oai(rename = "type")]
            pub task_type: $tag_ty,
            pub payload: $payload,
            #[oai(flatten)]
            pub options: TaskOptions,
        }
    };
}

task_schema!(
    /// Sends an e-mail (SMTP or SendGrid).
    SendEmailTask, SendEmailType, "send_email", EmailPayload
);
task_schema!(
    /// Sends an SMS (Twilio).
    SendSmsTask, SendSmsType, "send_sms", MessagePayload
);
task_schema!(
    /// Sends a WhatsApp message (Twilio).
    SendWhatsappTask, SendWhatsappType, "send_whatsapp", MessagePayload
);
task_schema!(
    /// Creates, updates or deletes the appointment's Google Calendar event.
    SyncCalendarTask, SyncCalendarType, "sync_calendar", CalendarPayload
);

described!(
    /// A task to enqueue: one schema per task type, told apart by `type`.
    TaskRequest,
    "TaskRequest",
    |registry| discriminated(
        registry,
        "A task to enqueue; `type` says which payload it carries.",
        vec![
            member::<SendEmailTask>("send_email"),
            member::<SendSmsTask>("send_sms"),
            member::<SendWhatsappTask>("send_whatsapp"),
            member::<SyncCalendarTask>("sync_calendar"),
        ],
    )
);

described!(
    /// Up to 1000 tasks to enqueue in one transaction.
    TaskBatch,
    "TaskBatch",
    |registry| {
        TaskRequest::register(registry);
        MetaSchema {
            description: Some("Up to 1000 tasks to enqueue in one transaction, all or nothing."),
            required: vec!["tasks"],
            properties: vec![(
                "tasks",
                MetaSchemaRef::Inline(Box::new(MetaSchema {
                    items: Some(Box::new(TaskRequest::schema_ref())),
                    min_items: Some(1),
                    max_items: Some(super::tasks::MAX_BATCH),
                    ..MetaSchema::new("array")
                })),
            )],
            ..MetaSchema::new("object")
        }
    }
);

// --- events -----------------------------------------------------------------------------------

/// The data of `enqueued`: the task as it was accepted.
#[derive(Debug, Clone, Object)]
pub struct EnqueuedData {
    pub task_type: super::model::TaskTypeName,
    /// The payload of the task's type (see the request schemas); its personal fields read
    /// `"[erased]"` once the task was erased.
    pub payload: BTreeMap<String, Value>,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    #[oai(nullable)]
    pub idempotency_key: Option<String>,
    /// Absent when none were declared.
    pub invalidates: Option<Vec<String>>,
    /// Who the task belongs to (absent for tasks written before owners were recorded).
    pub owner: Option<String>,
    /// The W3C trace context of the enqueuing request (absent for tasks written before it was
    /// recorded).
    pub trace: Option<TraceData>,
}

/// A W3C trace context.
#[derive(Debug, Clone, Object)]
pub struct TraceData {
    /// `00-{trace id}-{parent span id}-{flags}`.
    pub traceparent: String,
    pub tracestate: Option<String>,
}

/// The data of `dispatched`: a delivery for `attempt` was put on the Redis queue.
#[derive(Debug, Clone, Object)]
pub struct DispatchedData {
    pub attempt: i32,
}

/// The data of `attempt_started`.
#[derive(Debug, Clone, Object)]
pub struct AttemptStartedData {
    pub attempt: i32,
    pub worker_id: Uuid,
    pub lease_expires_at: DateTime<Utc>,
}

/// The data of `attempt_succeeded`.
#[derive(Debug, Clone, Object)]
pub struct AttemptSucceededData {
    pub attempt: i32,
    /// What the channel reported (provider message ids and the like).
    pub result: Value,
    pub duration_ms: i64,
}

/// The data of `attempt_failed`.
#[derive(Debug, Clone, Object)]
pub struct AttemptFailedData {
    pub attempt: i32,
    pub kind: FailureKindName,
    pub error: String,
    pub duration_ms: i64,
}

/// The data of `retry_scheduled`.
#[derive(Debug, Clone, Object)]
pub struct RetryScheduledData {
    pub next_attempt: i32,
    pub delay_ms: i64,
    pub available_at: DateTime<Utc>,
}

/// The data of `attempt_released`: the worker gave the attempt back unfinished.
#[derive(Debug, Clone, Object)]
pub struct AttemptReleasedData {
    pub attempt: i32,
    pub reason: String,
}

/// The data of `attempt_stopped`: a worker stopped its handler after losing the lease.
#[derive(Debug, Clone, Object)]
pub struct AttemptStoppedData {
    pub attempt: i32,
    pub worker_id: Uuid,
    pub reason: String,
}

/// The data of `dead_lettered`.
#[derive(Debug, Clone, Object)]
pub struct DeadLetteredData {
    pub reason: String,
}

/// The data of `requeued`.
#[derive(Debug, Clone, Object)]
pub struct RequeuedData {
    pub max_attempts: i32,
    /// The operator's token subject.
    pub by: String,
}

/// The data of `cancelled`.
#[derive(Debug, Clone, Object)]
pub struct CancelledData {
    pub reason: String,
    /// The operator's token subject.
    pub by: String,
}

/// The data of `erased`.
#[derive(Debug, Clone, Object)]
pub struct ErasedData {
    pub reason: String,
    /// The admin's token subject.
    pub by: String,
}

macro_rules! event_schema {
    ($(#[$doc:meta])* $event:ident, $tag_ty:ident, $tag:literal, $data:ty) => {
        /// The event type.
        #[derive(Debug, Clone, Copy, Enum)]
        pub enum $tag_ty {
            #[oai(rename = $tag)]
            Tag,
        }

        $(#[$doc])*
        #[derive(Debug, Clone, Object)]
        pub struct $event {
            /// Position in the global log (commit-safe order).
            pub position: i64,
            pub task_id: Uuid,
            /// 1, 2, 3, ... within the task.
            pub sequence: i32,
            #[oai(rename = "type")]
            pub event_type: $tag_ty,
            /// Version of the event's data schema.
            pub version: i32,
            pub data: $data,
            pub occurred_at: DateTime<Utc>,
            pub recorded_at: DateTime<Utc>,
            /// SHA-256 (hex) over `prev_hash` and this event's canonical content; from
            /// `hash_version` 2 on also over `position` and `recorded_at` (README, "Audit").
            #[oai(validator(pattern = "^[0-9a-f]{64}$"))]
            pub hash: String,
            /// The form of `hash`: 1 for events stored before version 2 existed, then 2.
            #[oai(validator(minimum(value = "1"), maximum(value = "2")))]
            pub hash_version: i16,
            /// The hash of the previous event of the same task (absent for the first).
            #[oai(validator(pattern = "^[0-9a-f]{64}$"))]
            pub prev_hash: Option<String>,
        }
    };
}

event_schema!(
    /// The task was accepted.
    EnqueuedEvent, EnqueuedType, "enqueued", EnqueuedData
);
event_schema!(
    /// A delivery was put on the Redis queue.
    DispatchedEvent, DispatchedType, "dispatched", DispatchedData
);
event_schema!(
    /// A worker claimed an attempt.
    AttemptStartedEvent, AttemptStartedType, "attempt_started", AttemptStartedData
);
event_schema!(
    /// An attempt succeeded.
    AttemptSucceededEvent, AttemptSucceededType, "attempt_succeeded", AttemptSucceededData
);
event_schema!(
    /// An attempt failed.
    AttemptFailedEvent, AttemptFailedType, "attempt_failed", AttemptFailedData
);
event_schema!(
    /// Another attempt is scheduled.
    RetryScheduledEvent, RetryScheduledType, "retry_scheduled", RetryScheduledData
);
event_schema!(
    /// A worker gave an attempt back unfinished (shutdown); the same attempt runs again.
    AttemptReleasedEvent, AttemptReleasedType, "attempt_released", AttemptReleasedData
);
event_schema!(
    /// A worker stopped its handler after losing the lease.
    AttemptStoppedEvent, AttemptStoppedType, "attempt_stopped", AttemptStoppedData
);
event_schema!(
    /// The task will not run again by itself.
    DeadLetteredEvent, DeadLetteredType, "dead_lettered", DeadLetteredData
);
event_schema!(
    /// An operator gave a dead task a new attempt budget.
    RequeuedEvent, RequeuedType, "requeued", RequeuedData
);
event_schema!(
    /// An operator cancelled the task.
    CancelledEvent, CancelledType, "cancelled", CancelledData
);
event_schema!(
    /// An admin erased the task's personal data (its data key was destroyed).
    ErasedEvent, ErasedType, "erased", ErasedData
);

described!(
    /// One event of a task's history; `type` says what its `data` holds.
    Event,
    "Event",
    |registry| discriminated(
        registry,
        "One event of a task's history, chained to the task's previous event by `prev_hash`; \
         `type` says what `data` holds.",
        vec![
            member::<EnqueuedEvent>("enqueued"),
            member::<DispatchedEvent>("dispatched"),
            member::<AttemptStartedEvent>("attempt_started"),
            member::<AttemptSucceededEvent>("attempt_succeeded"),
            member::<AttemptFailedEvent>("attempt_failed"),
            member::<RetryScheduledEvent>("retry_scheduled"),
            member::<AttemptReleasedEvent>("attempt_released"),
            member::<AttemptStoppedEvent>("attempt_stopped"),
            member::<DeadLetteredEvent>("dead_lettered"),
            member::<RequeuedEvent>("requeued"),
            member::<CancelledEvent>("cancelled"),
            member::<ErasedEvent>("erased"),
        ],
    )
);

/// The request schemas that refuse unknown fields, as the handlers do.
pub const CLOSED_SCHEMAS: &[&str] = &[
    "TaskBatch",
    "SendEmailTask",
    "SendSmsTask",
    "SendWhatsappTask",
    "SyncCalendarTask",
    "EmailMessage",
    "EmailTemplate",
    "TextMessage",
    "TemplateMessage",
    "CalendarChange",
    "CalendarDelete",
];
