//! Delivery channel settings, read from the same variables as [`crate::config::Settings`] and
//! validated once at start-up.
//!
//! A channel whose credentials are all absent uses the `log` channel. A channel that is half
//! configured (a Twilio sender without an account, a Google key without a calendar) stops
//! start-up with the variable to fix: a typo must not silently turn real deliveries into log
//! lines. In production a task type without a real channel is refused unless
//! `ALLOW_LOG_CHANNEL=true`. Credentials are [`SecretString`]s and never appear in `Debug` output.

use reqwest::Url;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::variables::{self, ChannelVars};
use super::{err, parse_url, AppEnv, ConfigError};
use crate::domain::payload::{is_e164, is_email};
use crate::domain::TaskType;

pub const SENDGRID_BASE_URL: &str = "https://api.sendgrid.com";
pub const TWILIO_BASE_URL: &str = "https://api.twilio.com";
pub const GOOGLE_CALENDAR_BASE_URL: &str = "https://www.googleapis.com/calendar/v3";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

/// The settings of every channel.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// `send_email`; `None`: the log channel.
    pub email: Option<EmailSettings>,
    /// `send_sms`; `None`: the log channel.
    pub sms: Option<TwilioSettings>,
    /// `send_whatsapp`; `None`: the log channel.
    pub whatsapp: Option<TwilioSettings>,
    /// `sync_calendar`; `None`: the log channel.
    pub calendar: Option<GoogleSettings>,
    /// Requests per second to Twilio, shared by SMS and WhatsApp (`TWILIO_RATE_LIMIT_PER_SEC`).
    pub twilio_rate_limit: f64,
    /// The clinic's name in the message templates (`CLINIC_NAME`), unless a task's data names it.
    pub clinic_name: String,
    /// `ALLOW_LOG_CHANNEL`: production may run with log channels.
    pub allow_log_channel: bool,
}

/// `send_email`: the sender and one transport.
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// `EMAIL_FROM`.
    pub from: String,
    /// `EMAIL_FROM_NAME`.
    pub from_name: Option<String>,
    pub transport: EmailTransport,
    /// `EMAIL_TIMEOUT_MS` (10000): one request or SMTP command.
    pub timeout: Duration,
    /// `EMAIL_RATE_LIMIT_PER_SEC` (10).
    pub rate_limit: f64,
}

#[derive(Debug, Clone)]
pub enum EmailTransport {
    Smtp(SmtpSettings),
    SendGrid(SendGridSettings),
}

/// How the SMTP connection is secured (`SMTP_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which is required (default; port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption (a local relay or a test sink; port 25).
    None,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: SecretString,
}

#[derive(Debug, Clone)]
pub struct SendGridSettings {
    pub base_url: Url,
    pub api_key: SecretString,
}

/// One Twilio channel (SMS or WhatsApp): the account, its credentials and this channel's sender.
#[derive(Debug, Clone)]
pub struct TwilioSettings {
    pub base_url: Url,
    pub account_sid: String,
    /// Basic-auth user: the account SID, or an API key SID (`SK…`).
    pub auth_user: String,
    /// The auth token or the API key secret.
    pub auth_secret: SecretString,
    pub sender: TwilioSender,
    /// `TWILIO_TIMEOUT_MS` (10000).
    pub timeout: Duration,
}

/// Who a Twilio message is sent from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwilioSender {
    /// A number in E.164 (without the `whatsapp:` prefix).
    From(String),
    /// A messaging service SID (`MG…`); Twilio picks the number.
    MessagingService(String),
}

