//! The clinic's message templates: appointment `confirmation`, `reminder`, `cancellation` and
//! `change`, in Spanish (the default) and English, rendered with minijinja.
//!
//! Each template is one file per language (`templates/{locale}/{name}.j2`) with a block per
//! medium: `subject`, `text` and `html` for e-mail (the HTML block is auto-escaped and wrapped in
//! `templates/layout.html`), `sms` and `whatsapp`. A task names the template and gives its data:
//! `patient_name` and `starts_at` always (`previous_starts_at` for `change`); `professional`,
//! `location`, `clinic_phone`, `reason` and `clinic_name` when it has them. Date-times are
//! RFC 3339 (`2026-12-01T10:00:00+01:00`) and are shown in their own offset, that is in the
//! appointment's time zone; the filters `long_date` and `hour` format them per language.
//!
//! Undefined variables are errors (strict mode): a task missing data fails permanently instead of
//! sending "Hola ,".

use chrono::{DateTime, NaiveDateTime, Timelike};
use minijinja::{AutoEscape, Environment, ErrorKind, State, UndefinedBehavior};
use serde_json::{Map, Value};

use crate::domain::payload::{MAX_MESSAGE_CHARS, TEMPLATE_LOCALES, TEMPLATE_NAMES};
use crate::worker::handler::HandlerError;

/// The language used when a task names none.
pub const DEFAULT_LOCALE: &str = TEMPLATE_LOCALES[0];

const SOURCES: &[(&str, &str)] = &[
    ("layout.html", include_str!("templates/layout.html")),
    (
        "es/confirmation",
        include_str!("templates/es/confirmation.j2"),
    ),
    ("es/reminder", include_str!("templates/es/reminder.j2")),
    (
        "es/cancellation",
        include_str!("templates/es/cancellation.j2"),
    ),
    ("es/change", include_str!("templates/es/change.j2")),
    (
        "en/confirmation",
        include_str!("templates/en/confirmation.j2"),
    ),
    ("en/reminder", include_str!("templates/en/reminder.j2")),
    (
        "en/cancellation",
        include_str!("templates/en/cancellation.j2"),
    ),
    ("en/change", include_str!("templates/en/change.j2")),
];

/// A rendered e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// A short message medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextMedium {
    Sms,
    Whatsapp,
}

/// A template could not be rendered with the task's data. Permanent: the same data fails again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {template} ({locale}) cannot be rendered: {detail}")]
pub struct RenderError {
    pub template: String,
    pub locale: String,
    pub detail: String,
}

impl From<RenderError> for HandlerError {
    fn from(e: RenderError) -> HandlerError {
        HandlerError::permanent(e.to_string())
    }
}

/// The template a message task names, if it names one.
#[derive(Debug, Clone, Copy)]
pub struct TemplateRef<'a> {
    pub name: &'a str,
    pub locale: &'a str,
    pub data: &'a Value,
}

impl<'a> TemplateRef<'a> {
    /// Reads `template`, `locale` and `data` of a (validated) payload.
    pub fn of(payload: &'a Value) -> Option<TemplateRef<'a>> {
        static EMPTY: Value = Value::Null;
        let name = payload.get("template")?.as_str()?;
        Some(TemplateRef {
            name,
            locale: payload
                .get("locale")
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_LOCALE),
            data: payload.get("data").unwrap_or(&EMPTY),
        })
    }
}

/// The compiled templates.
pub struct Templates {
    env: Environment<'static>,
    clinic_name: String,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("clinic_name", &self.clinic_name)
            .finish_non_exhaustive()
    }
}

