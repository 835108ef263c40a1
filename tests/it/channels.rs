//! The delivery channels against local fakes of their providers: wiremock for the Twilio,
//! SendGrid and Google HTTP APIs, a small SMTP server for SMTP. Each fake checks the exact
//! request, and each provider answer maps to success, a permanent or a retryable failure.

use crate::common;
use arnela::domain::TaskId;

use arnela::app::App;
use arnela::channel::google::{calendar_event_id, GoogleCalendarChannel, SCOPE};
use arnela::channel::{self, ChannelSettings};
use arnela::config::{AppEnv, Settings};
use arnela::domain::TaskType;
use arnela::worker::handler::{Handler, HandlerError, HandlerResult, Registry, TaskContext};
use arnela::worker::log_channel::LogChannel;
use arnela::worker::Processed;
use common::engine::{config, engine_with};
use common::{client, get, post};
use reqwest::Url;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wiremock::matchers::{any, basic_auth, bearer_token, header, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const TWILIO_TOKEN: &str = "twilio-auth-token-s3cr3t";
const TWILIO_KEY_SECRET: &str = "twilio-api-key-secret-s3cr3t";
const SENDGRID_KEY: &str = "SG.sendgrid-api-key-s3cr3t";
const SMTP_PASSWORD: &str = "smtp-password-s3cr3t";
const CALENDAR_ID: &str = "clinic-test@group.calendar.google.com";
const PHONE: &str = "+34123456789";
const EMAIL: &str = "ana.garcia@clinic.es";

// --- helpers -------------------------------------------------------------------------------

fn settings(pairs: &[(&str, &str)]) -> ChannelSettings {
    let vars: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ChannelSettings::from_vars(&vars, AppEnv::Test).expect("valid channel settings")
}

/// The handler `channel::build` makes for `t`, checking the channel's name.
fn handler(s: &ChannelSettings, t: TaskType, name: &str) -> Arc<dyn Handler> {
    let c = channel::build(s, LogChannel::default(), &channel::RateScope::Process)
        .into_iter()
        .find(|c| c.task_type == t)
        .unwrap();
    assert_eq!(c.name, name);
    c.handler
}

fn task(task_type: TaskType, attempt: i32, payload: Value) -> TaskContext {
    let task_id = TaskId::new();
    TaskContext {
        task_id,
        task_type,
        attempt,
        payload,
        idempotency_key: format!("{task_id}:{attempt}"),
        trace: None,
    }
}

fn sms(message: &str) -> Value {
    json!({"phone": PHONE, "message": message})
}

/// The fields of a form-encoded body.
fn form(req: &Request) -> BTreeMap<String, String> {
    let body = String::from_utf8(req.body.clone()).unwrap();
    Url::parse(&format!("http://form/?{body}"))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

fn retryable(message: &str, retry_after: Option<u64>) -> HandlerError {
    HandlerError::Retryable {
        message: message.into(),
        retry_after: retry_after.map(Duration::from_secs),
    }
}

/// Mounts `response` for every request (after clearing the server) and runs `task` once.
async fn answer(
    server: &MockServer,
    handler: &dyn Handler,
    response: ResponseTemplate,
    task: &TaskContext,
) -> HandlerResult {
    server.reset().await;
    Mock::given(any())
        .respond_with(response)
        .mount(server)
        .await;
    handler.handle(task).await
}

fn twilio_vars(uri: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TWILIO_BASE_URL", uri.to_owned()),
        ("TWILIO_ACCOUNT_SID", "AC0123".into()),
        ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN.into()),
        ("TWILIO_SMS_FROM", "+34910000000".into()),
        ("TWILIO_WHATSAPP_FROM", "+14155238886".into()),
        ("TWILIO_TIMEOUT_MS", "500".into()),
        ("TWILIO_RATE_LIMIT_PER_SEC", "0".into()),
    ]
}

fn pairs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

// --- Twilio --------------------------------------------------------------------------------

#[tokio::test]
async fn twilio_sms_posts_the_exact_form_with_basic_auth_and_records_the_sid_and_status() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC0123/Messages.json"))
        .and(basic_auth("AC0123", TWILIO_TOKEN))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": "SM00000000000000000000000000000001",
            "status": "queued",
            "to": PHONE,
        })))
        .expect(1)
        .mount(&server)
        .await;
    let s = settings(&pairs(&twilio_vars(&server.uri())));
    let sms_handler = handler(&s, TaskType::SendSms, "twilio_sms");

    let result = sms_handler
        .handle(&task(
            TaskType::SendSms,
            1,
            sms("Su cita es mañana a las 10:00"),
        ))
        .await
        .unwrap();

    assert_eq!(
        result,
        json!({
            "channel": "twilio_sms",
            "message_sid": "SM00000000000000000000000000000001",
            "status": "queued",
            "to": PHONE,
        })
    );
    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        form(&requests[0]),
        BTreeMap::from([
            (
                "Body".to_string(),
                "Su cita es mañana a las 10:00".to_string()
            ),
            ("From".to_string(), "+34910000000".to_string()),
            ("To".to_string(), PHONE.to_string()),
        ])
    );
}