/// `sync_calendar`: a service account writing to one calendar.
#[derive(Debug, Clone)]
pub struct GoogleSettings {
    pub calendar_base_url: Url,
    pub token_url: Url,
    /// `GOOGLE_CALENDAR_ID`.
    pub calendar_id: String,
    pub client_email: String,
    pub private_key_id: Option<String>,
    /// PEM of the service account's RSA key.
    pub private_key: SecretString,
    /// `GOOGLE_IMPERSONATE_USER`: the user the service account acts for (domain-wide delegation).
    pub subject: Option<String>,
    /// `GOOGLE_CALENDAR_TIME_ZONE` (`Europe/Madrid`): for appointments that name none.
    pub time_zone: String,
    /// `GOOGLE_CALENDAR_SEND_UPDATES` (`none`): `all`, `externalOnly` or `none`.
    pub send_updates: String,
    /// `GOOGLE_APPOINTMENT_MINUTES` (30): length of an appointment with no end.
    pub appointment_minutes: u32,
    /// `GOOGLE_TIMEOUT_MS` (10000).
    pub timeout: Duration,
    /// `GOOGLE_RATE_LIMIT_PER_SEC` (5).
    pub rate_limit: f64,
}

/// The fields of a service account key file that are used.
#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

impl ChannelSettings {
    /// Reads the channel variables; `app_env` decides whether log channels are acceptable.
    pub fn from_vars(
        vars: &HashMap<String, String>,
        app_env: AppEnv,
    ) -> Result<ChannelSettings, ConfigError> {
        let v: ChannelVars = variables::parse(vars)?;
        let production = app_env == AppEnv::Production;
        let (sms, whatsapp) = twilio(&v, production)?;
        let settings = ChannelSettings {
            email: email(&v, production)?,
            sms,
            whatsapp,
            calendar: google(&v, production)?,
            twilio_rate_limit: v.twilio_rate_limit_per_sec,
            clinic_name: v.clinic_name,
            allow_log_channel: v.allow_log_channel,
        };
        if production && !settings.allow_log_channel {
            for t in TaskType::ALL {
                if settings.channel_name(t) == "log" {
                    let var = match t {
                        TaskType::SendEmail => "EMAIL_TRANSPORT",
                        TaskType::SendSms => "TWILIO_SMS_FROM",
                        TaskType::SendWhatsapp => "TWILIO_WHATSAPP_FROM",
                        TaskType::SyncCalendar => "GOOGLE_SERVICE_ACCOUNT_FILE",
                    };
                    return Err(err(
                        var,
                        format!(
                            "{t} has no delivery channel configured; in production configure \
                             it (see the README) or set ALLOW_LOG_CHANNEL=true to record its \
                             messages in the log instead of sending them"
                        ),
                    ));
                }
            }
        }
        Ok(settings)
    }

    /// The name of the channel that delivers `task_type`: `smtp`, `sendgrid`, `twilio_sms`,
    /// `twilio_whatsapp`, `google_calendar` or `log`.
    pub fn channel_name(&self, task_type: TaskType) -> &'static str {
        match task_type {
            TaskType::SendEmail => match &self.email {
                Some(EmailSettings {
                    transport: EmailTransport::Smtp(_),
                    ..
                }) => "smtp",
                Some(EmailSettings {
                    transport: EmailTransport::SendGrid(_),
                    ..
                }) => "sendgrid",
                None => "log",
            },
            TaskType::SendSms if self.sms.is_some() => "twilio_sms",
            TaskType::SendWhatsapp if self.whatsapp.is_some() => "twilio_whatsapp",
            TaskType::SyncCalendar if self.calendar.is_some() => "google_calendar",
            _ => "log",
        }
    }

    /// Settings with every channel on the log channel (development defaults).
    pub fn all_log() -> ChannelSettings {
        ChannelSettings {
            email: None,
            sms: None,
            whatsapp: None,
            calendar: None,
            twilio_rate_limit: 10.0,
            clinic_name: "Arnela".into(),
            allow_log_channel: true,
        }
    }
}