impl Templates {
    /// Compiles the built-in templates. `clinic_name` is used where a task's data names none.
    pub fn new(clinic_name: impl Into<String>) -> Result<Templates, minijinja::Error> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.add_filter("long_date", long_date);
        env.add_filter("hour", hour);
        for (name, source) in SOURCES {
            env.add_template(name, source)?;
        }
        Ok(Templates {
            env,
            clinic_name: clinic_name.into(),
        })
    }

    /// Renders the e-mail of a template.
    pub fn email(&self, t: TemplateRef<'_>) -> Result<RenderedEmail, RenderError> {
        let fail = |detail: String| RenderError {
            template: t.name.to_owned(),
            locale: t.locale.to_owned(),
            detail,
        };
        let ctx = self.context(t).map_err(fail)?;
        let tmpl = self
            .env
            .get_template(&format!("{}/{}", t.locale, t.name))
            .map_err(|e| fail(describe(&e)))?;
        let mut captured = tmpl
            .render_captured_to(&ctx, std::io::sink())
            .map_err(|e| fail(describe(&e)))?;
        let mut block = |name: &str| {
            captured
                .with_state_mut(|state| state.render_block(name))
                .map_err(|e| fail(describe(&e)))
        };
        let subject = one_line(&block("subject")?);
        let text = tidy(&block("text")?);
        let fragment = tidy(&block("html")?);
        let html = self
            .env
            .get_template("layout.html")
            .and_then(|layout| {
                layout.render(minijinja::context! {
                    locale => t.locale,
                    title => &subject,
                    clinic_name => ctx.get("clinic_name"),
                    content => minijinja::Value::from_safe_string(fragment),
                })
            })
            .map_err(|e| fail(describe(&e)))?;
        Ok(RenderedEmail {
            subject,
            text,
            html,
        })
    }

    /// Renders the SMS or WhatsApp text of a template (at most [`MAX_MESSAGE_CHARS`]).
    pub fn text(&self, t: TemplateRef<'_>, medium: TextMedium) -> Result<String, RenderError> {
        let fail = |detail: String| RenderError {
            template: t.name.to_owned(),
            locale: t.locale.to_owned(),
            detail,
        };
        let ctx = self.context(t).map_err(fail)?;
        let block = match medium {
            TextMedium::Sms => "sms",
            TextMedium::Whatsapp => "whatsapp",
        };
        let text = self
            .env
            .get_template(&format!("{}/{}", t.locale, t.name))
            .and_then(|tmpl| {
                tmpl.render_captured_to(&ctx, std::io::sink())?
                    .with_state_mut(|state| state.render_block(block))
            })
            .map_err(|e| fail(describe(&e)))?;
        let text = tidy(&text);
        let n = text.chars().count();
        if n > MAX_MESSAGE_CHARS {
            return Err(fail(format!(
                "the message is {n} characters; the limit is {MAX_MESSAGE_CHARS}"
            )));
        }
        Ok(text)
    }

    fn context(&self, t: TemplateRef<'_>) -> Result<Map<String, Value>, String> {
        if !TEMPLATE_NAMES.contains(&t.name) {
            return Err("no such template".into());
        }
        if !TEMPLATE_LOCALES.contains(&t.locale) {
            return Err("no such language".into());
        }
        let mut ctx = match t.data {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            _ => return Err("data must be a JSON object".into()),
        };
        ctx.entry("clinic_name")
            .or_insert_with(|| Value::String(self.clinic_name.clone()));
        ctx.insert("locale".into(), Value::String(t.locale.to_owned()));
        Ok(ctx)
    }
}