#[tokio::test]
async fn twilio_whatsapp_uses_whatsapp_addresses_an_api_key_and_a_messaging_service() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC0123/Messages.json"))
        .and(basic_auth("SK0456", TWILIO_KEY_SECRET))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM02", "status": "accepted"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let uri = server.uri();
    let s = settings(&[
        ("TWILIO_BASE_URL", &uri),
        ("TWILIO_ACCOUNT_SID", "AC0123"),
        ("TWILIO_API_KEY_SID", "SK0456"),
        ("TWILIO_API_KEY_SECRET", TWILIO_KEY_SECRET),
        ("TWILIO_WHATSAPP_MESSAGING_SERVICE_SID", "MG0789"),
    ]);
    assert_eq!(s.channel_name(TaskType::SendSms), "log", "no SMS sender");
    let wa = handler(&s, TaskType::SendWhatsapp, "twilio_whatsapp");

    let payload = json!({"phone": PHONE, "template": "confirmation", "locale": "en", "data": {
        "patient_name": "Ana",
        "starts_at": "2026-12-01T10:00:00+01:00",
    }});
    let result = wa
        .handle(&task(TaskType::SendWhatsapp, 1, payload))
        .await
        .unwrap();

    assert_eq!(result["message_sid"], "SM02");
    assert_eq!(result["status"], "accepted");
    assert_eq!(result["to"], format!("whatsapp:{PHONE}"));
    let sent = form(&server.received_requests().await.unwrap()[0]);
    assert_eq!(sent["To"], format!("whatsapp:{PHONE}"));
    assert_eq!(sent["MessagingServiceSid"], "MG0789");
    assert!(!sent.contains_key("From"));
    assert_eq!(
        sent["Body"],
        "*Arnela*\nHello Ana, your appointment is confirmed for *Tuesday, 1 December 2026 at 10:00*.\nIf you cannot come, please let us know in advance."
    );
}

#[tokio::test]
async fn twilio_answers_map_to_success_permanent_and_retryable_failures() {
    let server = MockServer::start().await;
    let s = settings(&pairs(&twilio_vars(&server.uri())));
    let h = handler(&s, TaskType::SendSms, "twilio_sms");
    let t = task(TaskType::SendSms, 1, sms("hola"));
    let error = |status: u16, code: u32, message: &str| {
        ResponseTemplate::new(status).set_body_json(json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        }))
    };

    let ok = answer(
        &server,
        &*h,
        ResponseTemplate::new(200).set_body_json(json!({"sid": "SM1", "status": "sent"})),
        &t,
    )
    .await;
    assert_eq!(ok.unwrap()["message_sid"], "SM1");

    let cases = [
        (
            error(400, 21211, "The 'To' number +34123456789 is not a valid phone number."),
            HandlerError::permanent("twilio: HTTP 400, code 21211: The 'To' number +34123456789 is not a valid phone number."),
        ),
        (
            error(401, 20003, "Authenticate"),
            HandlerError::permanent("twilio: HTTP 401, code 20003: Authenticate"),
        ),
        (
            error(404, 20404, "The requested resource was not found"),
            HandlerError::permanent("twilio: HTTP 404, code 20404: The requested resource was not found"),
        ),
        (
            error(429, 20429, "Too Many Requests").insert_header("Retry-After", "30"),
            retryable("twilio: HTTP 429, code 20429: Too Many Requests", Some(30)),
        ),
        (
            ResponseTemplate::new(500),
            retryable("twilio: HTTP 500", None),
        ),
        (
            error(503, 20503, "Service Unavailable").insert_header("Retry-After", "2"),
            retryable("twilio: HTTP 503, code 20503: Service Unavailable", Some(2)),
        ),
        (
            // Slower than TWILIO_TIMEOUT_MS.
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": "SM2"}))
                .set_delay(Duration::from_secs(30)),
            retryable("twilio: request timed out", None),
        ),
    ];
    for (response, expected) in cases {
        let got = answer(&server, &*h, response, &t).await;
        assert_eq!(got, Err(expected));
    }
}

// --- SendGrid ------------------------------------------------------------------------------

fn sendgrid_settings(uri: &str) -> ChannelSettings {
    settings(&[
        ("SENDGRID_BASE_URL", uri),
        ("SENDGRID_API_KEY", SENDGRID_KEY),
        ("EMAIL_FROM", "citas@clinica-arnela.es"),
        ("EMAIL_FROM_NAME", "Clínica Arnela"),
        ("EMAIL_TIMEOUT_MS", "500"),
        ("EMAIL_RATE_LIMIT_PER_SEC", "0"),
    ])
}

