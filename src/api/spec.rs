//! The finishing touches poem-openapi's derives cannot express, applied to the produced document
//! in one place: `additionalProperties: false` on the request schemas that refuse unknown fields,
//! and an example on every request and response document (a real-looking clinic task of each
//! type), so Swagger UI's "Try it out" works without editing.

use serde_json::{json, Value};

use super::contract::CLOSED_SCHEMAS;

const TASK_ID: &str = "0193b4a2-6c1e-7d40-9a57-3f2e8c1d5b60";
const WORKER_ID: &str = "0193b4a2-7f00-7aa1-8c2b-1d9e4f6a0b13";

fn email_task() -> Value {
    json!({
        "type": "send_email",
        "payload": {
            "to": "ana.garcia@example.com",
            "subject": "Confirmación de su cita del 1 de diciembre",
            "body": "<p>Hola Ana, su cita con la Dra. López es el martes 1 de diciembre a las 10:00.</p>"
        },
        "idempotency_key": "appointment-4711-confirmation",
        "max_attempts": 5
    })
}

fn sms_task() -> Value {
    json!({
        "type": "send_sms",
        "payload": {
            "phone": "+34600111222",
            "template": "reminder",
            "data": {"patient_name": "Ana", "starts_at": "2026-12-01T10:00:00+01:00", "clinic": "Clínica Arnela"},
            "locale": "es"
        },
        "idempotency_key": "appointment-4711-reminder-sms"
    })
}

fn whatsapp_task() -> Value {
    json!({
        "type": "send_whatsapp",
        "payload": {
            "phone": "+34600111333",
            "message": "Hola Ana, le recordamos su cita mañana a las 10:00 en Clínica Arnela."
        },
        "invalidates": ["client:4711"]
    })
}

fn calendar_task() -> Value {
    json!({
        "type": "sync_calendar",
        "payload": {
            "event_id": "appointment-4711",
            "action": "create",
            "appointment_data": {
                "starts_at": "2026-12-01T10:00:00+01:00",
                "duration_minutes": 30,
                "time_zone": "Europe/Madrid",
                "summary": "Revisión — Ana García",
                "location": "Clínica Arnela, consulta 2",
                "attendees": ["ana.garcia@example.com"]
            }
        },
        "invalidates": ["appointments:client:4711:*"]
    })
}

fn task_view() -> Value {
    json!({
        "id": TASK_ID,
        "type": "send_sms",
        "payload": {"phone": "+34600111222", "message": "Hola Ana, le recordamos su cita mañana a las 10:00."},
        "status": "queued",
        "attempts": 0,
        "max_attempts": 3,
        "run_at": "2026-11-30T09:00:00Z",
        "idempotency_key": "appointment-4711-reminder-sms",
        "version": 1,
        "created_at": "2026-11-29T12:00:00Z",
        "updated_at": "2026-11-29T12:00:00Z",
        "owner": "appointments"
    })
}

fn envelope(position: i64, sequence: i32, event_type: &str, data: Value, prev: bool) -> Value {
    let mut e = json!({
        "position": position,
        "task_id": TASK_ID,
        "sequence": sequence,
        "type": event_type,
        "version": 1,
        "data": data,
        "occurred_at": "2026-11-29T12:00:01Z",
        "recorded_at": "2026-11-29T12:00:01Z",
        "hash": "5c2f0b8e1d7a4c3b9e6f2a1d0c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b",
        "hash_version": 2,
    });
    if prev {
        e["prev_hash"] = json!("9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b");
    }
    e
}

