//! Access control: every operation but the probes needs a valid bearer token (401 otherwise,
//! whatever is wrong with it) and a role it allows (403 otherwise); the probes and the documents
//! need none; tokens never show in responses or logs; `arnela token` signs what the API accepts.

use crate::common;

use arnela::api::auth::{Auth, Claims, Role};
use arnela::domain::TaskType;
use common::{sms, JWT_SECRET};
use poem::http::Method;
use poem::test::TestClient;
use poem::Endpoint;
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// One operation with a request it would accept.
struct Op {
    method: Method,
    path: String,
    body: Option<Value>,
    allowed: &'static [Role],
    /// Its answer to an allowed role (404 where the request names no task on purpose).
    ok: u16,
}

impl Op {
    fn new(method: Method, path: impl Into<String>, allowed: &'static [Role], ok: u16) -> Op {
        Op {
            method,
            path: path.into(),
            body: None,
            allowed,
            ok,
        }
    }

    fn body(mut self, body: Value) -> Op {
        self.body = Some(body);
        self
    }

    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Every operation but the probes, against tasks of the test's database.
fn operations(task: Uuid, to_cancel: Uuid) -> Vec<Op> {
    use Role::{Admin, Auditor, Producer};
    let missing = Uuid::new_v4();
    vec![
        Op::new(Method::POST, "/tasks", &[Producer, Admin], 201).body(sms("hola")),
        Op::new(Method::POST, "/tasks/batch", &[Producer, Admin], 201)
            .body(json!({"tasks": [sms("uno"), sms("dos")]})),
        Op::new(
            Method::GET,
            format!("/tasks/{task}"),
            &[Producer, Auditor, Admin],
            200,
        ),
        Op::new(Method::GET, "/tasks", &[Auditor, Admin], 200),
        Op::new(
            Method::GET,
            format!("/tasks/{task}/events"),
            &[Auditor, Admin],
            200,
        ),
        Op::new(Method::GET, "/events", &[Auditor, Admin], 200),
        Op::new(
            Method::POST,
            format!("/tasks/{missing}/retry"),
            &[Admin],
            404,
        ),
        Op::new(
            Method::POST,
            format!("/tasks/{to_cancel}/cancel"),
            &[Admin],
            200,
        ),
        Op::new(
            Method::POST,
            format!("/tasks/{missing}/erase"),
            &[Admin],
            404,
        ),
        Op::new(Method::GET, "/stats", &[Auditor, Admin], 200),
        Op::new(
            Method::GET,
            format!("/tasks/{task}/verify"),
            &[Auditor, Admin],
            200,
        ),
        Op::new(
            Method::GET,
            format!("/audit/verify/{task}"),
            &[Auditor, Admin],
            200,
        ),
        Op::new(Method::GET, "/audit/checkpoints", &[Auditor, Admin], 200),
        Op::new(Method::GET, "/whoami", &[Producer, Auditor, Admin], 200),
        Op::new(Method::GET, "/task-types", &[Auditor, Admin], 200),
        Op::new(
            Method::POST,
            "/task-types/send_whatsapp/pause",
            &[Admin],
            200,
        ),
        Op::new(
            Method::POST,
            "/task-types/send_whatsapp/resume",
            &[Admin],
            200,
        ),
        Op::new(Method::POST, "/dead-letters/retry", &[Admin], 200).body(json!({"dry_run": true})),
        Op::new(Method::POST, "/dead-letters/cancel", &[Admin], 200).body(json!({"dry_run": true})),
        Op::new(Method::POST, "/schedules", &[Admin], 201).body(json!({
            "name": "reminders", "cron": "0 9 * * *", "time_zone": "Europe/Madrid",
            "type": "send_sms", "payload": {"phone": "+34600000000", "message": "cita"},
        })),
        Op::new(Method::GET, "/schedules", &[Auditor, Admin], 200),
        Op::new(
            Method::GET,
            format!("/schedules/{missing}"),
            &[Auditor, Admin],
            404,
        ),
        Op::new(
            Method::PATCH,
            format!("/schedules/{missing}"),
            &[Admin],
            404,
        )
        .body(json!({"name": "renamed"})),
        Op::new(
            Method::DELETE,
            format!("/schedules/{missing}"),
            &[Admin],
            404,
        ),
        Op::new(
            Method::POST,
            format!("/schedules/{missing}/pause"),
            &[Admin],
            404,
        ),
        Op::new(
            Method::POST,
            format!("/schedules/{missing}/resume"),
            &[Admin],
            404,
        ),
        Op::new(
            Method::GET,
            format!("/schedules/{missing}/events"),
            &[Auditor, Admin],
            404,
        ),
        Op::new(Method::GET, "/health", &[Auditor, Admin], 200),
        Op::new(Method::GET, "/metrics", &[Auditor, Admin], 200),
    ]
}

/// The spec's path template of a concrete path used above.
fn template(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if Uuid::parse_str(seg).is_ok() {
                "{id}"
            } else if seg.parse::<arnela::domain::TaskType>().is_ok() {
                "{task_type}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
        // the one operation whose id parameter has another name
        .replace("/audit/verify/{id}", "/audit/verify/{task_id}")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The second part of a JWT: its claims, as signed.
fn claims_part(token: &str) -> &str {
    token.split('.').nth(1).expect("a JWT has three parts")
}

/// `Authorization` header values that must all be refused with 401, by name.
fn refused_headers() -> Vec<(&'static str, Option<String>)> {
    let admin = common::token(Role::Admin);
    let expired = common::auth().sign(&Claims {
        sub: "late".into(),
        role: Role::Admin,
        iat: now() - 7200,
        exp: now() - 60,
        nbf: None,
        iss: "arnela".into(),
        aud: "arnela-api".into(),
        patterns: false,
        tenant: None,
    });
    let other_secret = Auth::new(&SecretString::from("a-different-secret-of-32-characters!!"))
        .unwrap()
        .mint(Role::Admin, Duration::from_secs(3600), "mallory");
    // {"alg":"none","typ":"JWT"}, the claims of a real admin token, no signature.
    let alg_none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        claims_part(&admin)
    );
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap();
    let hs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let no_exp = jsonwebtoken::encode(
        &hs256,
        &json!({"sub": "forever", "role": "admin", "iat": now()}),
        &key,
    )
    .unwrap();
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "x", "role": "admin", "iat": now(), "exp": now() + 3600}),
        &key,
    )
    .unwrap();
    let unknown_role = jsonwebtoken::encode(
        &hs256,
        &json!({"sub": "x", "role": "root", "iat": now(), "exp": now() + 3600}),
        &key,
    )
    .unwrap();
    let claims = |extra: Value| {
        let mut c = json!({"sub": "x", "role": "admin", "iat": now(), "exp": now() + 3600,
                           "iss": "arnela", "aud": "arnela-api"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        jsonwebtoken::encode(&hs256, &c, &key).unwrap()
    };
    let no_iss_aud = claims(json!({"iss": null, "aud": null}));
    let other_audience = claims(json!({"aud": "billing-api"}));
    let other_issuer = claims(json!({"iss": "someone-else"}));
    let not_yet = claims(json!({"nbf": now() + 3600}));
    let long_admin = claims(json!({"exp": now() + 30 * 86_400}));
    // issued a month ahead: its lifetime would run far past the admin cap from now
    let future_iat = claims(json!({"iat": now() + 30 * 86_400, "exp": now() + 30 * 86_400 + 3600}));
    let no_subject = claims(json!({"sub": ""}));
    let mut unknown_kid_header = hs256.clone();
    unknown_kid_header.kid = Some("0123456789abcdef".into());
    let unknown_kid = jsonwebtoken::encode(
        &unknown_kid_header,
        &json!({"sub": "x", "role": "admin", "iat": now(), "exp": now() + 3600,
                "iss": "arnela", "aud": "arnela-api"}),
        &key,
    )
    .unwrap();
    let bearer = |t: &str| Some(format!("Bearer {t}"));
    vec![
        ("token without iss and aud", bearer(&no_iss_aud)),
        ("token for another audience", bearer(&other_audience)),
        ("token of another issuer", bearer(&other_issuer)),
        ("token not yet valid (nbf)", bearer(&not_yet)),
        ("admin token living 30 days", bearer(&long_admin)),
        ("token issued in the future", bearer(&future_iat)),
        ("token with an empty subject", bearer(&no_subject)),
        ("token naming an unknown key", bearer(&unknown_kid)),
        ("no token", None),
        ("expired token", bearer(&expired)),
        ("token signed with another secret", bearer(&other_secret)),
        ("alg none token", bearer(&alg_none)),
        ("token without exp", bearer(&no_exp)),
        ("HS512 token", bearer(&hs512)),
        ("token with an unknown role", bearer(&unknown_role)),
        ("Bearer with garbage", bearer("not.a.jwt")),
        ("Bearer with nothing", Some("Bearer".into())),
        ("Basic credentials", Some("Basic YWRtaW46YWRtaW4=".into())),
        ("a bare token without Bearer", Some(admin)),
    ]
}

/// Sends `op` with the given `Authorization` header; returns status, `WWW-Authenticate` and the
/// body as text.
async fn send<E: Endpoint>(
    c: &TestClient<E>,
    op: &Op,
    authorization: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut req = c.request(op.method.clone(), &op.path);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    if let Some(b) = &op.body {
        req = req.body_json(b);
    }
    let resp = req.send().await.0;
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().into_string().await.unwrap();
    (status, challenge, body)
}

fn code(body: &str) -> Option<String> {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
}

/// The API without a default token.
async fn bare_client(pool: PgPool) -> TestClient<impl Endpoint> {
    TestClient::new(arnela::api::endpoint(common::context(pool).await))
}

#[sqlx::test]
async fn every_operation_refuses_a_missing_or_invalid_token_and_a_role_it_does_not_allow(
    pool: PgPool,
) {
    let ids = common::enqueue_tasks(&pool, TaskType::SendSms, 2, 3).await;
    let c = bare_client(pool).await;
    let ops = operations(ids[0].into(), ids[1].into());
    let refused = refused_headers();

    for op in &ops {
        let name = op.name();
        for (case, header) in &refused {
            let (status, challenge, body) = send(&c, op, header.as_deref()).await;
            assert_eq!(status, 401, "{name}, {case}: {body}");
            assert_eq!(
                code(&body).as_deref(),
                Some("unauthorized"),
                "{name}, {case}: {body}"
            );
            assert!(
                challenge
                    .as_deref()
                    .is_some_and(|c| c.starts_with("Bearer")),
                "{name}, {case}: WWW-Authenticate is {challenge:?}"
            );
            if let Some(h) = header {
                let token = h.strip_prefix("Bearer ").unwrap_or(h);
                assert!(
                    token.len() < 8 || !body.contains(token),
                    "{name}, {case}: the body repeats the token: {body}"
                );
            }
        }
        for role in Role::ALL.into_iter().filter(|r| !op.allowed.contains(r)) {
            let (status, _, body) = send(&c, op, Some(&common::bearer(role))).await;
            assert_eq!(status, 403, "{name}, wrong role {role}: {body}");
            assert_eq!(
                code(&body).as_deref(),
                Some("forbidden"),
                "{name}, wrong role {role}: {body}"
            );
            // the body names the roles that may call it, as the spec's Role enum
            let roles: Value = serde_json::from_str::<Value>(&body).unwrap()["roles"].clone();
            let expected: Vec<&str> = op
                .allowed
                .iter()
                .map(|r| r.as_str())
                .chain((!op.allowed.contains(&Role::Admin)).then_some("admin"))
                .collect();
            assert_eq!(roles, json!(expected), "{name}, wrong role {role}: {body}");
        }
    }
    // Last, as they change state (the cancel must not have happened before).
    for op in &ops {
        for &role in op.allowed {
            let (status, _, body) = send(&c, op, Some(&common::bearer(role))).await;
            assert_eq!(status, op.ok, "{}, right role {role}: {body}", op.name());
        }
    }
}

#[test]
fn the_table_covers_every_operation_of_the_spec() {
    let ops = operations(Uuid::new_v4(), Uuid::new_v4());
    let spec: Value = serde_json::from_str(&arnela::api::spec_json()).unwrap();
    let scheme = &spec["components"]["securitySchemes"]["BearerAuth"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"], &scheme["bearerFormat"]),
        (&json!("http"), &json!("bearer"), &json!("JWT")),
        "{scheme}"
    );
    let mut open = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let name = format!("{} {path}", method.to_uppercase());
            let secured = operation["security"] == json!([{"BearerAuth": []}]);
            if !secured {
                open.push(name);
                continue;
            }
            assert!(
                ops.iter()
                    .any(|op| op.method.as_str().eq_ignore_ascii_case(method)
                        && template(&op.path) == *path),
                "{name} is not in the access-control table of this test"
            );
            assert!(
                operation["responses"].get("401").is_some(),
                "{name} does not document 401"
            );
            let op = ops
                .iter()
                .find(|op| {
                    op.method.as_str().eq_ignore_ascii_case(method) && template(&op.path) == *path
                })
                .unwrap();
            assert_eq!(
                operation["responses"].get("403").is_some(),
                op.allowed.len() < Role::ALL.len(),
                "{name} documents 403 if and only if some role may not call it"
            );
        }
    }
    open.sort();
    assert_eq!(open, ["GET /health/live", "GET /health/ready"]);
}