#[tokio::test]
async fn sendgrid_gets_the_exact_json_with_a_bearer_key_and_both_parts() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v3/mail/send"))
        .and(bearer_token(SENDGRID_KEY))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(202).insert_header("X-Message-Id", "sg-msg-1"))
        .expect(1)
        .mount(&server)
        .await;
    let h = handler(
        &sendgrid_settings(&server.uri()),
        TaskType::SendEmail,
        "sendgrid",
    );
    let t = task(
        TaskType::SendEmail,
        2,
        json!({"to": EMAIL, "subject": "Su cita", "body": "<p>Hola Ana,</p><p>Le esperamos el lunes.</p>"}),
    );

    let result = h.handle(&t).await.unwrap();

    assert_eq!(
        result,
        json!({"channel": "sendgrid", "message_id": "sg-msg-1", "to": EMAIL, "subject": "Su cita"})
    );
    let body: Value = server.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(
        body,
        json!({
            "personalizations": [{
                "to": [{"email": EMAIL}],
                "custom_args": {
                    "arnela_task_id": t.task_id.to_string(),
                    "arnela_idempotency_key": format!("{}:2", t.task_id),
                },
            }],
            "from": {"email": "citas@clinica-arnela.es", "name": "Clínica Arnela"},
            "subject": "Su cita",
            "content": [
                {"type": "text/plain", "value": "Hola Ana,\n\nLe esperamos el lunes."},
                {"type": "text/html", "value": "<p>Hola Ana,</p><p>Le esperamos el lunes.</p>"},
            ],
        })
    );
}

#[tokio::test]
async fn sendgrid_answers_map_to_success_permanent_and_retryable_failures() {
    let server = MockServer::start().await;
    let h = handler(
        &sendgrid_settings(&server.uri()),
        TaskType::SendEmail,
        "sendgrid",
    );
    let t = task(
        TaskType::SendEmail,
        1,
        json!({"to": EMAIL, "template": "reminder", "data": {"patient_name": "Ana", "starts_at": "2026-12-01T10:00:00+01:00"}}),
    );
    let errors = |status: u16, field: Option<&str>, message: &str| {
        ResponseTemplate::new(status).set_body_json(json!({
            "errors": [{"message": message, "field": field, "help": null}],
        }))
    };

    let ok = answer(&server, &*h, ResponseTemplate::new(200), &t)
        .await
        .unwrap();
    assert_eq!(
        ok["subject"],
        "Recordatorio: su cita del martes, 1 de diciembre de 2026 a las 10:00"
    );

    let cases = [
        (
            errors(400, Some("personalizations.0.to.0.email"), "Does not contain a valid address."),
            HandlerError::permanent("sendgrid: HTTP 400, code personalizations.0.to.0.email: Does not contain a valid address."),
        ),
        (
            errors(401, None, "The provided authorization grant is invalid, expired, or revoked"),
            HandlerError::permanent("sendgrid: HTTP 401: The provided authorization grant is invalid, expired, or revoked"),
        ),
        (
            ResponseTemplate::new(404),
            HandlerError::permanent("sendgrid: HTTP 404"),
        ),
        (
            errors(429, None, "too many requests").insert_header("Retry-After", "60"),
            retryable("sendgrid: HTTP 429: too many requests", Some(60)),
        ),
        (
            ResponseTemplate::new(500),
            retryable("sendgrid: HTTP 500", None),
        ),
        (
            ResponseTemplate::new(202).set_delay(Duration::from_secs(30)),
            retryable("sendgrid: request timed out", None),
        ),
    ];
    for (response, expected) in cases {
        assert_eq!(answer(&server, &*h, response, &t).await, Err(expected));
    }
}

// --- SMTP ----------------------------------------------------------------------------------

fn smtp_settings(port: u16) -> ChannelSettings {
    let port = port.to_string();
    settings(&[
        ("EMAIL_TRANSPORT", "smtp"),
        ("SMTP_HOST", "127.0.0.1"),
        ("SMTP_PORT", &port),
        ("SMTP_TLS", "none"),
        ("SMTP_USERNAME", "arnela"),
        ("SMTP_PASSWORD", SMTP_PASSWORD),
        ("EMAIL_FROM", "citas@clinica-arnela.es"),
        ("EMAIL_TIMEOUT_MS", "5000"),
    ])
}

/// A body with quoted-printable soft line breaks joined.
fn unfold(data: &str) -> String {
    data.replace("=\r\n", "")
}

#[tokio::test]
async fn smtp_delivers_a_message_with_a_text_and_an_html_part() {
    let sink = common::smtp::Sink::start().await;
    let h = handler(&smtp_settings(sink.port), TaskType::SendEmail, "smtp");
    let t = task(
        TaskType::SendEmail,
        1,
        json!({"to": EMAIL, "template": "confirmation", "data": {
            "patient_name": "Ana",
            "starts_at": "2026-12-01T10:00:00+01:00",
            "clinic_name": "Clinica Arnela",
        }}),
    );

    let result = h.handle(&t).await.unwrap();

    let message_id = format!("<{}.1@clinica-arnela.es>", t.task_id);
    assert_eq!(result["channel"], "smtp");
    assert_eq!(result["message_id"], message_id);
    assert_eq!(result["to"], EMAIL);
    assert!(
        result["smtp_reply"]
            .as_str()
            .unwrap()
            .starts_with("250 2.0.0 Ok: queued as SINK1"),
        "{result}"
    );
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert!(m.auth.is_some(), "authenticated");
    assert_eq!(m.mail_from, "<citas@clinica-arnela.es>");
    assert_eq!(m.rcpt_to, [format!("<{EMAIL}>")]);
    let data = unfold(&m.data);
    assert!(
        data.contains(&format!("Message-ID: {message_id}")),
        "{data}"
    );
    assert!(data.contains(&format!("To: {EMAIL}")), "{data}");
    assert!(
        data.contains("Content-Type: multipart/alternative"),
        "{data}"
    );
    assert!(
        data.contains("Content-Type: text/plain; charset=utf-8"),
        "{data}"
    );
    assert!(
        data.contains("Content-Type: text/html; charset=utf-8"),
        "{data}"
    );
    assert!(data.contains("Hola Ana:"), "the text part: {data}");
    assert!(data.contains("<p>Hola Ana:</p>"), "the HTML part: {data}");
}