/// An example per schema; each must be valid against its schema (checked by a test).
pub fn examples() -> Vec<(&'static str, Value)> {
    vec![
        ("SendEmailTask", email_task()),
        ("SendSmsTask", sms_task()),
        ("SendWhatsappTask", whatsapp_task()),
        ("SyncCalendarTask", calendar_task()),
        (
            "TaskBatch",
            json!({"tasks": [email_task(), sms_task(), whatsapp_task(), calendar_task()]}),
        ),
        ("TaskView", task_view()),
        (
            "BatchResult",
            json!({"tasks": [task_view()], "created": 1, "existing": 0}),
        ),
        (
            "TaskPage",
            json!({"items": [task_view()], "next_after": 1042}),
        ),
        (
            "EnqueuedEvent",
            envelope(
                1042,
                1,
                "enqueued",
                json!({
                    "task_type": "send_sms",
                    "payload": {"phone": "+34600111222", "message": "Hola Ana, le recordamos su cita mañana a las 10:00."},
                    "max_attempts": 3,
                    "run_at": "2026-11-30T09:00:00Z",
                    "idempotency_key": "appointment-4711-reminder-sms",
                    "owner": "appointments"
                }),
                false,
            ),
        ),
        (
            "DispatchedEvent",
            envelope(1043, 2, "dispatched", json!({"attempt": 1}), true),
        ),
        (
            "AttemptStartedEvent",
            envelope(
                1044,
                3,
                "attempt_started",
                json!({"attempt": 1, "worker_id": WORKER_ID, "lease_expires_at": "2026-11-30T09:00:31Z"}),
                true,
            ),
        ),
        (
            "AttemptSucceededEvent",
            envelope(
                1045,
                4,
                "attempt_succeeded",
                json!({"attempt": 1, "result": {"provider": "twilio", "sid": "SM0123456789abcdef0123456789abcdef"}, "duration_ms": 182}),
                true,
            ),
        ),
        (
            "AttemptFailedEvent",
            envelope(
                1045,
                4,
                "attempt_failed",
                json!({"attempt": 1, "kind": "retryable", "error": "twilio: 503 service unavailable", "duration_ms": 5012}),
                true,
            ),
        ),
        (
            "RetryScheduledEvent",
            envelope(
                1046,
                5,
                "retry_scheduled",
                json!({"next_attempt": 2, "delay_ms": 2000, "available_at": "2026-11-30T09:00:08Z"}),
                true,
            ),
        ),
        (
            "AttemptReleasedEvent",
            envelope(
                1045,
                4,
                "attempt_released",
                json!({"attempt": 1, "reason": "the worker is shutting down"}),
                true,
            ),
        ),
        (
            "AttemptStoppedEvent",
            envelope(
                1047,
                5,
                "attempt_stopped",
                json!({"attempt": 1, "worker_id": WORKER_ID, "reason": "the lease was taken over"}),
                true,
            ),
        ),
        (
            "DeadLetteredEvent",
            envelope(
                1050,
                9,
                "dead_lettered",
                json!({"reason": "twilio: 21211 invalid 'To' phone number"}),
                true,
            ),
        ),
        (
            "RequeuedEvent",
            envelope(
                1060,
                10,
                "requeued",
                json!({"max_attempts": 3, "by": "maria.ops"}),
                true,
            ),
        ),
        (
            "CancelledEvent",
            envelope(
                1061,
                2,
                "cancelled",
                json!({"reason": "patient called to cancel", "by": "maria.ops"}),
                true,
            ),
        ),
        (
            "ErasedEvent",
            envelope(
                1070,
                6,
                "erased",
                json!({"reason": "data subject request", "by": "maria.ops"}),
                true,
            ),
        ),
        (
            "EventPage",
            json!({"events": [envelope(1043, 2, "dispatched", json!({"attempt": 1}), true)], "next_after": 1043}),
        ),
        (
            "TaskStats",
            json!({
                "types": [{
                    "type": "send_sms", "enqueued": 1200, "attempts_started": 1215, "succeeded": 1180,
                    "attempts_failed": 35, "retries": 30, "dead": 5, "cancelled": 2, "requeued": 1,
                    "by_status": {"queued": 12, "running": 1, "retrying": 0, "succeeded": 1180, "dead": 5, "cancelled": 2}
                }],
                "projected_through": 4810
            }),
        ),
        (
            "HealthReport",
            json!({
                "status": "healthy",
                "database": "connected",
                "redis": "connected",
                "workers": {
                    "tasks_processed": 15230, "tasks_failed": 12, "active_workers": 10,
                    "processes": [{"process": WORKER_ID, "workers": 5}, {"process": TASK_ID, "workers": 5}]
                },
                "dependencies": {
                    "database": {"status": "connected", "latency_ms": 0.8},
                    "redis": {"status": "connected", "latency_ms": 0.3}
                },
                "queues": {"tasks": 4, "processing": 2, "failed": 12},
                "outbox": {"backlog": 0, "oldest_due_age_seconds": 0.0},
                "projectors": [{
                    "name": "totals", "position": 4810, "events": 61200, "lag_seconds": 0.0,
                    "updated_at": "2026-11-29T12:00:01Z"
                }],
                "channels": {
                    "send_email": "smtp", "send_sms": "twilio_sms",
                    "send_whatsapp": "twilio_whatsapp", "sync_calendar": "google_calendar"
                }
            }),
        ),
        (
            "ReadyReport",
            json!({"status": "healthy", "database": "connected", "redis": "connected"}),
        ),
        ("EmailMessage", email_task()["payload"].clone()),
        (
            "EmailTemplate",
            json!({"to": "ana.garcia@example.com", "template": "confirmation",
                   "data": {"patient_name": "Ana", "starts_at": "2026-12-01T10:00:00+01:00"}, "locale": "es"}),
        ),
        ("TextMessage", whatsapp_task()["payload"].clone()),
        ("TemplateMessage", sms_task()["payload"].clone()),
        ("CalendarChange", calendar_task()["payload"].clone()),
        (
            "CalendarDelete",
            json!({"event_id": "appointment-4711", "action": "delete"}),
        ),
        (
            "AppointmentData",
            calendar_task()["payload"]["appointment_data"].clone(),
        ),
        (
            "ErrorBody",
            json!({
                "code": "validation_failed",
                "message": "payload.phone: must be an E.164 number like +34123456789",
                "field": "payload.phone",
                "reason": "invalid_format"
            }),
        ),
    ]
}

/// Applies the touches to the JSON document poem-openapi produced.
pub fn refine(produced: &str) -> String {
    let mut doc: Value = serde_json::from_str(produced).expect("poem-openapi produces JSON");
    let schemas = &mut doc["components"]["schemas"];
    for name in CLOSED_SCHEMAS {
        if let Some(s) = schemas.get_mut(*name) {
            s["additionalProperties"] = Value::Bool(false);
        }
    }
    for (name, example) in examples() {
        if let Some(s) = schemas.get_mut(name) {
            s["example"] = example;
        }
    }
    serde_json::to_string_pretty(&doc).expect("a JSON value serializes")
}
