//! Task types and their payloads, validated at the boundary.
//!
//! A [`TaskType`] names one of the four kinds of work the clinic sends; [`validate_payload`] turns
//! an arbitrary JSON document into a [`ValidPayload`] or says exactly which field is wrong.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

use super::appointment::Appointment;

/// The largest serialized payload accepted for one task.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The longest SMS / WhatsApp message accepted (Twilio's own limit).
pub const MAX_MESSAGE_CHARS: usize = 1600;
/// The longest e-mail subject accepted (RFC 5322 line limit).
pub const MAX_SUBJECT_CHARS: usize = 998;

/// The kinds of task Arnela runs. The wire names are the ones users already rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    SendEmail,
    SendSms,
    SendWhatsapp,
    SyncCalendar,
}

impl TaskType {
    pub const ALL: [TaskType; 4] = [
        TaskType::SendEmail,
        TaskType::SendSms,
        TaskType::SendWhatsapp,
        TaskType::SyncCalendar,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::SendEmail => "send_email",
            TaskType::SendSms => "send_sms",
            TaskType::SendWhatsapp => "send_whatsapp",
            TaskType::SyncCalendar => "sync_calendar",
        }
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskType {
    type Err = UnknownTaskType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTaskType(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task type {0:?}")]
pub struct UnknownTaskType(pub String);

/// One field of the input that is not acceptable, with a stable machine-readable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `payload.to`.
    pub field: String,
    /// Stable code: `required`, `invalid_type`, `invalid_format`, `too_long`, `unknown_field`, ...
    pub code: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

/// Most cache entries one task may declare in `invalidates`.
pub const MAX_INVALIDATES: usize = 64;

/// Checks the cache keys and patterns a task declares in `invalidates`: at most
/// [`MAX_INVALIDATES`] entries of 1 to 200 printable characters without spaces; a pattern (with
/// `*`, `?` or `[`) must start with at least three literal characters, so no task can empty the
/// whole cache.
pub fn validate_invalidates(entries: Vec<String>) -> Result<Vec<String>, FieldError> {
    if entries.len() > MAX_INVALIDATES {
        return Err(FieldError::new(
            "invalidates",
            "too_many",
            format!("at most {MAX_INVALIDATES} keys or patterns"),
        ));
    }
    for (i, e) in entries.iter().enumerate() {
        let field = format!("invalidates[{i}]");
        if e.is_empty() || e.chars().count() > 200 {
            return Err(FieldError::new(
                field,
                "invalid_length",
                "must be 1 to 200 characters",
            ));
        }
        if e.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(FieldError::new(
                field,
                "invalid_format",
                "must not contain spaces or control characters",
            ));
        }
        let literal = e.find(['*', '?', '[']).unwrap_or(e.len());
        if literal < e.len() && literal < 3 {
            return Err(FieldError::new(
                field,
                "invalid_format",
                "a pattern must start with at least 3 literal characters (e.g. client:*)",
            ));
        }
    }
    Ok(entries)
}

/// A payload that has passed the checks of its task type.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPayload(Value);

impl ValidPayload {
    pub fn as_json(&self) -> &Value {
        &self.0
    }

    pub fn into_json(self) -> Value {
        self.0
    }
}

/// Calendar sync actions.
pub const CALENDAR_ACTIONS: [&str; 3] = ["create", "update", "delete"];

/// The clinic's message templates a task may name instead of literal text.
pub const TEMPLATE_NAMES: [&str; 4] = ["confirmation", "reminder", "cancellation", "change"];
/// The languages of the templates; the first is the default.
pub const TEMPLATE_LOCALES: [&str; 2] = ["es", "en"];

/// Checks `payload` against the schema of `task_type`.
///
/// Unknown fields are refused (a typo must not silently drop data), strings may not contain NUL
/// (Postgres cannot store it), and the serialized payload must fit [`MAX_PAYLOAD_BYTES`].
///
/// Messages (e-mail, SMS, WhatsApp) carry either literal text (`subject` + `body`, or `message`)
/// or a `template` from [`TEMPLATE_NAMES`] with its `data` object and an optional `locale` from
/// [`TEMPLATE_LOCALES`]; the channel renders the template when it sends. Whether `data` holds
/// what the template needs is found out then (a permanent failure), not here.
pub fn validate_payload(task_type: TaskType, payload: Value) -> Result<ValidPayload, FieldError> {
    let Value::Object(map) = &payload else {
        return Err(FieldError::new(
            "payload",
            "invalid_type",
            "payload must be a JSON object",
        ));
    };
    check_no_nul("payload", &payload)?;
    let size = serde_json::to_vec(&payload).map(|v| v.len()).unwrap_or(0);
    if size > MAX_PAYLOAD_BYTES {
        return Err(FieldError::new(
            "payload",
            "too_large",
            format!("payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}"),
        ));
    }
    match task_type {
        TaskType::SendEmail => {
            only_fields(
                map,
                &["to", "subject", "body", "template", "data", "locale"],
            )?;
            let to = required_str(map, "to")?;
            if !is_email(to) {
                return Err(FieldError::new(
                    "payload.to",
                    "invalid_format",
                    "must be an e-mail address like name@example.com",
                ));
            }
            if template_fields(map, &["subject", "body"])? {
                return Ok(ValidPayload(payload));
            }
            let subject = required_str(map, "subject")?;
            max_chars("payload.subject", subject, MAX_SUBJECT_CHARS)?;
            if subject.contains(['\r', '\n']) {
                return Err(FieldError::new(
                    "payload.subject",
                    "invalid_format",
                    "must be a single line",
                ));
            }
            required_str(map, "body")?;
        }
        TaskType::SendSms | TaskType::SendWhatsapp => {
            only_fields(map, &["phone", "message", "template", "data", "locale"])?;
            let phone = required_str(map, "phone")?;
            if !is_e164(phone) {
                return Err(FieldError::new(
                    "payload.phone",
                    "invalid_format",
                    "must be an E.164 number like +34123456789",
                ));
            }
            if template_fields(map, &["message"])? {
                return Ok(ValidPayload(payload));
            }
            let message = required_str(map, "message")?;
            max_chars("payload.message", message, MAX_MESSAGE_CHARS)?;
        }
        TaskType::SyncCalendar => {
            only_fields(map, &["event_id", "action", "appointment_data"])?;
            let event_id = required_str(map, "event_id")?;
            max_chars("payload.event_id", event_id, 1024)?;
            let action = required_str(map, "action")?;
            if !CALENDAR_ACTIONS.contains(&action) {
                return Err(FieldError::new(
                    "payload.action",
                    "invalid_value",
                    "must be one of create, update, delete",
                ));
            }
            match map.get("appointment_data") {
                Some(data @ Value::Object(_)) => {
                    Appointment::parse("payload.appointment_data", data)?;
                }
                None | Some(Value::Null) if action == "delete" => {}
                None => {
                    return Err(FieldError::new(
                        "payload.appointment_data",
                        "required",
                        "is required for create and update",
                    ))
                }
                Some(_) => {
                    return Err(FieldError::new(
                        "payload.appointment_data",
                        "invalid_type",
                        "must be a JSON object",
                    ))
                }
            }
        }
    }
    Ok(ValidPayload(payload))
}

/// Checks the template fields of a message. `Ok(true)`: the message is a valid template
/// (`template`, `data`, optional `locale`, none of the `literal` fields); `Ok(false)`: it has no
/// template field at all and its literal fields are to be checked.
fn template_fields(map: &Map<String, Value>, literal: &[&str]) -> Result<bool, FieldError> {
    if !map.contains_key("template") {
        if let Some(k) = ["data", "locale"]
            .into_iter()
            .find(|k| map.contains_key(*k))
        {
            return Err(FieldError::new(
                format!("payload.{k}"),
                "invalid_combination",
                "is only used with template",
            ));
        }
        return Ok(false);
    }
    if let Some(k) = literal.iter().find(|k| map.contains_key(**k)) {
        return Err(FieldError::new(
            format!("payload.{k}"),
            "invalid_combination",
            format!(
                "must not be given with template (give either template and data, or {})",
                literal.join(" and ")
            ),
        ));
    }
    let template = required_str(map, "template")?;
    if !TEMPLATE_NAMES.contains(&template) {
        return Err(FieldError::new(
            "payload.template",
            "invalid_value",
            format!("must be one of {}", TEMPLATE_NAMES.join(", ")),
        ));
    }
    match map.get("data") {
        Some(Value::Object(_)) => {}
        None | Some(Value::Null) => {
            return Err(FieldError::new(
                "payload.data",
                "required",
                "is required with template",
            ))
        }
        Some(_) => {
            return Err(FieldError::new(
                "payload.data",
                "invalid_type",
                "must be a JSON object",
            ))
        }
    }
    if map.contains_key("locale") {
        let locale = required_str(map, "locale")?;
        if !TEMPLATE_LOCALES.contains(&locale) {
            return Err(FieldError::new(
                "payload.locale",
                "invalid_value",
                format!("must be one of {}", TEMPLATE_LOCALES.join(", ")),
            ));
        }
    }
    Ok(true)
}

fn only_fields(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), FieldError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(FieldError::new(
            format!("payload.{k}"),
            "unknown_field",
            format!(
                "is not a field of this task type (expected {})",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn required_str<'a>(map: &'a Map<String, Value>, name: &str) -> Result<&'a str, FieldError> {
    let field = format!("payload.{name}");
    match map.get(name) {
        None | Some(Value::Null) => Err(FieldError::new(field, "required", "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(FieldError::new(field, "required", "must not be empty"))
        }
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(FieldError::new(field, "invalid_type", "must be a string")),
    }
}

fn max_chars(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    let n = value.chars().count();
    if n > max {
        return Err(FieldError::new(
            field,
            "too_long",
            format!("is {n} characters; the limit is {max}"),
        ));
    }
    Ok(())
}

/// The largest magnitude of a number in a payload: Postgres keeps jsonb numbers as exact
/// decimals, and ones near `f64::MAX` no longer read back as a finite `f64`.
pub const MAX_NUMBER: f64 = 1e300;

/// Checks every string and number of a payload: no NUL (Postgres cannot store it), no number
/// beyond [`MAX_NUMBER`].
fn check_no_nul(path: &str, value: &Value) -> Result<(), FieldError> {
    match value {
        Value::Number(n) if n.as_f64().is_some_and(|f| f.abs() > MAX_NUMBER) => {
            Err(FieldError::new(
                path,
                "out_of_range",
                "numbers must be between -1e300 and 1e300",
            ))
        }
        Value::String(s) if s.contains('\0') => Err(FieldError::new(
            path,
            "invalid_format",
            "must not contain NUL characters",
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_no_nul(&format!("{path}[{i}]"), v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            let child = format!("{path}.{k}");
            if k.contains('\0') {
                return Err(FieldError::new(
                    child,
                    "invalid_format",
                    "keys must not contain NUL characters",
                ));
            }
            check_no_nul(&child, v)
        }),
        _ => Ok(()),
    }
}

/// An address lettre accepts (RFC 5321/6531: a local part and a domain, UTF-8 allowed) whose
/// domain has a dot (a dotless domain is an error in a clinic's data, not a host on the local
/// network), 254 bytes at most.
pub fn is_email(s: &str) -> bool {
    s.len() <= 254
        && s.parse::<lettre::Address>().is_ok_and(|a| {
            let domain = a.domain();
            domain.contains('.') && !domain.starts_with('[')
        })
}

/// E.164: a `+`, a country code that does not start with 0, 8 to 15 digits in all.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn declared_invalidations_are_keys_or_narrow_patterns() {
        let ok = vec!["client:1".to_owned(), "appointments:client:*".to_owned()];
        assert_eq!(validate_invalidates(ok.clone()), Ok(ok));
        for bad in ["", "*", "a*", "two words", "x\u{7}y"] {
            let err = validate_invalidates(vec!["client:1".into(), bad.into()]).unwrap_err();
            assert_eq!(err.field, "invalidates[1]", "{bad:?}");
        }
        let many = vec!["client:1".to_owned(); MAX_INVALIDATES + 1];
        assert_eq!(validate_invalidates(many).unwrap_err().code, "too_many");
    }

    #[test]
    fn task_type_names_round_trip() {
        for t in TaskType::ALL {
            assert_eq!(t.as_str().parse::<TaskType>().unwrap(), t);
            assert_eq!(serde_json::to_value(t).unwrap(), json!(t.as_str()));
        }
        assert!("send_fax".parse::<TaskType>().is_err());
    }

    #[test]
    fn a_complete_email_is_accepted() {
        let p = json!({"to": "ana@clinic.es", "subject": "Cita", "body": "<p>Hola</p>"});
        assert!(validate_payload(TaskType::SendEmail, p).is_ok());
    }

    #[test]
    fn each_bad_email_field_is_named() {
        let cases = [
            (
                json!({"subject": "s", "body": "b"}),
                "payload.to",
                "required",
            ),
            (
                json!({"to": "not-an-address", "subject": "s", "body": "b"}),
                "payload.to",
                "invalid_format",
            ),
            (
                json!({"to": "a@b.es", "subject": 3, "body": "b"}),
                "payload.subject",
                "invalid_type",
            ),
            (
                json!({"to": "a@b.es", "subject": "s", "body": ""}),
                "payload.body",
                "required",
            ),
            (
                json!({"to": "a@b.es", "subject": "s", "body": "b", "cc": "x"}),
                "payload.cc",
                "unknown_field",
            ),
            (
                json!({"to": "a@b.es", "subject": "a\nb", "body": "b"}),
                "payload.subject",
                "invalid_format",
            ),
        ];
        for (payload, field, code) in cases {
            let err = validate_payload(TaskType::SendEmail, payload.clone()).unwrap_err();
            assert_eq!((err.field.as_str(), err.code), (field, code), "{payload}");
        }
    }

    #[test]
    fn phones_must_be_e164() {
        for good in ["+34123456789", "+12025550123", "+4915112345678"] {
            assert!(is_e164(good), "{good}");
        }
        for bad in [
            "34123456789",
            "+0123456789",
            "+34 123 456",
            "+1234",
            "+1234567890123456",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
        let err = validate_payload(
            TaskType::SendWhatsapp,
            json!({"phone": "612345678", "message": "hola"}),
        )
        .unwrap_err();
        assert_eq!(err.field, "payload.phone");
    }

    #[test]
    fn sms_longer_than_the_provider_limit_is_refused() {
        let long = "x".repeat(MAX_MESSAGE_CHARS + 1);
        let err = validate_payload(
            TaskType::SendSms,
            json!({"phone": "+34123456789", "message": long}),
        )
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.code),
            ("payload.message", "too_long")
        );
    }

    #[test]
    fn numbers_that_postgres_cannot_give_back_are_refused() {
        let p = json!({"phone": "+34123456789", "template": "reminder", "data": {"n": [1.7976931348623157e308]}});
        let err = validate_payload(TaskType::SendSms, p).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.code),
            ("payload.data.n[0]", "out_of_range")
        );
        let ok =
            json!({"phone": "+34123456789", "template": "reminder", "data": {"n": 1e299, "m": -7}});
        assert!(validate_payload(TaskType::SendSms, ok).is_ok());
    }