#[sqlx::test]
async fn the_probes_and_the_documents_answer_without_a_token(pool: PgPool) {
    let c = bare_client(pool).await;
    for path in ["/health/live", "/health/ready", "/openapi.json", "/docs"] {
        let resp = c.get(path).send().await;
        assert_eq!(resp.0.status().as_u16(), 200, "GET {path}");
    }
}

#[sqlx::test]
async fn operator_actions_record_the_token_subject(pool: PgPool) {
    let id = common::enqueue_tasks(&pool, TaskType::SendSms, 1, 3).await[0];
    let token = common::auth().mint(Role::Admin, Duration::from_secs(60), "ana.garcia");
    let c = TestClient::new(arnela::api::endpoint(common::context(pool).await))
        .default_header("authorization", format!("Bearer {token}"));
    let (status, body) = common::post(&c, &format!("/tasks/{id}/cancel"), &json!(null)).await;
    assert_eq!(status, 200, "{body}");
    let (_, events) = common::get(&c, &format!("/tasks/{id}/events")).await;
    let cancelled = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "cancelled")
        .expect("a cancelled event");
    assert_eq!(cancelled["data"]["by"], "ana.garcia", "{cancelled}");
}

#[sqlx::test]
async fn tokens_do_not_appear_in_the_logs(pool: PgPool) {
    let c = bare_client(pool).await;
    let (logs, _guard) = common::logs::capture();
    let valid = common::token(Role::Auditor);
    let forged = Auth::new(&SecretString::from("a-different-secret-of-32-characters!!"))
        .unwrap()
        .mint(Role::Admin, Duration::from_secs(60), "mallory");
    for token in [&valid, &forged] {
        let op = Op::new(Method::GET, "/tasks", &[], 0);
        send(&c, &op, Some(&format!("Bearer {token}"))).await;
    }
    let text = logs.text();
    assert!(!text.is_empty(), "nothing was captured");
    for token in [&valid, &forged] {
        assert!(!text.contains(token.as_str()), "a token is logged:\n{text}");
        assert!(
            !text.contains(token.rsplit('.').next().unwrap()),
            "a token's signature is logged:\n{text}"
        );
    }
}