/// The error text without the template source (it can be long) but with the cause.
fn describe(e: &minijinja::Error) -> String {
    let mut text = match e.kind() {
        ErrorKind::UndefinedError => "a value the template needs is missing from data".to_owned(),
        _ => e
            .detail()
            .map(str::to_owned)
            .unwrap_or_else(|| e.to_string()),
    };
    if let (Some(line), ErrorKind::UndefinedError) = (e.line(), e.kind()) {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// Blank lines collapsed, trailing spaces and the outer white space removed.
fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.trim().lines().map(str::trim_end) {
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

/// A header value: one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `2026-12-01T10:00:00+01:00` (or without offset) → the wall-clock time it names.
fn local_time(value: &str) -> Result<NaiveDateTime, minijinja::Error> {
    DateTime::parse_from_rfc3339(value)
        .map(|d| d.naive_local())
        .or_else(|_| NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S"))
        .or_else(|_| NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M"))
        .map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{value:?} is not a date-time like 2026-12-01T10:00:00+01:00"),
            )
        })
}

fn locale_of(state: &State) -> String {
    state
        .lookup("locale")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_LOCALE.to_owned())
}

/// `martes, 1 de diciembre de 2026` / `Tuesday, 1 December 2026` (names from chrono's locale
/// data).
fn long_date(state: &State, value: String) -> Result<String, minijinja::Error> {
    let t = local_time(&value)?;
    Ok(match locale_of(state).as_str() {
        "en" => t.format("%A, %-d %B %Y").to_string(),
        _ => t
            .date()
            .format_localized("%A, %-d de %B de %Y", chrono::Locale::es_ES)
            .to_string(),
    })
}

/// `10:00` (24-hour clock, both languages).
fn hour(value: String) -> Result<String, minijinja::Error> {
    let t = local_time(&value)?;
    Ok(format!("{:02}:{:02}", t.hour(), t.minute()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spanish_day_and_month_names_carry_their_accents() {
        let day = |d: u32| {
            chrono::NaiveDate::from_ymd_opt(2026, 12, d)
                .unwrap()
                .format_localized("%A %B", chrono::Locale::es_ES)
                .to_string()
        };
        assert_eq!(day(2), "miércoles diciembre");
        assert_eq!(day(5), "sábado diciembre");
    }

    fn templates() -> Templates {
        Templates::new("Clínica Arnela").unwrap()
    }

    fn data() -> Value {
        json!({
            "patient_name": "Ana <García>",
            "starts_at": "2026-12-01T10:00:00+01:00",
            "previous_starts_at": "2026-11-30T17:30:00+01:00",
            "professional": "Dra. López",
        })
    }

    fn tref<'a>(name: &'a str, locale: &'a str, data: &'a Value) -> TemplateRef<'a> {
        TemplateRef { name, locale, data }
    }

    #[test]
    fn every_template_renders_for_every_medium_and_language() {
        let t = templates();
        let data = data();
        for name in TEMPLATE_NAMES {
            for locale in TEMPLATE_LOCALES {
                let r = tref(name, locale, &data);
                let email = t.email(r).unwrap_or_else(|e| panic!("{e}"));
                assert!(!email.subject.is_empty() && !email.subject.contains('\n'));
                assert!(email.text.contains("Ana <García>"), "{}", email.text);
                assert!(email.html.contains("Ana &lt;García&gt;"), "{}", email.html);
                assert!(email.html.contains("<p>"), "{}", email.html);
                assert!(email.html.starts_with("<!DOCTYPE html>"));
                for medium in [TextMedium::Sms, TextMedium::Whatsapp] {
                    let text = t.text(r, medium).unwrap();
                    assert!(text.contains("Ana <García>"), "{text}");
                    assert!(text.contains("10:00"), "{text}");
                }
            }
        }
    }

    #[test]
    fn spanish_is_the_default_and_dates_are_shown_in_the_appointments_offset() {
        let t = templates();
        let payload = json!({"template": "reminder", "data": {
            "patient_name": "Ana",
            "starts_at": "2026-12-01T10:00:00+01:00",
        }});
        let r = TemplateRef::of(&payload).unwrap();
        assert_eq!(r.locale, "es");
        assert_eq!(
            t.text(r, TextMedium::Sms).unwrap(),
            "Clínica Arnela: Ana, le recordamos su cita el martes, 1 de diciembre de 2026 a las 10:00."
        );
        let en = tref("reminder", "en", r.data);
        assert_eq!(
            t.email(en).unwrap().subject,
            "Reminder: your appointment on Tuesday, 1 December 2026 at 10:00"
        );
    }

    #[test]
    fn the_text_part_has_no_runs_of_blank_lines() {
        let t = templates();
        let email = t.email(tref("confirmation", "es", &data())).unwrap();
        assert!(!email.text.contains("\n\n\n"), "{}", email.text);
        assert!(email.text.starts_with("Hola Ana <García>:\n\nSu cita en Clínica Arnela queda confirmada para el martes, 1 de diciembre de 2026 a las 10:00 con Dra. López."), "{}", email.text);
    }

    #[test]
    fn missing_or_malformed_data_is_a_render_error() {
        let t = templates();
        let no_name = json!({"starts_at": "2026-12-01T10:00:00+01:00"});
        let e = t
            .text(tref("confirmation", "es", &no_name), TextMedium::Sms)
            .unwrap_err();
        assert!(e.detail.contains("missing"), "{e}");
        let bad_date = json!({"patient_name": "Ana", "starts_at": "mañana"});
        let e = t.email(tref("reminder", "es", &bad_date)).unwrap_err();
        assert!(e.detail.contains("not a date-time"), "{e}");
        let no_previous = json!({"patient_name": "Ana", "starts_at": "2026-12-01T10:00:00Z"});
        assert!(t
            .text(tref("change", "en", &no_previous), TextMedium::Whatsapp)
            .is_err());
        assert!(t
            .text(tref("birthday", "es", &no_previous), TextMedium::Sms)
            .is_err());
        let handler_error: HandlerError = e.into();
        assert!(matches!(handler_error, HandlerError::Permanent { .. }));
    }

    #[test]
    fn an_overlong_message_is_refused() {
        let t = templates();
        let data = json!({"patient_name": "x".repeat(2000), "starts_at": "2026-12-01T10:00:00Z"});
        let e = t
            .text(tref("reminder", "es", &data), TextMedium::Sms)
            .unwrap_err();
        assert!(e.detail.contains("limit is 1600"), "{e}");
    }
}