fn email(v: &ChannelVars, production: bool) -> Result<Option<EmailSettings>, ConfigError> {
    let sendgrid_key = v.sendgrid_api_key.as_deref();
    let smtp_host = v.smtp_host.as_deref();
    let transport = match v.email_transport.as_deref() {
        Some("log") => return Ok(None),
        Some("smtp") => "smtp",
        Some(_) => "sendgrid",
        None => match (sendgrid_key, smtp_host) {
            (None, None) => return Ok(None),
            (Some(_), None) => "sendgrid",
            (None, Some(_)) => "smtp",
            (Some(_), Some(_)) => {
                return Err(err(
                    "EMAIL_TRANSPORT",
                    "both SENDGRID_API_KEY and SMTP_HOST are set; choose with EMAIL_TRANSPORT=smtp or sendgrid",
                ))
            }
        },
    };
    let from = v
        .email_from
        .as_deref()
        .ok_or_else(|| err("EMAIL_FROM", "is required to send e-mail"))?;
    if !is_email(from) {
        return Err(err("EMAIL_FROM", "must be an e-mail address"));
    }
    let transport = if transport == "smtp" {
        let host =
            smtp_host.ok_or_else(|| err("SMTP_HOST", "is required for EMAIL_TRANSPORT=smtp"))?;
        let tls = match v.smtp_tls.as_str() {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            _ if !production => SmtpTls::None,
            _ => {
                return Err(err(
                    "SMTP_TLS",
                    "none is refused in production (use starttls or tls)",
                ))
            }
        };
        let default_port = match tls {
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        };
        let username = v.smtp_username.clone();
        let password = SecretString::from(v.smtp_password.clone().unwrap_or_default());
        let has_password = !password.expose_secret().is_empty();
        if username.is_some() != has_password {
            return Err(err(
                "SMTP_PASSWORD",
                "SMTP_USERNAME and SMTP_PASSWORD go together",
            ));
        }
        if tls != SmtpTls::None {
            // The TLS parameters are built here so that a bad host name stops start-up.
            lettre::transport::smtp::client::TlsParameters::new(host.to_owned())
                .map_err(|e| err("SMTP_HOST", format!("cannot be used for TLS: {e}")))?;
        }
        EmailTransport::Smtp(SmtpSettings {
            host: host.to_owned(),
            port: v.smtp_port.unwrap_or(default_port),
            tls,
            username,
            password,
        })
    } else {
        let api_key = sendgrid_key.ok_or_else(|| {
            err(
                "SENDGRID_API_KEY",
                "is required for EMAIL_TRANSPORT=sendgrid",
            )
        })?;
        EmailTransport::SendGrid(SendGridSettings {
            base_url: parse_url("SENDGRID_BASE_URL", &v.sendgrid_base_url, production)?,
            api_key: SecretString::from(api_key),
        })
    };
    Ok(Some(EmailSettings {
        from: from.to_owned(),
        from_name: v.email_from_name.clone(),
        transport,
        timeout: Duration::from_millis(v.email_timeout_ms),
        rate_limit: v.email_rate_limit_per_sec,
    }))
}

type TwilioPair = (Option<TwilioSettings>, Option<TwilioSettings>);