#[tokio::test]
async fn smtp_refusals_are_permanent_and_deferrals_retryable() {
    let sink = common::smtp::Sink::start().await;
    let h = handler(&smtp_settings(sink.port), TaskType::SendEmail, "smtp");
    let t = task(
        TaskType::SendEmail,
        1,
        json!({"to": EMAIL, "subject": "Cita", "body": "Hola"}),
    );

    sink.reply_to_recipients_with("550 5.1.1 No such user here");
    match h.handle(&t).await {
        Err(HandlerError::Permanent { message }) => {
            assert!(message.starts_with("smtp: "), "{message}");
            assert!(message.contains("No such user"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    sink.reply_to_recipients_with("451 4.7.1 Greylisted, try again later");
    match h.handle(&t).await {
        Err(HandlerError::Retryable { message, .. }) => {
            assert!(message.contains("Greylisted"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(sink.messages().is_empty());

    // Nobody listening: retryable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h = handler(&smtp_settings(port), TaskType::SendEmail, "smtp");
    assert!(matches!(
        h.handle(&t).await,
        Err(HandlerError::Retryable { .. })
    ));
}

// --- Google Calendar -----------------------------------------------------------------------

fn service_account_json() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/google-service-account.test.json"
    ))
    .unwrap()
}

fn google_settings(uri: &str, timeout_ms: &str) -> ChannelSettings {
    let key = service_account_json();
    let token_url = format!("{uri}/token");
    settings(&[
        ("GOOGLE_SERVICE_ACCOUNT_JSON", &key),
        ("GOOGLE_CALENDAR_ID", CALENDAR_ID),
        ("GOOGLE_CALENDAR_BASE_URL", uri),
        ("GOOGLE_TOKEN_URL", &token_url),
        ("GOOGLE_TIMEOUT_MS", timeout_ms),
        ("GOOGLE_RATE_LIMIT_PER_SEC", "0"),
    ])
}

/// A token endpoint that hands out `token-1`, `token-2`… valid for an hour.
#[derive(Default)]
struct TokenEndpoint {
    issued: AtomicUsize,
}

impl Respond for TokenEndpoint {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(200).set_body_json(json!({
            "access_token": format!("token-{n}"),
            "expires_in": 3600,
            "token_type": "Bearer",
        }))
    }
}

/// A Calendar that keeps its events: insert (409 for a known id), update (404 for an unknown
/// one), delete (404 unknown, 410 already deleted). Deleted events stay as `cancelled`, as in
/// Google. It can hold back the answer of the next insert after storing it.
#[derive(Default)]
struct FakeCalendar {
    events: Mutex<HashMap<String, Value>>,
    cancelled: Mutex<HashSet<String>>,
    stall_next_insert: AtomicBool,
}

impl FakeCalendar {
    fn live(&self) -> HashMap<String, Value> {
        self.events.lock().unwrap().clone()
    }
}

impl Respond for FakeCalendar {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let segments: Vec<String> = req
            .url
            .path_segments()
            .unwrap()
            .map(str::to_owned)
            .collect();
        let mut events = self.events.lock().unwrap();
        let mut cancelled = self.cancelled.lock().unwrap();
        let error = |status: u16, reason: &str, message: &str| {
            ResponseTemplate::new(status).set_body_json(json!({"error": {
                "code": status, "message": message,
                "errors": [{"domain": "global", "reason": reason, "message": message}],
            }}))
        };
        let stored = |mut event: Value| {
            event["htmlLink"] = json!(format!(
                "https://calendar.example/event?eid={}",
                event["id"].as_str().unwrap()
            ));
            event
        };
        match (req.method.as_str(), segments.get(3)) {
            ("POST", None) => {
                let event: Value = req.body_json().unwrap();
                let id = event["id"].as_str().unwrap().to_owned();
                if events.contains_key(&id) || cancelled.contains(&id) {
                    return error(409, "duplicate", "The requested identifier already exists.");
                }
                events.insert(id, event.clone());
                let response = ResponseTemplate::new(200).set_body_json(stored(event));
                if self.stall_next_insert.swap(false, Ordering::SeqCst) {
                    response.set_delay(Duration::from_secs(30))
                } else {
                    response
                }
            }
            ("PUT", Some(id)) => {
                if !events.contains_key(id) && !cancelled.remove(id) {
                    return error(404, "notFound", "Not Found");
                }
                let event: Value = req.body_json().unwrap();
                events.insert(id.clone(), event.clone());
                ResponseTemplate::new(200).set_body_json(stored(event))
            }
            ("DELETE", Some(id)) => {
                if events.remove(id).is_some() {
                    cancelled.insert(id.clone());
                    ResponseTemplate::new(204)
                } else if cancelled.contains(id) {
                    error(410, "deleted", "Resource has been deleted")
                } else {
                    error(404, "notFound", "Not Found")
                }
            }
            _ => error(400, "badRequest", "unexpected request"),
        }
    }
}

struct GoogleFake {
    server: MockServer,
    tokens: Arc<TokenEndpoint>,
    calendar: Arc<FakeCalendar>,
}

impl GoogleFake {
    async fn start() -> GoogleFake {
        let server = MockServer::start().await;
        let tokens = Arc::new(TokenEndpoint::default());
        let calendar = Arc::new(FakeCalendar::default());
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(ArcResponder(tokens.clone()))
            .mount(&server)
            .await;
        Mock::given(path_regex(r"^/calendars/[^/]+/events(/[^/]+)?$"))
            .respond_with(ArcResponder(calendar.clone()))
            .mount(&server)
            .await;
        GoogleFake {
            server,
            tokens,
            calendar,
        }
    }

    fn channel(&self, timeout_ms: &str) -> GoogleCalendarChannel {
        let s = google_settings(&self.server.uri(), timeout_ms);
        GoogleCalendarChannel::new(s.calendar.unwrap()).unwrap()
    }

    fn token_requests(&self) -> usize {
        self.tokens.issued.load(Ordering::SeqCst)
    }
}

/// Lets a test keep a handle on a responder it mounted.
struct ArcResponder<T>(Arc<T>);

impl<T: Respond> Respond for ArcResponder<T> {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.0.respond(req)
    }
}

fn appointment(action: &str, event_id: &str, summary: &str) -> Value {
    json!({
        "event_id": event_id,
        "action": action,
        "appointment_data": {
            "summary": summary,
            "starts_at": "2026-12-01T10:00:00+01:00",
            "duration_minutes": 45,
            "time_zone": "Europe/Madrid",
            "location": "C/ Mayor 1, Madrid",
        },
    })
}

#[tokio::test]
async fn google_create_sends_the_exact_event_with_a_bearer_token_and_a_signed_assertion() {
    let g = GoogleFake::start().await;
    let channel = g.channel("5000");

    let result = channel
        .handle(&task(
            TaskType::SyncCalendar,
            1,
            appointment("create", "appointment-42", "Cita: Ana García"),
        ))
        .await
        .unwrap();

    let id = calendar_event_id("appointment-42");
    assert_eq!(
        result,
        json!({
            "channel": "google_calendar",
            "action": "create",
            "calendar_event_id": id,
            "outcome": "created",
            "html_link": format!("https://calendar.example/event?eid={id}"),
        })
    );
    let requests = g.server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2, "a token, then the event");

    let token = form(&requests[0]);
    assert_eq!(
        token["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let public = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/google-test-key.pub.pem"
    ))
    .unwrap();
    let token_url = format!("{}/token", g.server.uri());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[&token_url]);
    validation.set_issuer(&["arnela-test@arnela-test.iam.gserviceaccount.com"]);
    let jwt = jsonwebtoken::decode::<Value>(
        &token["assertion"],
        &jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap(),
        &validation,
    )
    .expect("an assertion signed with the service account's key");
    assert_eq!(jwt.header.kid.as_deref(), Some("test-key-id-0001"));
    assert_eq!(jwt.claims["scope"], SCOPE);
    assert_eq!(
        jwt.claims["exp"].as_i64().unwrap() - jwt.claims["iat"].as_i64().unwrap(),
        3600
    );

    let insert = &requests[1];
    assert_eq!(insert.method.as_str(), "POST");
    assert_eq!(
        insert.url.path(),
        format!("/calendars/{CALENDAR_ID}/events")
    );
    assert_eq!(insert.url.query(), Some("sendUpdates=none"));
    assert_eq!(
        insert.headers.get("authorization").unwrap(),
        "Bearer token-1"
    );
    assert_eq!(
        insert.body_json::<Value>().unwrap(),
        json!({
            "id": id,
            "summary": "Cita: Ana García",
            "location": "C/ Mayor 1, Madrid",
            "start": {"dateTime": "2026-12-01T10:00:00+01:00", "timeZone": "Europe/Madrid"},
            "end": {"dateTime": "2026-12-01T10:45:00+01:00", "timeZone": "Europe/Madrid"},
            "status": "confirmed",
            "extendedProperties": {"private": {"arnela_event_id": "appointment-42"}},
        })
    );
}