    #[test]
    fn calendar_actions_and_data_are_checked() {
        let ok = json!({"event_id": "a1", "action": "create",
                        "appointment_data": {"starts_at": "2026-12-01T10:00", "client_id": "c-7"}});
        assert!(validate_payload(TaskType::SyncCalendar, ok).is_ok());
        let unsendable =
            json!({"event_id": "a1", "action": "create", "appointment_data": {"at": "x"}});
        assert_eq!(
            validate_payload(TaskType::SyncCalendar, unsendable)
                .unwrap_err()
                .field,
            "payload.appointment_data.starts_at"
        );
        let delete = json!({"event_id": "a1", "action": "delete"});
        assert!(validate_payload(TaskType::SyncCalendar, delete).is_ok());
        let bad_action = json!({"event_id": "a1", "action": "move", "appointment_data": {}});
        assert_eq!(
            validate_payload(TaskType::SyncCalendar, bad_action)
                .unwrap_err()
                .field,
            "payload.action"
        );
        let missing = json!({"event_id": "a1", "action": "update"});
        assert_eq!(
            validate_payload(TaskType::SyncCalendar, missing)
                .unwrap_err()
                .code,
            "required"
        );
    }

    #[test]
    fn nul_characters_and_oversized_payloads_are_refused() {
        let nul =
            json!({"event_id": "a", "action": "create", "appointment_data": {"n": ["\u{0}"]}});
        let err = validate_payload(TaskType::SyncCalendar, nul).unwrap_err();
        assert_eq!(err.field, "payload.appointment_data.n[0]");
        let big = json!({"to": "a@b.es", "subject": "s", "body": "x".repeat(MAX_PAYLOAD_BYTES)});
        assert_eq!(
            validate_payload(TaskType::SendEmail, big).unwrap_err().code,
            "too_large"
        );
        assert!(validate_payload(TaskType::SendEmail, json!([1])).is_err());
    }