fn twilio(v: &ChannelVars, production: bool) -> Result<TwilioPair, ConfigError> {
    let sender = |(from_var, from): (&'static str, &Option<String>),
                  (service_var, service): (&'static str, &Option<String>)| match (
        from.as_deref(),
        service.as_deref(),
    ) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(err(
            service_var,
            format!("set either {from_var} or {service_var}, not both"),
        )),
        (Some(from), None) => {
            let number = from.strip_prefix("whatsapp:").unwrap_or(from);
            if !is_e164(number) {
                return Err(err(from_var, "must be an E.164 number like +34123456789"));
            }
            Ok(Some(TwilioSender::From(number.to_owned())))
        }
        (None, Some(sid)) => {
            if !sid.starts_with("MG") {
                return Err(err(service_var, "must be a messaging service SID (MG…)"));
            }
            Ok(Some(TwilioSender::MessagingService(sid.to_owned())))
        }
    };
    let sms = sender(
        ("TWILIO_SMS_FROM", &v.twilio_sms_from),
        (
            "TWILIO_SMS_MESSAGING_SERVICE_SID",
            &v.twilio_sms_messaging_service_sid,
        ),
    )?;
    let whatsapp = sender(
        ("TWILIO_WHATSAPP_FROM", &v.twilio_whatsapp_from),
        (
            "TWILIO_WHATSAPP_MESSAGING_SERVICE_SID",
            &v.twilio_whatsapp_messaging_service_sid,
        ),
    )?;
    let Some(account_sid) = v.twilio_account_sid.as_deref() else {
        if sms.is_some() || whatsapp.is_some() {
            return Err(err(
                "TWILIO_ACCOUNT_SID",
                "is required when a Twilio sender is configured",
            ));
        }
        return Ok((None, None));
    };
    if !account_sid.starts_with("AC") {
        return Err(err("TWILIO_ACCOUNT_SID", "must be an account SID (AC…)"));
    }
    let (auth_user, auth_secret) = match (
        v.twilio_auth_token.as_deref(),
        v.twilio_api_key_sid.as_deref(),
        v.twilio_api_key_secret.as_deref(),
    ) {
        (_, Some(key), Some(secret)) => {
            if !key.starts_with("SK") {
                return Err(err("TWILIO_API_KEY_SID", "must be an API key SID (SK…)"));
            }
            (key.to_owned(), SecretString::from(secret))
        }
        (_, Some(_), None) => {
            return Err(err(
                "TWILIO_API_KEY_SECRET",
                "is required with TWILIO_API_KEY_SID",
            ))
        }
        (_, None, Some(_)) => {
            return Err(err(
                "TWILIO_API_KEY_SID",
                "is required with TWILIO_API_KEY_SECRET",
            ))
        }
        (Some(token), None, None) => (account_sid.to_owned(), SecretString::from(token)),
        (None, None, None) => return Err(err(
            "TWILIO_AUTH_TOKEN",
            "is required with TWILIO_ACCOUNT_SID (or TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET)",
        )),
    };
    let base_url = parse_url("TWILIO_BASE_URL", &v.twilio_base_url, production)?;
    let timeout = Duration::from_millis(v.twilio_timeout_ms);
    let make = |sender: TwilioSender| TwilioSettings {
        base_url: base_url.clone(),
        account_sid: account_sid.to_owned(),
        auth_user: auth_user.clone(),
        auth_secret: auth_secret.clone(),
        sender,
        timeout,
    };
    Ok((sms.map(make), whatsapp.map(make)))
}