#[tokio::test]
async fn google_token_is_fetched_once_reused_and_refreshed_after_it_expires() {
    let g = GoogleFake::start().await;
    let offset_secs = Arc::new(AtomicI64::new(0));
    let clock_offset = offset_secs.clone();
    let channel = g.channel("5000").with_clock(Arc::new(move || {
        chrono::Utc::now() + chrono::Duration::seconds(clock_offset.load(Ordering::SeqCst))
    }));

    for n in 0..3 {
        let t = task(
            TaskType::SyncCalendar,
            1,
            appointment("create", &format!("appointment-{n}"), "Cita"),
        );
        channel.handle(&t).await.unwrap();
    }
    assert_eq!(g.token_requests(), 1, "one token for three requests");

    // 59 minutes 30 seconds later the token is within a minute of its expiry.
    offset_secs.store(3570, Ordering::SeqCst);
    channel
        .handle(&task(
            TaskType::SyncCalendar,
            1,
            appointment("update", "appointment-0", "Cita"),
        ))
        .await
        .unwrap();
    assert_eq!(g.token_requests(), 2, "refreshed before it expired");

    let bearers: Vec<String> = g
        .server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path().starts_with("/calendars/"))
        .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        bearers,
        [
            "Bearer token-1",
            "Bearer token-1",
            "Bearer token-1",
            "Bearer token-2"
        ]
    );
}

