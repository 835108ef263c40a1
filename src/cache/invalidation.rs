//! Which cache entries an event makes stale: the rules per task type, the keys a task declared
//! at enqueue (`invalidates`), and the API's own views. Pure functions; the projector
//! ([`crate::projector`]) applies them to the event log.
//!
//! Rules:
//! - every event of a task drops the API's view of that task (`task:{id}`), and a batch with any
//!   event drops the task statistics (`stats:tasks`);
//! - a successful `sync_calendar` drops `appointment:{id}`, `appointments:client:{client}`,
//!   `appointments:employee:{employee}:date:{YYYY-MM-DD}` and `stats:dashboard`, with the ids
//!   read from the payload (`appointment_data.appointment_id`, else the payload's `event_id`;
//!   `appointment_data.client_id`, `employee_id`, and the local date of `starts_at`); a key whose
//!   id is missing from the payload is skipped;
//! - a successful task of any type drops the keys and patterns it declared in `invalidates`.

use crate::domain::{TaskId, TaskType};
use chrono::DateTime;
use serde_json::Value;
use std::collections::BTreeSet;

use super::keys;

/// What the rules need to know about one event.
#[derive(Debug, Clone, Copy)]
pub struct EventFacts<'a> {
    pub task_id: TaskId,
    /// The event is an `attempt_succeeded`: the only one that drops more than the task's key.
    pub succeeded: bool,
    pub task_type: Option<TaskType>,
    pub payload: Option<&'a Value>,
    /// The task's `invalidates` as enqueued (a JSON array of strings).
    pub declared: Option<&'a Value>,
}

/// Keys and patterns to drop, without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub keys: BTreeSet<String>,
    pub patterns: BTreeSet<String>,
}

/// The one task type whose success invalidates keys named in its payload (its appointment's
/// views, see [`appointment_keys`]): the invalidator reads no other type's payload.
pub const PAYLOAD_RULES_TYPE: TaskType = TaskType::SyncCalendar;

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.patterns.is_empty()
    }

    /// Adds an entry declared by a task: a pattern if it holds a glob character.
    fn add_declared(&mut self, entry: &str) {
        if is_pattern(entry) {
            self.patterns.insert(entry.to_owned());
        } else {
            self.keys.insert(entry.to_owned());
        }
    }

    /// Adds what one event makes stale.
    pub fn add_event(&mut self, e: EventFacts<'_>) {
        self.keys.insert(keys::task(e.task_id));
        if !e.succeeded {
            return;
        }
        if e.task_type == Some(PAYLOAD_RULES_TYPE) {
            if let Some(payload) = e.payload {
                self.keys.extend(appointment_keys(payload));
            }
        }
        if let Some(Value::Array(declared)) = e.declared {
            for entry in declared.iter().filter_map(Value::as_str) {
                self.add_declared(entry);
            }
        }
    }
}

/// True if the entry is a glob pattern (`*`, `?` or `[`), not a plain key.
pub fn is_pattern(entry: &str) -> bool {
    entry.contains(['*', '?', '['])
}

/// The appointment keys a successful `sync_calendar` with this payload makes stale.
pub fn appointment_keys(payload: &Value) -> Vec<String> {
    let data = payload.get("appointment_data");
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let field = |name: &str| text(data.and_then(|d| d.get(name)));
    let mut out = vec![keys::dashboard_stats()];
    if let Some(id) = field("appointment_id").or_else(|| text(payload.get("event_id"))) {
        out.push(keys::appointment(id));
    }
    if let Some(client) = field("client_id") {
        out.push(keys::client_appointments(client));
    }
    let day = field("starts_at")
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.date_naive());
    if let (Some(employee), Some(day)) = (field("employee_id"), day) {
        out.push(keys::employee_appointments(employee, day));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts<'a>(
        event_type: &'a str,
        task_type: TaskType,
        payload: &'a Value,
        declared: Option<&'a Value>,
    ) -> EventFacts<'a> {
        EventFacts {
            task_id: TaskId::default(),
            succeeded: event_type == "attempt_succeeded",
            task_type: Some(task_type),
            payload: Some(payload),
            declared,
        }
    }

    #[test]
    fn a_successful_calendar_sync_drops_the_appointment_keys() {
        let payload = json!({
            "event_id": "evt-1",
            "action": "update",
            "appointment_data": {
                "appointment_id": "a-7", "client_id": "c-3", "employee_id": "e-9",
                "starts_at": "2026-12-01T23:30:00-05:00"
            }
        });
        let mut t = Targets::default();
        t.add_event(facts(
            "attempt_succeeded",
            TaskType::SyncCalendar,
            &payload,
            None,
        ));
        let keys: Vec<&str> = t.keys.iter().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "appointment:a-7",
                "appointments:client:c-3",
                // the local date of the appointment, not the UTC one
                "appointments:employee:e-9:date:2026-12-01",
                "stats:dashboard",
                "task:00000000-0000-0000-0000-000000000000",
            ]
        );
    }

    #[test]
    fn only_success_fires_the_type_rules_and_declared_keys() {
        let payload = json!({"event_id": "evt-1", "action": "delete"});
        let declared = json!(["client:1", "employees:specialty:*"]);
        for event in ["enqueued", "attempt_failed", "dead_lettered"] {
            let mut t = Targets::default();
            t.add_event(facts(
                event,
                TaskType::SyncCalendar,
                &payload,
                Some(&declared),
            ));
            assert_eq!(t.keys.len(), 1, "{event}: only the task view");
            assert!(t.patterns.is_empty());
        }
        let mut t = Targets::default();
        t.add_event(facts(
            "attempt_succeeded",
            TaskType::SyncCalendar,
            &payload,
            Some(&declared),
        ));
        assert!(t.keys.contains("appointment:evt-1"));
        assert!(t.keys.contains("client:1"));
        assert!(t.keys.contains("stats:dashboard"));
        assert_eq!(
            t.patterns.iter().collect::<Vec<_>>(),
            ["employees:specialty:*"]
        );
    }

    #[test]
    fn notifications_drop_only_what_they_declare() {
        let payload = json!({"phone": "+34600000000", "message": "hi"});
        let mut t = Targets::default();
        t.add_event(facts(
            "attempt_succeeded",
            TaskType::SendSms,
            &payload,
            None,
        ));
        assert_eq!(t.keys.len(), 1);
    }
}