fn google(v: &ChannelVars, production: bool) -> Result<Option<GoogleSettings>, ConfigError> {
    let (key_var, key_json) =
        match (
            v.google_service_account_json.as_deref(),
            v.google_service_account_file.as_deref(),
        ) {
            (Some(_), Some(_)) => return Err(err(
                "GOOGLE_SERVICE_ACCOUNT_FILE",
                "set either GOOGLE_SERVICE_ACCOUNT_JSON or GOOGLE_SERVICE_ACCOUNT_FILE, not both",
            )),
            (Some(json), None) => ("GOOGLE_SERVICE_ACCOUNT_JSON", json.to_owned()),
            (None, Some(path)) => (
                "GOOGLE_SERVICE_ACCOUNT_FILE",
                std::fs::read_to_string(path).map_err(|e| {
                    err(
                        "GOOGLE_SERVICE_ACCOUNT_FILE",
                        format!("cannot read {path}: {e}"),
                    )
                })?,
            ),
            (None, None) => {
                if v.google_calendar_id.is_some() {
                    return Err(err(
                        "GOOGLE_SERVICE_ACCOUNT_FILE",
                        "is required with GOOGLE_CALENDAR_ID (or GOOGLE_SERVICE_ACCOUNT_JSON)",
                    ));
                }
                return Ok(None);
            }
        };
    // serde's message could quote the key; say only what is wrong.
    let key: ServiceAccountKey = serde_json::from_str(&key_json).map_err(|_| {
        err(
            key_var,
            "is not a service account key (JSON with client_email and private_key)",
        )
    })?;
    jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
        .map_err(|_| err(key_var, "private_key is not an RSA key in PEM format"))?;
    let calendar_id = v.google_calendar_id.as_deref().ok_or_else(|| {
        err(
            "GOOGLE_CALENDAR_ID",
            "is required with a Google service account",
        )
    })?;
    let token_url = match v.google_token_url.as_deref() {
        Some(u) => parse_url("GOOGLE_TOKEN_URL", u, production)?,
        None => parse_url(
            key_var,
            key.token_uri.as_deref().unwrap_or(GOOGLE_TOKEN_URL),
            production,
        )?,
    };
    Ok(Some(GoogleSettings {
        calendar_base_url: parse_url(
            "GOOGLE_CALENDAR_BASE_URL",
            &v.google_calendar_base_url,
            production,
        )?,
        token_url,
        calendar_id: calendar_id.to_owned(),
        client_email: key.client_email,
        private_key_id: key.private_key_id,
        private_key: SecretString::from(key.private_key),
        subject: v.google_impersonate_user.clone(),
        time_zone: v.google_calendar_time_zone.clone(),
        send_updates: v.google_calendar_send_updates.clone(),
        appointment_minutes: v.google_appointment_minutes,
        timeout: Duration::from_millis(v.google_timeout_ms),
        rate_limit: v.google_rate_limit_per_sec,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::vars;

    fn key_json() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/google-service-account.test.json"
        ))
        .unwrap()
    }

    #[test]
    fn nothing_configured_means_log_channels_outside_production() {
        let s = ChannelSettings::from_vars(&vars(&[]), AppEnv::Development).unwrap();
        for t in TaskType::ALL {
            assert_eq!(s.channel_name(t), "log");
        }
    }

    #[test]
    fn production_refuses_a_log_channel_unless_allowed() {
        let e = ChannelSettings::from_vars(&vars(&[]), AppEnv::Production).unwrap_err();
        assert_eq!(e.var, "EMAIL_TRANSPORT");
        assert!(e.message.contains("ALLOW_LOG_CHANNEL"), "{e}");
        let allowed = vars(&[("ALLOW_LOG_CHANNEL", "true")]);
        assert!(ChannelSettings::from_vars(&allowed, AppEnv::Production).is_ok());

        let only_email = vars(&[
            ("SENDGRID_API_KEY", "SG.key"),
            ("EMAIL_FROM", "citas@clinica.es"),
        ]);
        let e = ChannelSettings::from_vars(&only_email, AppEnv::Production).unwrap_err();
        assert_eq!(e.var, "TWILIO_SMS_FROM");
    }

    #[test]
    fn every_channel_configured() {
        let json = key_json();
        let s = ChannelSettings::from_vars(
            &vars(&[
                ("EMAIL_TRANSPORT", "smtp"),
                ("SMTP_HOST", "smtp.example.com"),
                ("SMTP_USERNAME", "user"),
                ("SMTP_PASSWORD", "pw"),
                ("EMAIL_FROM", "citas@clinica.es"),
                ("TWILIO_ACCOUNT_SID", "AC123"),
                ("TWILIO_AUTH_TOKEN", "tok"),
                ("TWILIO_SMS_FROM", "+34600000000"),
                ("TWILIO_WHATSAPP_MESSAGING_SERVICE_SID", "MG123"),
                ("GOOGLE_SERVICE_ACCOUNT_JSON", &json),
                ("GOOGLE_CALENDAR_ID", "clinic@group.calendar.google.com"),
            ]),
            AppEnv::Production,
        )
        .unwrap();
        let names: Vec<&str> = TaskType::ALL.iter().map(|t| s.channel_name(*t)).collect();
        assert_eq!(
            names,
            ["smtp", "twilio_sms", "twilio_whatsapp", "google_calendar"]
        );
        let smtp = match &s.email.as_ref().unwrap().transport {
            EmailTransport::Smtp(smtp) => smtp.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!((smtp.port, smtp.tls), (587, SmtpTls::StartTls));
        let google = s.calendar.as_ref().unwrap();
        assert_eq!(google.token_url.as_str(), GOOGLE_TOKEN_URL);
        assert_eq!(google.time_zone, "Europe/Madrid");
    }

    #[test]
    fn half_configured_channels_name_the_missing_variable() {
        for (pairs, var) in [
            (
                vec![("TWILIO_SMS_FROM", "+34600000000")],
                "TWILIO_ACCOUNT_SID",
            ),
            (
                vec![
                    ("TWILIO_ACCOUNT_SID", "AC1"),
                    ("TWILIO_SMS_FROM", "+34600000000"),
                ],
                "TWILIO_AUTH_TOKEN",
            ),
            (
                vec![
                    ("TWILIO_ACCOUNT_SID", "AC1"),
                    ("TWILIO_AUTH_TOKEN", "t"),
                    ("TWILIO_SMS_FROM", "600000000"),
                ],
                "TWILIO_SMS_FROM",
            ),
            (vec![("SENDGRID_API_KEY", "k")], "EMAIL_FROM"),
            (
                vec![("SMTP_HOST", "h"), ("SENDGRID_API_KEY", "k")],
                "EMAIL_TRANSPORT",
            ),
            (
                vec![
                    ("SMTP_HOST", "h.example.com"),
                    ("EMAIL_FROM", "a@b.es"),
                    ("SMTP_USERNAME", "u"),
                ],
                "SMTP_PASSWORD",
            ),
            (
                vec![("GOOGLE_CALENDAR_ID", "c")],
                "GOOGLE_SERVICE_ACCOUNT_FILE",
            ),
            (
                vec![("GOOGLE_SERVICE_ACCOUNT_JSON", "{\"private_key\": \"x\"}")],
                "GOOGLE_SERVICE_ACCOUNT_JSON",
            ),
            (
                vec![
                    ("SENDGRID_API_KEY", "k"),
                    ("EMAIL_FROM", "a@b.es"),
                    ("SENDGRID_BASE_URL", "ftp://x"),
                ],
                "SENDGRID_BASE_URL",
            ),
            (
                vec![("TWILIO_RATE_LIMIT_PER_SEC", "-1")],
                "TWILIO_RATE_LIMIT_PER_SEC",
            ),
        ] {
            let e = ChannelSettings::from_vars(&vars(&pairs), AppEnv::Development).unwrap_err();
            assert_eq!(e.var, var, "{pairs:?}: {e}");
        }
    }

    #[test]
    fn production_wants_https_and_smtp_encryption() {
        let base = [
            ("ALLOW_LOG_CHANNEL", "true"),
            ("SENDGRID_API_KEY", "k"),
            ("EMAIL_FROM", "a@b.es"),
            ("SENDGRID_BASE_URL", "http://127.0.0.1:9"),
        ];
        assert!(ChannelSettings::from_vars(&vars(&base), AppEnv::Development).is_ok());
        let e = ChannelSettings::from_vars(&vars(&base), AppEnv::Production).unwrap_err();
        assert_eq!(e.var, "SENDGRID_BASE_URL");
        let smtp = [
            ("ALLOW_LOG_CHANNEL", "true"),
            ("SMTP_HOST", "127.0.0.1"),
            ("SMTP_TLS", "none"),
            ("EMAIL_FROM", "a@b.es"),
        ];
        let e = ChannelSettings::from_vars(&vars(&smtp), AppEnv::Production).unwrap_err();
        assert_eq!(e.var, "SMTP_TLS");
    }

    #[test]
    fn credentials_do_not_show_in_debug_output() {
        let json = key_json();
        let s = ChannelSettings::from_vars(
            &vars(&[
                ("SENDGRID_API_KEY", "hunter2-sendgrid"),
                ("EMAIL_FROM", "a@b.es"),
                ("TWILIO_ACCOUNT_SID", "AC1"),
                ("TWILIO_API_KEY_SID", "SK1"),
                ("TWILIO_API_KEY_SECRET", "hunter2-twilio"),
                ("TWILIO_SMS_FROM", "+34600000000"),
                ("GOOGLE_SERVICE_ACCOUNT_JSON", &json),
                ("GOOGLE_CALENDAR_ID", "c"),
            ]),
            AppEnv::Development,
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert_eq!(s.sms.as_ref().unwrap().auth_user, "SK1");
    }
}