#[tokio::test]
async fn a_create_retried_after_a_timeout_leaves_one_event() {
    let g = GoogleFake::start().await;
    let channel = g.channel("300");
    let payload = appointment("create", "appointment-7", "Cita: Ana");
    // The insert is stored but its answer arrives after the client gave up.
    g.calendar.stall_next_insert.store(true, Ordering::SeqCst);

    let first = channel
        .handle(&task(TaskType::SyncCalendar, 1, payload.clone()))
        .await;
    assert_eq!(
        first,
        Err(retryable("google calendar: request timed out", None))
    );

    let second = channel
        .handle(&task(TaskType::SyncCalendar, 2, payload))
        .await
        .unwrap();
    assert_eq!(second["outcome"], "already_existed");
    let events = g.calendar.live();
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[&calendar_event_id("appointment-7")];
    assert_eq!(event["summary"], "Cita: Ana");
    assert_eq!(event["start"]["dateTime"], "2026-12-01T10:00:00+01:00");
}

#[tokio::test]
async fn google_update_and_delete_are_idempotent() {
    let g = GoogleFake::start().await;
    let channel = g.channel("5000");
    let run = |payload: Value| {
        let channel = &channel;
        async move {
            channel
                .handle(&task(TaskType::SyncCalendar, 1, payload))
                .await
                .unwrap()["outcome"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let id = calendar_event_id("appointment-9");

    assert_eq!(
        run(appointment("update", "appointment-9", "v1")).await,
        "created",
        "an update of a missing event creates it"
    );
    assert_eq!(
        run(appointment("update", "appointment-9", "v2")).await,
        "updated"
    );
    assert_eq!(
        run(appointment("update", "appointment-9", "v2")).await,
        "updated"
    );
    let events = g.calendar.live();
    assert_eq!(events.len(), 1);
    assert_eq!(events[&id]["summary"], "v2");

    let delete = json!({"event_id": "appointment-9", "action": "delete"});
    assert_eq!(run(delete.clone()).await, "deleted");
    assert_eq!(run(delete).await, "already_deleted", "410 Gone");
    assert_eq!(
        run(json!({"event_id": "never-booked", "action": "delete"})).await,
        "already_deleted",
        "404"
    );
    assert!(g.calendar.live().is_empty());

    // Booked again after a cancellation: Google keeps the cancelled id, so the create
    // conflicts and the event is restored.
    assert_eq!(
        run(appointment("create", "appointment-9", "v3")).await,
        "already_existed"
    );
    assert_eq!(g.calendar.live()[&id]["status"], "confirmed");
}

#[tokio::test]
async fn google_answers_map_to_success_permanent_and_retryable_failures() {
    let server = MockServer::start().await;
    let s = google_settings(&server.uri(), "300");
    let h = handler(&s, TaskType::SyncCalendar, "google_calendar");
    let t = task(
        TaskType::SyncCalendar,
        1,
        appointment("create", "a-1", "Cita"),
    );
    let api_error = |status: u16, reason: &str, message: &str| {
        ResponseTemplate::new(status).set_body_json(json!({"error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }}))
    };
    let token = || {
        Mock::given(path("/token")).respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "tok", "expires_in": 3600})),
        )
    };
    let calendar_answers = |response: ResponseTemplate| {
        let server = &server;
        let h = &h;
        let t = &t;
        async move {
            server.reset().await;
            token().mount(server).await;
            Mock::given(path_regex("^/calendars/"))
                .respond_with(response)
                .mount(server)
                .await;
            h.handle(t).await
        }
    };

    let ok = calendar_answers(ResponseTemplate::new(200).set_body_json(json!({"id": "x"}))).await;
    assert_eq!(ok.unwrap()["outcome"], "created");

    let cases = [
        (
            api_error(400, "invalid", "Invalid start time."),
            HandlerError::permanent("google calendar: HTTP 400, code invalid: Invalid start time."),
        ),
        (
            api_error(401, "authError", "Invalid Credentials"),
            HandlerError::permanent(
                "google calendar: HTTP 401, code authError: Invalid Credentials",
            ),
        ),
        (
            api_error(404, "notFound", "Not Found"),
            HandlerError::permanent("google calendar: HTTP 404, code notFound: Not Found"),
        ),
        (
            api_error(429, "rateLimitExceeded", "Rate Limit Exceeded")
                .insert_header("Retry-After", "5"),
            retryable(
                "google calendar: HTTP 429, code rateLimitExceeded: Rate Limit Exceeded",
                Some(5),
            ),
        ),
        (
            api_error(403, "userRateLimitExceeded", "User Rate Limit Exceeded"),
            retryable(
                "google calendar: HTTP 403, code userRateLimitExceeded: User Rate Limit Exceeded",
                None,
            ),
        ),
        (
            api_error(500, "backendError", "Backend Error"),
            retryable(
                "google calendar: HTTP 500, code backendError: Backend Error",
                None,
            ),
        ),
        (
            ResponseTemplate::new(200).set_delay(Duration::from_secs(30)),
            retryable("google calendar: request timed out", None),
        ),
    ];
    for (response, expected) in cases {
        assert_eq!(calendar_answers(response).await, Err(expected));
    }

    // The token endpoint's own refusal (a fresh channel, so that no token is cached).
    let fresh = handler(&s, TaskType::SyncCalendar, "google_calendar");
    server.reset().await;
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        ))
        .mount(&server)
        .await;
    assert_eq!(
        fresh.handle(&t).await,
        Err(HandlerError::permanent(
            "google oauth: HTTP 400, code invalid_grant: Invalid JWT Signature."
        ))
    );
}

