//! Every setting, documented once: the rows of README's two settings tables ("Configuration"
//! and "Channel configuration") are generated from [`SERVICE`] and [`CHANNELS`], and
//! `tests/it/settings_doc.rs` fails when the README differs, when the settings code reads a
//! variable no row names, or when a row names one nothing reads.

/// One row of a settings table: the variables it documents, and its three cells as Markdown.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub vars: &'static [&'static str],
    pub label: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// A settings table as README writes it.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            r.label, r.default, r.meaning
        ));
    }
    out
}

/// Every variable a row names.
pub fn documented() -> impl Iterator<Item = &'static str> {
    SERVICE
        .iter()
        .chain(CHANNELS)
        .flat_map(|r| r.vars.iter().copied())
}

/// The rows of README's "Configuration" table, in order.
pub const SERVICE: &[Row] = &[
    Row {
        vars: &["APP_ENV"],
        label: "`APP_ENV`",
        default: "`development`",
        meaning: "`development`, `test` or `production`",
    },
    Row {
        vars: &["APP_PORT"],
        label: "`APP_PORT`",
        default: "`8080`",
        meaning: "HTTP port",
    },
    Row {
        vars: &["DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "DB_SSLMODE", "DATABASE_URL"],
        label: "`DB_HOST` `DB_PORT` `DB_USER` `DB_PASSWORD` `DB_NAME` `DB_SSLMODE`",
        default: "`localhost` `5432` `postgres` – `arnela_db` `prefer`",
        meaning: "Postgres; `DATABASE_URL` overrides them",
    },
    Row {
        vars: &["DB_MIGRATION_USER", "DB_MIGRATION_PASSWORD", "DB_USER", "DATABASE_URL"],
        label: "`DB_MIGRATION_USER` `DB_MIGRATION_PASSWORD`",
        default: "–",
        meaning: "the role `arnela migrate` logs in as, instead of `DB_USER` (or `DATABASE_URL`'s user): the owner of the tables (see [Audit](#audit)); no other command reads them, and they cannot be given as `_FILE`",
    },
    Row {
        vars: &["DB_SSLROOTCERT", "DB_HOST"],
        label: "`DB_SSLROOTCERT`",
        default: "–",
        meaning: "the CA (PEM file) that signed the Postgres server's certificate: with `DB_SSLMODE=verify-full` the service checks both the chain and that the certificate names `DB_HOST` (use it whenever Postgres is reached over a network you do not control)",
    },
    Row {
        vars: &["DB_MAX_CONNECTIONS"],
        label: "`DB_MAX_CONNECTIONS`",
        default: "`20`",
        meaning: "pool size",
    },
    Row {
        vars: &["REDIS_HOST", "REDIS_PORT", "REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_DB", "REDIS_URL"],
        label: "`REDIS_HOST` `REDIS_PORT` `REDIS_USERNAME` `REDIS_PASSWORD` `REDIS_DB`",
        default: "`localhost` `6379` – – `0`",
        meaning: "Redis (`REDIS_USERNAME`: an ACL user; absent: the default user); `REDIS_URL` overrides them",
    },
    Row {
        vars: &["REDIS_TLS", "REDIS_CA_CERT", "REDIS_URL", "REDIS_HOST"],
        label: "`REDIS_TLS` / `REDIS_CA_CERT`",
        default: "`false` / –",
        meaning: "TLS to Redis (a `rediss://` `REDIS_URL` turns it on by itself) / the CA (PEM file) that signed Redis's certificate when the system does not trust it; the certificate must name `REDIS_HOST`",
    },
    Row {
        vars: &["ARNELA_KEY_PREFIX"],
        label: "`ARNELA_KEY_PREFIX`",
        default: "`arnela`",
        meaning: "prefix of every Redis key",
    },
    Row {
        vars: &["JWT_PREVIOUS_SECRETS"],
        label: "`JWT_PREVIOUS_SECRETS`",
        default: "–",
        meaning: "earlier JWT secrets whose tokens are still accepted during a rotation (comma-separated; ≥ 32 characters each in production)",
    },
    Row {
        vars: &["JWT_SECRET"],
        label: "`JWT_SECRET`",
        default: "–",
        meaning: "signs and verifies the API's bearer tokens ([Access](#access)); `serve` and `api` refuse to start without it (any value in development, ≥ 32 characters in production)",
    },
    Row {
        vars: &["MAX_BODY_BYTES"],
        label: "`MAX_BODY_BYTES`",
        default: "`8388608`",
        meaning: "largest request body (413 above: at once when `Content-Length` says so, else as soon as a chunked body passes it); one task's payload is limited to 64 KiB",
    },
    Row {
        vars: &["HTTP_MAX_CONNECTIONS"],
        label: "`HTTP_MAX_CONNECTIONS`",
        default: "`1024`",
        meaning: "HTTP connections open at once; the next is accepted when one closes",
    },
    Row {
        vars: &["HTTP_MAX_IN_FLIGHT"],
        label: "`HTTP_MAX_IN_FLIGHT`",
        default: "`256`",
        meaning: "API requests running at once; beyond it 503 `overloaded` with `Retry-After` (the health reports and `/metrics` always answer)",
    },
    Row {
        vars: &["HTTP_BODY_BUDGET_MB", "MAX_BODY_BYTES"],
        label: "`HTTP_BODY_BUDGET_MB`",
        default: "`64`",
        meaning: "request-body memory of all requests together; a body that would pass it gets 503 `overloaded` with `Retry-After` (at least `MAX_BODY_BYTES`)",
    },
    Row {
        vars: &["HTTP_BODY_TIMEOUT_SECS"],
        label: "`HTTP_BODY_TIMEOUT_SECS`",
        default: "`30`",
        meaning: "time a request body has to arrive in full (408 `request_timeout` after it)",
    },
    Row {
        vars: &["HTTP_IDLE_TIMEOUT_SECS"],
        label: "`HTTP_IDLE_TIMEOUT_SECS`",
        default: "`60`",
        meaning: "an HTTP connection without a byte for this long is closed",
    },
    Row {
        vars: &["SCHEDULE_HORIZON_DAYS"],
        label: "`SCHEDULE_HORIZON_DAYS`",
        default: "`366`",
        meaning: "how far ahead `run_at` may be; a `run_at` in the past counts as now, so no task can jump ahead of the tasks already waiting",
    },
    Row {
        vars: &["HEALTH_TIMEOUT_MS"],
        label: "`HEALTH_TIMEOUT_MS`",
        default: "`1000`",
        meaning: "per-dependency timeout of `/health`, and of each scrape-time read of `/metrics`",
    },
    Row {
        vars: &["METRICS_ADDR"],
        label: "`METRICS_ADDR`",
        default: "–",
        meaning: "e.g. `0.0.0.0:9464`: every role (`serve`, `api`, `relay`, `worker`) also serves `/metrics` there, without auth (keep it on a private network)",
    },
    Row {
        vars: &["WORKERS"],
        label: "`WORKERS`",
        default: "`5`",
        meaning: "attempts running at once per process (worker slots)",
    },
    Row {
        vars: &["WORKER_LEASE_SECS"],
        label: "`WORKER_LEASE_SECS`",
        default: "`30`",
        meaning: "lease of a claimed attempt (renewed every third)",
    },
    Row {
        vars: &["HANDLER_TIMEOUT_SECS", "HANDLER_TIMEOUT_SEND_EMAIL_SECS", "HANDLER_TIMEOUT_SEND_SMS_SECS", "HANDLER_TIMEOUT_SEND_WHATSAPP_SECS", "HANDLER_TIMEOUT_SYNC_CALENDAR_SECS"],
        label: "`HANDLER_TIMEOUT_SECS`",
        default: "`30`",
        meaning: "handler time limit; per type: `HANDLER_TIMEOUT_SEND_EMAIL_SECS`, `…_SEND_SMS_…`, `…_SEND_WHATSAPP_…`, `…_SYNC_CALENDAR_…`",
    },
    Row {
        vars: &["DRAIN_TIMEOUT_SECS"],
        label: "`DRAIN_TIMEOUT_SECS`",
        default: "`25`",
        meaning: "how long running handlers may finish after SIGTERM",
    },
    Row {
        vars: &["RETRY_BASE_MS", "RETRY_CAP_MS"],
        label: "`RETRY_BASE_MS` / `RETRY_CAP_MS`",
        default: "`1000` / `600000`",
        meaning: "backoff ceiling of the first retry / cap",
    },
    Row {
        vars: &["RELAY_BATCH", "RELAY_POLL_MS"],
        label: "`RELAY_BATCH` / `RELAY_POLL_MS`",
        default: "`500` / `500`",
        meaning: "outbox rows per batch / polling fallback",
    },
    Row {
        vars: &["RESCUER_INTERVAL_MS"],
        label: "`RESCUER_INTERVAL_MS`",
        default: "`1000`",
        meaning: "rescuer pass interval",
    },
    Row {
        vars: &["ORPHAN_GRACE_SECS"],
        label: "`ORPHAN_GRACE_SECS`",
        default: "`30`",
        meaning: "age at which a processing entry is examined",
    },
    Row {
        vars: &["REPUBLISH_AFTER_SECS"],
        label: "`REPUBLISH_AFTER_SECS`",
        default: "`10`",
        meaning: "age after which a published delivery missing from Redis (`…:tasks:transit`) is published again",
    },
    Row {
        vars: &["LOG_CHANNEL_DELAY_MS"],
        label: "`LOG_CHANNEL_DELAY_MS`",
        default: "`0`",
        meaning: "simulated provider latency of the `log` channel",
    },
    Row {
        vars: &["PROJECTOR_INTERVAL_MS"],
        label: "`PROJECTOR_INTERVAL_MS`",
        default: "`100`",
        meaning: "how often an idle projector reads the event log (bounds how stale a cached read can be)",
    },
    Row {
        vars: &["SCHEDULER_POLL_MS"],
        label: "`SCHEDULER_POLL_MS`",
        default: "`1000`",
        meaning: "longest sleep of the scheduler: how soon a schedule created or resumed by another process is seen (due slots wake it on time)",
    },
    Row {
        vars: &["RUST_LOG", "LOG_FORMAT"],
        label: "`RUST_LOG`, `LOG_FORMAT=json`",
        default: "`info`",
        meaning: "log filter and format",
    },
    Row {
        vars: &["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_SERVICE_NAME", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_SPAN_LEVEL"],
        label: "`OTEL_EXPORTER_OTLP_ENDPOINT`",
        default: "–",
        meaning: "export spans over OTLP/HTTP to this collector (see [Tracing](#tracing)); with `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_SPAN_LEVEL`",
    },
    Row {
        vars: &["AUDIT_SIGNING_KEY", "AUDIT_CHECKPOINT_SECS"],
        label: "`AUDIT_SIGNING_KEY` / `AUDIT_CHECKPOINT_SECS`",
        default: "– / `60`",
        meaning: "Ed25519 seed (64 hex digits, `arnela audit keygen`) that signs a checkpoint of the event log every so many seconds (see [Audit](#audit)); unset: no checkpoints",
    },
    Row {
        vars: &["RETENTION_FINISHED_TASKS_DAYS"],
        label: "`RETENTION_FINISHED_TASKS_DAYS`",
        default: "`0`",
        meaning: "days a finished task (succeeded, dead, cancelled) keeps its row in `tasks` after its last change; then it moves to `retired_tasks` without its payload, idempotency key and last error (see [Audit](#audit), \"Retention of finished tasks\"); 0 keeps every row",
    },
    Row {
        vars: &["MAINTENANCE_INTERVAL_SECS"],
        label: "`MAINTENANCE_INTERVAL_SECS`",
        default: "`3600`",
        meaning: "how often every process with the relay role makes the event log's next monthly partitions and applies the retention above",
    },
    Row {
        vars: &["AUDIT_DATA_KEY"],
        label: "`AUDIT_DATA_KEY`",
        default: "–",
        meaning: "master key (64 hex digits, `arnela audit keygen`) that wraps each task's data key; set: the personal fields of new tasks are stored sealed and can be erased (see [Audit](#audit), \"Erasure\"); unset: stored as they come (a warning at start)",
    },
];

/// The rows of README's "Channel configuration" table, in order.
pub const CHANNELS: &[Row] = &[
    Row {
        vars: &["ALLOW_LOG_CHANNEL"],
        label: "`ALLOW_LOG_CHANNEL`",
        default: "`false`",
        meaning: "production may run a type on the `log` channel",
    },
    Row {
        vars: &["CLINIC_NAME"],
        label: "`CLINIC_NAME`",
        default: "`Arnela`",
        meaning: "the clinic's name in the templates",
    },
    Row {
        vars: &["EMAIL_TRANSPORT"],
        label: "`EMAIL_TRANSPORT`",
        default: "from what is set",
        meaning: "`smtp`, `sendgrid` or `log`",
    },
    Row {
        vars: &["EMAIL_FROM", "EMAIL_FROM_NAME"],
        label: "`EMAIL_FROM` / `EMAIL_FROM_NAME`",
        default: "–",
        meaning: "sender address (required for e-mail) and display name",
    },
    Row {
        vars: &["EMAIL_TIMEOUT_MS", "EMAIL_RATE_LIMIT_PER_SEC"],
        label: "`EMAIL_TIMEOUT_MS` / `EMAIL_RATE_LIMIT_PER_SEC`",
        default: "`10000` / `10`",
        meaning: "per request or SMTP command / requests a second (`0`: no limit)",
    },
    Row {
        vars: &["SMTP_HOST", "SMTP_PORT"],
        label: "`SMTP_HOST` `SMTP_PORT`",
        default: "– / by `SMTP_TLS`",
        meaning: "SMTP server; port 587 (`starttls`), 465 (`tls`), 25 (`none`)",
    },
    Row {
        vars: &["SMTP_TLS"],
        label: "`SMTP_TLS`",
        default: "`starttls`",
        meaning: "`starttls` (required, not opportunistic), `tls`, or `none` (not in production)",
    },
    Row {
        vars: &["SMTP_USERNAME", "SMTP_PASSWORD"],
        label: "`SMTP_USERNAME` / `SMTP_PASSWORD`",
        default: "–",
        meaning: "SMTP AUTH, together or not at all",
    },
    Row {
        vars: &["SENDGRID_API_KEY", "SENDGRID_BASE_URL"],
        label: "`SENDGRID_API_KEY` / `SENDGRID_BASE_URL`",
        default: "– / `https://api.sendgrid.com`",
        meaning: "SendGrid",
    },
    Row {
        vars: &["TWILIO_ACCOUNT_SID"],
        label: "`TWILIO_ACCOUNT_SID`",
        default: "–",
        meaning: "`AC…`",
    },
    Row {
        vars: &[
            "TWILIO_AUTH_TOKEN",
            "TWILIO_API_KEY_SID",
            "TWILIO_API_KEY_SECRET",
        ],
        label: "`TWILIO_AUTH_TOKEN`, or `TWILIO_API_KEY_SID` + `TWILIO_API_KEY_SECRET`",
        default: "–",
        meaning: "credentials (an API key is preferred)",
    },
    Row {
        vars: &["TWILIO_SMS_FROM", "TWILIO_SMS_MESSAGING_SERVICE_SID"],
        label: "`TWILIO_SMS_FROM` or `TWILIO_SMS_MESSAGING_SERVICE_SID`",
        default: "–",
        meaning: "SMS sender: an E.164 number or an `MG…` service",
    },
    Row {
        vars: &[
            "TWILIO_WHATSAPP_FROM",
            "TWILIO_WHATSAPP_MESSAGING_SERVICE_SID",
        ],
        label: "`TWILIO_WHATSAPP_FROM` or `TWILIO_WHATSAPP_MESSAGING_SERVICE_SID`",
        default: "–",
        meaning: "WhatsApp sender",
    },
    Row {
        vars: &[
            "TWILIO_BASE_URL",
            "TWILIO_TIMEOUT_MS",
            "TWILIO_RATE_LIMIT_PER_SEC",
        ],
        label: "`TWILIO_BASE_URL` / `TWILIO_TIMEOUT_MS` / `TWILIO_RATE_LIMIT_PER_SEC`",
        default: "`https://api.twilio.com` / `10000` / `10`",
        meaning: "shared by SMS and WhatsApp",
    },
    Row {
        vars: &["GOOGLE_SERVICE_ACCOUNT_FILE", "GOOGLE_SERVICE_ACCOUNT_JSON"],
        label: "`GOOGLE_SERVICE_ACCOUNT_FILE` or `GOOGLE_SERVICE_ACCOUNT_JSON`",
        default: "–",
        meaning: "the service account's JSON key (path or contents)",
    },
    Row {
        vars: &["GOOGLE_CALENDAR_ID"],
        label: "`GOOGLE_CALENDAR_ID`",
        default: "–",
        meaning: "the calendar, shared with the service account (\"make changes to events\")",
    },
    Row {
        vars: &["GOOGLE_IMPERSONATE_USER"],
        label: "`GOOGLE_IMPERSONATE_USER`",
        default: "–",
        meaning: "user to act for (domain-wide delegation)",
    },
    Row {
        vars: &["GOOGLE_CALENDAR_TIME_ZONE"],
        label: "`GOOGLE_CALENDAR_TIME_ZONE`",
        default: "`Europe/Madrid`",
        meaning: "time zone of appointments that name none",
    },
    Row {
        vars: &["GOOGLE_CALENDAR_SEND_UPDATES"],
        label: "`GOOGLE_CALENDAR_SEND_UPDATES`",
        default: "`none`",
        meaning: "`all`, `externalOnly` or `none`: invitation e-mails to attendees",
    },
    Row {
        vars: &["GOOGLE_APPOINTMENT_MINUTES"],
        label: "`GOOGLE_APPOINTMENT_MINUTES`",
        default: "`30`",
        meaning: "length of an appointment without an end",
    },
    Row {
        vars: &["GOOGLE_CALENDAR_BASE_URL", "GOOGLE_TOKEN_URL"],
        label: "`GOOGLE_CALENDAR_BASE_URL` / `GOOGLE_TOKEN_URL`",
        default: "`https://www.googleapis.com/calendar/v3` / the key's `token_uri`",
        meaning: "endpoints",
    },
    Row {
        vars: &["GOOGLE_TIMEOUT_MS", "GOOGLE_RATE_LIMIT_PER_SEC"],
        label: "`GOOGLE_TIMEOUT_MS` / `GOOGLE_RATE_LIMIT_PER_SEC`",
        default: "`10000` / `5`",
        meaning: "per request / requests a second",
    },
];