fn arnela_token(args: &[&str], secret: Option<&str>) -> std::process::Output {
    // An empty directory (no .env) and an environment without any database or Redis setting.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"));
    cmd.arg("token")
        .args(args)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DB_HOST", "unreachable.invalid")
        .env("REDIS_HOST", "unreachable.invalid");
    if let Some(s) = secret {
        cmd.env("JWT_SECRET", s);
    }
    cmd.output().expect("the arnela binary runs")
}

#[test]
fn arnela_token_prints_a_token_the_api_accepts_with_its_role() {
    let out = arnela_token(
        &["--role", "auditor", "--ttl", "30m", "--subject", "ana"],
        Some(JWT_SECRET),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = common::auth().verify(token.trim()).expect("it verifies");
    assert_eq!((claims.role, claims.sub.as_str()), (Role::Auditor, "ana"));
    assert_eq!(claims.exp - claims.iat, 1800);
}

#[test]
fn arnela_token_refuses_a_bad_lifetime_role_or_a_missing_secret() {
    let cases: [(&[&str], Option<&str>, &str); 5] = [
        (
            &["--role", "admin", "--ttl", "0s"],
            Some(JWT_SECRET),
            "more than zero",
        ),
        (&["--role", "admin", "--ttl=-5m"], Some(JWT_SECRET), "--ttl"),
        (
            &["--role", "admin", "--ttl=soon"],
            Some(JWT_SECRET),
            "--ttl",
        ),
        (
            &["--role", "root", "--ttl", "1h"],
            Some(JWT_SECRET),
            "not a role",
        ),
        (&["--role", "admin", "--ttl", "1h"], None, "JWT_SECRET"),
    ];
    for (args, secret, says) in cases {
        let out = arnela_token(args, secret);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed a token");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Sends `method path` with `token` and returns the status and the JSON body.
async fn as_token<E: Endpoint>(
    c: &TestClient<E>,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = c
        .request(method, path)
        .header("authorization", format!("Bearer {token}"));
    if let Some(b) = body {
        req = req.body_json(b);
    }
    let resp = req.send().await;
    let status = resp.0.status().as_u16();
    (
        status,
        resp.0.into_body().into_json().await.unwrap_or(Value::Null),
    )
}

/// Tasks belong to the enqueuing token's tenant (else its subject): a producer reads and
/// deduplicates only its tenant's tasks, and another tenant's task looks exactly like a missing
/// one; auditors and admins read all.
#[sqlx::test]
async fn producers_see_and_deduplicate_only_their_own_tasks(pool: PgPool) {
    let c = TestClient::new(arnela::api::endpoint(common::context(pool.clone()).await));
    let hour = Duration::from_secs(3600);
    let auth = common::auth();
    let a = auth.mint_for(Role::Producer, hour, "agenda-1", Some("clinic-a"));
    let a2 = auth.mint_for(Role::Producer, hour, "agenda-2", Some("clinic-a"));
    let b = auth.mint_for(Role::Producer, hour, "mallory", None);
    let auditor = common::token(Role::Auditor);
    let with_key = |message: &str| {
        let mut body = sms(message);
        body["idempotency_key"] = json!("appointment-7-reminder");
        body
    };

    let (status, task_a) = as_token(&c, Method::POST, "/tasks", &a, Some(&with_key("hola"))).await;
    assert_eq!(status, 201, "{task_a}");
    assert_eq!(task_a["owner"], "clinic-a");
    let id_a = task_a["id"].as_str().unwrap().to_owned();
    // read once by its owner, so the next reads may come from the cache
    let path = format!("/tasks/{id_a}");
    assert_eq!(as_token(&c, Method::GET, &path, &a, None).await.0, 200);

    // Another tenant's same key is its own: no conflict, no hint of the other task.
    let (status, task_b) = as_token(&c, Method::POST, "/tasks", &b, Some(&with_key("spam"))).await;
    assert_eq!(status, 201, "{task_b}");
    assert_ne!(task_b["id"], task_a["id"]);
    assert_eq!(task_b["owner"], "mallory");
    let (status, err) = as_token(&c, Method::GET, &path, &b, None).await;
    let missing = format!("/tasks/{}", Uuid::new_v4());
    let (_, err_missing) = as_token(&c, Method::GET, &missing, &b, None).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["code"], err_missing["code"]);
    assert!(!err.to_string().contains("+34"), "{err}");
    let (status, _) = as_token(&c, Method::GET, &format!("{path}?x=1"), &b, None).await;
    assert_eq!(status, 404);

    // The same tenant under another subject shares the tasks and the keys.
    assert_eq!(as_token(&c, Method::GET, &path, &a2, None).await.0, 200);
    let (status, err) = as_token(&c, Method::POST, "/tasks", &a2, Some(&with_key("otro"))).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let (status, again) = as_token(&c, Method::POST, "/tasks", &a2, Some(&with_key("hola"))).await;
    assert_eq!((status, again["id"].as_str()), (200, Some(id_a.as_str())));

    // Auditors read every tenant's task.
    let (status, seen) = as_token(&c, Method::GET, &path, &auditor, None).await;
    assert_eq!((status, seen["owner"].as_str()), (200, Some("clinic-a")));
    let history = format!("{path}/events");
    let (status, events) = as_token(&c, Method::GET, &history, &auditor, None).await;
    assert_eq!(status, 200);
    assert_eq!(events[0]["data"]["owner"], "clinic-a");
}

/// A secret is rotated without downtime: tokens of the previous secret (named by their `kid`)
/// are accepted while the new one signs; once the previous secret is dropped they are refused.
/// A token whose `nbf` has passed is accepted; the 401 body never says why a token was refused.
#[sqlx::test]
async fn secrets_rotate_and_refusals_say_nothing_of_why(pool: PgPool) {
    let old = SecretString::from("the-old-secret-of-at-least-32-characters");
    let new = SecretString::from("the-new-secret-of-at-least-32-characters");
    let hour = Duration::from_secs(3600);
    let old_token = Auth::new(&old).unwrap().mint(Role::Auditor, hour, "ana");
    let rolling = Auth::rotating(&new, std::slice::from_ref(&old)).unwrap();
    let new_token = rolling.mint(Role::Auditor, hour, "ana");

    let mut ctx = common::context(pool.clone()).await;
    ctx.auth = rolling;
    let c = TestClient::new(arnela::api::endpoint(ctx));
    assert_eq!(
        as_token(&c, Method::GET, "/stats", &old_token, None)
            .await
            .0,
        200
    );
    assert_eq!(
        as_token(&c, Method::GET, "/stats", &new_token, None)
            .await
            .0,
        200
    );

    let mut ctx = common::context(pool.clone()).await;
    ctx.auth = Auth::new(&new).unwrap();
    let c = TestClient::new(arnela::api::endpoint(ctx));
    assert_eq!(
        as_token(&c, Method::GET, "/stats", &new_token, None)
            .await
            .0,
        200
    );
    let (status, body) = as_token(&c, Method::GET, "/stats", &old_token, None).await;
    assert_eq!(status, 401, "{body}");

    let started = Auth::new(&new).unwrap().sign(&Claims {
        sub: "ana".into(),
        role: Role::Auditor,
        iat: now() - 60,
        exp: now() + 3600,
        nbf: Some(now() - 30),
        iss: "arnela".into(),
        aud: "arnela-api".into(),
        patterns: false,
        tenant: None,
    });
    assert_eq!(
        as_token(&c, Method::GET, "/stats", &started, None).await.0,
        200
    );

    let expired = Auth::new(&new).unwrap().sign(&Claims {
        sub: "ana".into(),
        role: Role::Auditor,
        iat: now() - 7200,
        exp: now() - 3600,
        nbf: None,
        iss: "arnela".into(),
        aud: "arnela-api".into(),
        patterns: false,
        tenant: None,
    });
    let (status, refused) = as_token(&c, Method::GET, "/stats", &expired, None).await;
    assert_eq!(status, 401);
    assert_eq!(refused, body, "every refused token gets the same body");
    assert!(!refused.to_string().contains("has expired"), "{refused}");
}

/// `arnela token` refuses a lifetime longer than the role allows.
#[test]
fn the_token_command_caps_the_lifetime_per_role() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["token", "--role", "admin", "--ttl", "30d"])
        .env("JWT_SECRET", JWT_SECRET)
        .env("APP_ENV", "development")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 7 days"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["token", "--role", "producer", "--ttl", "300d"])
        .env("JWT_SECRET", JWT_SECRET)
        .env("APP_ENV", "development")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