#[tokio::test]
async fn google_retries_a_401_once_with_a_new_token() {
    let server = MockServer::start().await;
    let tokens = Arc::new(TokenEndpoint::default());
    Mock::given(path("/token"))
        .respond_with(ArcResponder(tokens.clone()))
        .mount(&server)
        .await;
    Mock::given(path_regex("^/calendars/"))
        .and(bearer_token("token-1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(path_regex("^/calendars/"))
        .and(bearer_token("token-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "x"})))
        .mount(&server)
        .await;
    let channel =
        GoogleCalendarChannel::new(google_settings(&server.uri(), "5000").calendar.unwrap())
            .unwrap();

    let result = channel
        .handle(&task(
            TaskType::SyncCalendar,
            1,
            appointment("create", "a-2", "Cita"),
        ))
        .await
        .unwrap();

    assert_eq!(result["outcome"], "created");
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 2);
}

// --- through the whole system ----------------------------------------------------------------

#[sqlx::test]
async fn an_sms_template_goes_from_the_api_to_twilio_and_its_sid_into_the_history(pool: PgPool) {
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC0123/Messages.json"))
        .and(basic_auth("AC0123", TWILIO_TOKEN))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": "SM0000000000000000000000000000e2e",
            "status": "queued",
        })))
        .expect(1)
        .mount(&twilio)
        .await;
    let mut vars = twilio_vars(&twilio.uri());
    vars.push(("CLINIC_NAME", "Clínica Arnela".into()));
    let channels = channel::build(
        &settings(&pairs(&vars)),
        LogChannel::default(),
        &channel::RateScope::Process,
    );
    let mut registry = Registry::new().with_default_timeout(Duration::from_secs(5));
    for c in channels {
        registry = registry.register(c.task_type, c.handler);
    }
    let engine = engine_with(pool.clone(), registry, config(0.0)).await;
    let api = client(pool.clone()).await;

    let (status, created) = post(
        &api,
        "/tasks",
        &json!({
            "type": "send_sms",
            "payload": {
                "phone": PHONE,
                "template": "reminder",
                "data": {"patient_name": "Ana", "starts_at": "2026-12-01T10:00:00+01:00"},
            },
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id: TaskId = created["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(engine.relay_once().await, 1);
    assert_eq!(engine.step().await, Processed::Succeeded(id));

    let sent = form(&twilio.received_requests().await.unwrap()[0]);
    assert_eq!(
        sent["Body"],
        "Clínica Arnela: Ana, le recordamos su cita el martes, 1 de diciembre de 2026 a las 10:00."
    );
    assert_eq!(sent["To"], PHONE);
    let (status, history) = get(&api, &format!("/tasks/{id}/events")).await;
    assert_eq!(status, 200);
    let last = history.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["type"], "attempt_succeeded");
    assert_eq!(
        last["data"]["result"]["message_sid"],
        "SM0000000000000000000000000000e2e"
    );
    assert_eq!(last["data"]["result"]["status"], "queued");
}

#[sqlx::test]
async fn no_secret_reaches_the_logs_or_the_results(pool: PgPool) {
    let (logs, _guard) = common::logs::capture();
    let http = MockServer::start().await;
    let sink = common::smtp::Sink::start().await;
    // Twilio accepts, then refuses with 401; SendGrid refuses with 400; Google answers 401 first.
    Mock::given(path("/2010-04-01/Accounts/AC0123/Messages.json"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM9", "status": "queued"})),
        )
        .up_to_n_times(1)
        .mount(&http)
        .await;
    Mock::given(path("/2010-04-01/Accounts/AC0123/Messages.json"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"code": 20003, "message": "Authenticate", "status": 401})),
        )
        .mount(&http)
        .await;
    Mock::given(path("/v3/mail/send"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"errors": [{"message": "Invalid email", "field": "personalizations.0.to.0.email"}]}),
        ))
        .mount(&http)
        .await;
    let tokens = Arc::new(TokenEndpoint::default());
    Mock::given(path("/token"))
        .respond_with(ArcResponder(tokens.clone()))
        .mount(&http)
        .await;
    Mock::given(path_regex("^/calendars/"))
        .and(bearer_token("token-1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&http)
        .await;
    Mock::given(path_regex("^/calendars/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "x"})))
        .mount(&http)
        .await;

    let uri = http.uri();
    let key = service_account_json();
    let token_url = format!("{uri}/token");
    let smtp_port = sink.port.to_string();
    let mut vars: HashMap<String, String> = [
        ("APP_ENV", "test"),
        ("EMAIL_TRANSPORT", "smtp"),
        ("SMTP_HOST", "127.0.0.1"),
        ("SMTP_PORT", &smtp_port),
        ("SMTP_TLS", "none"),
        ("SMTP_USERNAME", "arnela"),
        ("SMTP_PASSWORD", SMTP_PASSWORD),
        ("SENDGRID_API_KEY", SENDGRID_KEY),
        ("SENDGRID_BASE_URL", &uri),
        ("EMAIL_FROM", "citas@clinica-arnela.es"),
        ("GOOGLE_SERVICE_ACCOUNT_JSON", &key),
        ("GOOGLE_CALENDAR_ID", CALENDAR_ID),
        ("GOOGLE_CALENDAR_BASE_URL", &uri),
        ("GOOGLE_TOKEN_URL", &token_url),
    ]
    .into_iter()
    .chain(pairs(&twilio_vars(&uri)))
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let app_settings = Settings::from_vars(&vars).unwrap();
    let app = App::from_parts(app_settings.clone(), pool, common::redis().await);
    tracing::info!(settings = ?app_settings, "start-up settings");

    // Start-up says which channel each type uses.
    let registry = app.registry();
    let run = |t: TaskType, payload: Value| {
        let h = registry.handler(t).unwrap();
        async move { h.handle(&task(t, 1, payload)).await }
    };
    let mut results = vec![
        run(TaskType::SendSms, sms("hola")).await,
        run(TaskType::SendSms, sms("hola")).await,
        run(TaskType::SendWhatsapp, sms("hola")).await,
        run(
            TaskType::SendEmail,
            json!({"to": EMAIL, "subject": "Cita", "body": "Hola"}),
        )
        .await,
        run(TaskType::SyncCalendar, appointment("create", "a-3", "Cita")).await,
    ];
    vars.insert("EMAIL_TRANSPORT".into(), "sendgrid".into());
    let sendgrid = Settings::from_vars(&vars).unwrap().channels;
    results.push(
        handler(&sendgrid, TaskType::SendEmail, "sendgrid")
            .handle(&task(
                TaskType::SendEmail,
                1,
                json!({"to": EMAIL, "subject": "Cita", "body": "Hola"}),
            ))
            .await,
    );
    drop(_guard);

    let text = logs.text();
    for expected in [
        "delivery channel",
        "channel=\"twilio_sms\"",
        "channel=\"twilio_whatsapp\"",
        "channel=\"smtp\"",
        "channel=\"google_calendar\"",
        "message sent",
        "message not sent",
        "e-mail sent",
        "e-mail not sent",
        "calendar synchronised",
        "+34******789",
        "a***@clinic.es",
    ] {
        assert!(text.contains(expected), "{expected:?} is logged:\n{text}");
    }
    let outcomes = format!("{results:?}");
    assert!(
        outcomes.contains("SM9") && outcomes.contains("code 20003"),
        "{outcomes}"
    );
    let private_key_line = key_line(&key);
    for secret in [
        TWILIO_TOKEN,
        SENDGRID_KEY,
        SMTP_PASSWORD,
        "token-1",
        "token-2",
        private_key_line.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret:?} is in the logs:\n{text}");
        assert!(
            !outcomes.contains(secret),
            "{secret:?} is in a result: {outcomes}"
        );
    }
    for recipient in [PHONE, EMAIL] {
        assert!(
            !text.contains(recipient),
            "{recipient} is logged unmasked:\n{text}"
        );
    }
}

/// A line from the middle of the private key in the service account file.
fn key_line(json: &str) -> String {
    let key: Value = serde_json::from_str(json).unwrap();
    key["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .nth(5)
        .unwrap()
        .to_owned()
}