    #[test]
    fn a_message_may_name_a_template_instead_of_literal_text() {
        let data = json!({"patient_name": "Ana", "starts_at": "2026-12-01T10:00:00+01:00"});
        let email = json!({"to": "ana@clinic.es", "template": "confirmation", "data": data});
        assert!(validate_payload(TaskType::SendEmail, email).is_ok());
        let sms =
            json!({"phone": "+34123456789", "template": "reminder", "data": data, "locale": "en"});
        assert!(validate_payload(TaskType::SendSms, sms).is_ok());
        let whatsapp = json!({"phone": "+34123456789", "template": "change", "data": {}});
        assert!(validate_payload(TaskType::SendWhatsapp, whatsapp).is_ok());
    }

    #[test]
    fn each_bad_template_field_is_named() {
        let cases = [
            (
                TaskType::SendSms,
                json!({"phone": "+34123456789", "template": "reminder", "data": {}, "message": "m"}),
                "payload.message",
                "invalid_combination",
            ),
            (
                TaskType::SendEmail,
                json!({"to": "a@b.es", "template": "reminder", "data": {}, "subject": "s"}),
                "payload.subject",
                "invalid_combination",
            ),
            (
                TaskType::SendSms,
                json!({"phone": "+34123456789", "message": "m", "data": {}}),
                "payload.data",
                "invalid_combination",
            ),
            (
                TaskType::SendSms,
                json!({"phone": "+34123456789", "template": "birthday", "data": {}}),
                "payload.template",
                "invalid_value",
            ),
            (
                TaskType::SendSms,
                json!({"phone": "+34123456789", "template": "reminder"}),
                "payload.data",
                "required",
            ),
            (
                TaskType::SendWhatsapp,
                json!({"phone": "+34123456789", "template": "reminder", "data": [1]}),
                "payload.data",
                "invalid_type",
            ),
            (
                TaskType::SendEmail,
                json!({"to": "a@b.es", "template": "reminder", "data": {}, "locale": "fr"}),
                "payload.locale",
                "invalid_value",
            ),
            (
                TaskType::SendEmail,
                json!({"to": "nope", "template": "reminder", "data": {}}),
                "payload.to",
                "invalid_format",
            ),
            (
                TaskType::SendSms,
                json!({"phone": "+34123456789", "template": "reminder", "data": {}, "extra": 1}),
                "payload.extra",
                "unknown_field",
            ),
        ];
        for (t, payload, field, code) in cases {
            let err = validate_payload(t, payload.clone()).unwrap_err();
            assert_eq!((err.field.as_str(), err.code), (field, code), "{payload}");
        }
    }

    #[test]
    fn email_addresses() {
        for good in [
            "a@b.es",
            "first.last+tag@sub.example.com",
            "josé@clínica.es",
        ] {
            assert!(is_email(good), "{good}");
        }
        for bad in [
            "", "a", "a@b", "@b.es", "a@@b.es", "a b@c.es", "a@-b.es", ".a@b.es", "a@b..es",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }
}
