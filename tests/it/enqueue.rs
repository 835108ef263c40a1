//! The enqueue path: atomic writes, idempotency, validation, batches.

use crate::common;

use common::{client, counts, post, sms};
use serde_json::{json, Value};
use sqlx::PgPool;

/// A client over a seeded namespace (its enqueues publish), with that namespace's keys and a
/// connection to its Redis.
async fn seeded_client(
    pool: &PgPool,
) -> (
    poem::test::TestClient<impl poem::Endpoint>,
    arnela::queue::Keys,
    arnela::queue::RedisConn,
) {
    let ctx = common::context(pool.clone()).await;
    common::seed(&ctx).await;
    let (keys, redis) = (ctx.keys.clone(), ctx.redis.clone());
    (common::client_for(ctx), keys, redis)
}

/// How many deliveries wait on the namespace's queue.
async fn queue_depth(redis: &arnela::queue::RedisConn, keys: &arnela::queue::Keys) -> i64 {
    redis::cmd("LLEN")
        .arg(keys.tasks())
        .query_async(&mut redis.clone())
        .await
        .unwrap()
}

#[sqlx::test]
async fn enqueue_writes_event_projection_and_outbox_together(pool: PgPool) {
    let (c, keys, mut redis) = seeded_client(&pool).await;
    let (status, task) = post(&c, "/tasks", &sms("hola")).await;
    assert_eq!(status, 201, "{task}");
    assert_eq!(task["status"], "queued");
    assert_eq!(task["attempts"], 0);
    assert_eq!(task["max_attempts"], 3);
    // a task due now is dispatched by its own enqueue: two events, one row, one outbox row
    assert_eq!(counts(&pool).await, (1, 2, 1));

    let id: uuid::Uuid = task["id"].as_str().unwrap().parse().unwrap();
    let events: Vec<(String, i32)> = sqlx::query_as(
        "SELECT event_type, sequence FROM task_events WHERE task_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        events,
        [("enqueued".to_owned(), 1), ("dispatched".to_owned(), 2)]
    );
    let (attempt, published): (i32, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT attempt, published_at FROM outbox WHERE task_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempt, 1);
    assert!(published.is_some(), "the row is written published");
    // ... and the delivery is in Redis when the answer arrives, in the list and the transit set
    let queued: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.tasks())
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    let delivery = arnela::queue::Delivery {
        task_id: id.into(),
        attempt: 1,
        task_type: "send_sms".into(),
    }
    .encode();
    assert_eq!(queued, std::slice::from_ref(&delivery));
    let in_transit: bool = redis::cmd("SISMEMBER")
        .arg(keys.transit())
        .arg(&delivery)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(in_transit);
    // the second event is chained and hashed like any other
    let report = arnela::store::audit::verify_task(&pool, id.into())
        .await
        .unwrap()
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.events, 2);
    let version: i32 = sqlx::query_scalar("SELECT version FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, 2);
}

/// A key replayed on a seeded namespace returns the existing task and publishes nothing more:
/// one delivery, one `dispatched` event.
#[sqlx::test]
async fn a_replayed_key_publishes_nothing_more(pool: PgPool) {
    let (c, keys, redis) = seeded_client(&pool).await;
    let mut keyed = sms("once");
    keyed["idempotency_key"] = json!("k");
    assert_eq!(post(&c, "/tasks", &keyed).await.0, 201);
    assert_eq!(post(&c, "/tasks", &keyed).await.0, 200);
    let (status, result) = post(&c, "/tasks/batch", &json!({"tasks": [keyed, keyed]})).await;
    assert_eq!(
        (status, result["created"].as_u64()),
        (200, Some(0)),
        "{result}"
    );
    assert_eq!(counts(&pool).await, (1, 2, 1));
    assert_eq!(queue_depth(&redis, &keys).await, 1);
}

/// What the enqueue does not publish itself, the relays do: a task scheduled later, a task of a
/// paused type. Their rows are written unpublished, with the `enqueued` event alone.
#[sqlx::test]
async fn scheduled_and_paused_tasks_are_left_to_the_relays(pool: PgPool) {
    let (c, keys, redis) = seeded_client(&pool).await;
    let mut later = sms("later");
    later["run_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let mut email = json!({"type": "send_email", "payload": {"to": "a@example.com", "subject": "s", "body": "b"}});
    assert_eq!(
        post(&c, "/task-types/send_email/pause", &json!({})).await.0,
        200
    );
    email["idempotency_key"] = json!("paused");
    let (status, result) = post(
        &c,
        "/tasks/batch",
        &json!({"tasks": [later, email, sms("now")]}),
    )
    .await;
    assert_eq!(status, 201, "{result}");
    let rows: Vec<(uuid::Uuid, bool, i64)> = sqlx::query_as(
        "SELECT o.task_id, o.published_at IS NOT NULL, \
                (SELECT count(*) FROM task_events e WHERE e.task_id = o.task_id) \
         FROM outbox o ORDER BY o.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ids: Vec<uuid::Uuid> = result["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        rows,
        [(ids[0], false, 1), (ids[1], false, 1), (ids[2], true, 2)]
    );
    assert_eq!(queue_depth(&redis, &keys).await, 1);
}

/// A namespace this process may not use (here bound to another database) is left alone: the
/// enqueue succeeds, its rows stay unpublished for the relays (which refuse the namespace too,
/// loudly), and the metric counts them.
#[sqlx::test]
async fn an_enqueue_on_a_namespace_of_another_database_leaves_its_deliveries_to_the_relays(
    pool: PgPool,
) {
    let ctx = common::context(pool.clone()).await;
    let keys = ctx.keys.clone();
    let metrics = ctx.metrics.clone();
    let mut redis = ctx.redis.clone();
    let _: () = redis::cmd("SET")
        .arg(keys.database())
        .arg(r#"{"system_identifier":"1","database":"elsewhere"}"#)
        .query_async(&mut redis)
        .await
        .unwrap();
    let c = common::client_for(ctx);
    let (status, task) = post(&c, "/tasks", &sms("hola")).await;
    assert_eq!(status, 201, "{task}");
    assert_eq!(counts(&pool).await, (1, 1, 1));
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(published, 0);
    assert_eq!(queue_depth(&redis, &keys).await, 0);
    let text = metrics.scrape(arnela::metrics::Format::Prometheus).await;
    assert!(
        text.contains(
            "arnela_enqueue_deliveries_left_to_relays_total{reason=\"namespace_unavailable\"} 1"
        ),
        "{text}"
    );
}

/// A push that fails after the commit (Redis stopped between the check and the push) gives the
/// rows back to the relays: the task exists, its delivery is unpublished, none is lost.
#[sqlx::test]
async fn a_failed_push_gives_the_deliveries_back_to_the_relays(pool: PgPool) {
    use common::process::{connect_when_up, free_port, redis_server};
    let port = free_port();
    let mut own = redis_server(port);
    let redis = connect_when_up(port).await;
    let ctx = common::context_with(
        pool.clone(),
        redis,
        arnela::queue::Keys::new(common::unique_prefix()),
    );
    common::seed(&ctx).await;
    let metrics = ctx.metrics.clone();
    let c = common::client_for(ctx);
    // the first enqueue verifies the namespace (trusted for a second) and publishes
    let (status, one) = post(&c, "/tasks", &sms("one")).await;
    assert_eq!(status, 201, "{one}");
    own.kill9();
    let (status, two) = post(&c, "/tasks", &sms("two")).await;
    assert_eq!(status, 201, "{two}");
    let rows: Vec<(uuid::Uuid, bool)> =
        sqlx::query_as("SELECT task_id, published_at IS NOT NULL FROM outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let id = |t: &Value| -> uuid::Uuid { t["id"].as_str().unwrap().parse().unwrap() };
    assert_eq!(rows, [(id(&one), true), (id(&two), false)]);
    // the push failed (or, on a machine slow enough that the second request came more than a
    // second after the first, the re-check of the namespace did): either way, counted once
    let text = metrics.scrape(arnela::metrics::Format::Prometheus).await;
    let count = |reason: &str| {
        text.contains(&format!(
            "arnela_enqueue_deliveries_left_to_relays_total{{reason=\"{reason}\"}} 1\n"
        ))
    };
    assert!(
        count("push_failed") != count("namespace_unavailable"),
        "{text}"
    );
}

/// A failure injected in the middle of the enqueue (a trigger that refuses the outbox row, or
/// the event row) leaves none of the three rows behind.
#[sqlx::test]
async fn a_failure_between_the_writes_leaves_nothing(pool: PgPool) {
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let c = client(pool.clone()).await;
    for table in ["outbox", "task_events"] {
        sqlx::query(&format!(
            "CREATE TRIGGER injected BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse()"
        ))
        .execute(&pool)
        .await
        .unwrap();
        let (status, body) = post(&c, "/tasks", &sms("hola")).await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["code"], "internal");
        assert!(
            !body.to_string().contains("injected"),
            "the cause of a 500 is logged, not returned: {body}"
        );
        assert_eq!(counts(&pool).await, (0, 0, 0), "after a failure in {table}");
        sqlx::query(&format!("DROP TRIGGER injected ON {table}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let (status, _) = post(&c, "/tasks", &sms("hola")).await;
    assert_eq!(status, 201);
    assert_eq!(counts(&pool).await, (1, 1, 1));
}

#[sqlx::test]
async fn twenty_concurrent_requests_with_one_key_create_one_task(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut body = sms("recordatorio");
    body["idempotency_key"] = json!("appointment-42-reminder");
    let results = futures::future::join_all((0..20).map(|_| post(&c, "/tasks", &body))).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let existing = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, existing), (1, 19), "{results:?}");
    let ids: std::collections::HashSet<&str> = results
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(counts(&pool).await, (1, 1, 1));
}

#[sqlx::test]
async fn concurrent_requests_on_separate_connections_create_one_task(pool: PgPool) {
    // The same race across independent pools, as two API processes would see it.
    let mut body = sms("hola");
    body["idempotency_key"] = json!("k-cross-process");
    let opts = pool.connect_options().as_ref().clone();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let opts = opts.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            let own = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .unwrap();
            let c = client(own).await;
            post(&c, "/tasks", &body).await.0
        }));
    }
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 201]);
    assert_eq!(counts(&pool).await, (1, 1, 1));
}

#[sqlx::test]
async fn a_reused_key_with_a_different_request_is_a_conflict(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut first = sms("hola");
    first["idempotency_key"] = json!("k1");
    assert_eq!(post(&c, "/tasks", &first).await.0, 201);
    let mut other = sms("adiós");
    other["idempotency_key"] = json!("k1");
    let (status, body) = post(&c, "/tasks", &other).await;
    assert_eq!(status, 409);
    assert_eq!(body["code"], "idempotency_conflict");
    assert_eq!(body["field"], "idempotency_key");
    assert_eq!(counts(&pool).await, (1, 1, 1));
}

/// Every kind of bad input: its status, its code, the field it names, and nothing written.
#[sqlx::test]
async fn bad_input_gets_a_clear_error_and_writes_nothing(pool: PgPool) {
    let c = client(pool.clone()).await;
    let long_sms = "x".repeat(1601);
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            json!({"type": "send_fax", "payload": {}}),
            422,
            "validation_failed",
            Some("type"),
        ),
        (
            json!({"type": "send_email", "payload": {"subject": "s", "body": "b"}}),
            422,
            "validation_failed",
            Some("payload.to"),
        ),
        (
            json!({"type": "send_email", "payload": {"to": "nobody", "subject": "s", "body": "b"}}),
            422,
            "validation_failed",
            Some("payload.to"),
        ),
        (
            json!({"type": "send_email", "payload": {"to": "a@b.es", "subject": "s"}}),
            422,
            "validation_failed",
            Some("payload.body"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "612345678", "message": "m"}}),
            422,
            "validation_failed",
            Some("payload.phone"),
        ),
        (
            json!({"type": "send_whatsapp", "payload": {"phone": "+34123456789"}}),
            422,
            "validation_failed",
            Some("payload.message"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": long_sms}}),
            422,
            "validation_failed",
            Some("payload.message"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m", "cc": 1}}),
            422,
            "validation_failed",
            Some("payload.cc"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "a\u{0}b"}}),
            422,
            "validation_failed",
            Some("payload.message"),
        ),
        (
            json!({"type": "sync_calendar", "payload": {"event_id": "e1", "action": "move", "appointment_data": {}}}),
            422,
            "validation_failed",
            Some("payload.action"),
        ),
        (
            json!({"type": "sync_calendar", "payload": {"event_id": "e1", "action": "create"}}),
            422,
            "validation_failed",
            Some("payload.appointment_data"),
        ),
        (
            json!({"type": "send_sms", "payload": "text"}),
            422,
            "validation_failed",
            Some("payload"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "max_attempts": 0}),
            422,
            "validation_failed",
            Some("max_attempts"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "max_attempts": 26}),
            422,
            "validation_failed",
            Some("max_attempts"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "run_at": "tomorrow"}),
            422,
            "validation_failed",
            Some("run_at"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "run_at": "2999-01-01T00:00:00Z"}),
            422,
            "validation_failed",
            Some("run_at"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "idempotency_key": ""}),
            422,
            "validation_failed",
            Some("idempotency_key"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "idempotency_key": "a\u{0}"}),
            422,
            "validation_failed",
            Some("idempotency_key"),
        ),
        (
            json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "m"}, "surprise": true}),
            400,
            "malformed_request",
            None,
        ),
        (
            json!({"type": 7, "payload": {}}),
            422,
            "validation_failed",
            Some("type"),
        ),
        (json!({"payload": {}}), 400, "malformed_request", None),
        (json!([1, 2]), 400, "malformed_request", None),
    ];
    for (body, status, code, field) in cases {
        let (got, err) = post(&c, "/tasks", &body).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert_eq!(err["code"], code, "{body} -> {err}");
        assert_eq!(err["field"].as_str(), field, "{body} -> {err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }

    // Malformed JSON, a wrong content type, an oversized body.
    let raw =
        |body: &'static str, ct: &'static str| c.post("/tasks").content_type(ct).body(body).send();
    let resp = raw("{\"type\": \"send_sms\",", "application/json").await;
    assert_eq!(resp.0.status().as_u16(), 400);
    let err: Value = resp.0.into_body().into_json().await.unwrap();
    assert_eq!(err["code"], "malformed_request");
    let resp = raw("type=send_sms", "application/x-www-form-urlencoded").await;
    assert!(resp.0.status().is_client_error());
    let err: Value = resp.0.into_body().into_json().await.unwrap();
    assert!(err["code"].is_string());
    let huge = json!({"type": "send_email", "payload": {"to": "a@b.es", "subject": "s", "body": "x".repeat(2 * 1024 * 1024)}});
    let resp = c
        .post("/tasks")
        .content_type("application/json")
        .header("content-length", (huge.to_string().len()).to_string())
        .body(huge.to_string())
        .send()
        .await;
    assert_eq!(resp.0.status().as_u16(), 413);
    let err: Value = resp.0.into_body().into_json().await.unwrap();
    assert_eq!(err["code"], "payload_too_large");

    assert_eq!(counts(&pool).await, (0, 0, 0));
}

/// A `run_at` in the past (year 1, or a keyed request retried long after it was built) counts as
/// now: it cannot jump ahead of the tasks already waiting, and the retry finds its task.
#[sqlx::test]
async fn a_run_at_in_the_past_counts_as_now(pool: PgPool) {
    let c = client(pool.clone()).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut body = sms("m");
    body["run_at"] = json!("0001-01-01T00:00:00Z");
    body["idempotency_key"] = json!("appointment-9-reminder");
    let (status, task) = post(&c, "/tasks", &body).await;
    assert_eq!(status, 201, "{task}");
    let run_at: chrono::DateTime<chrono::Utc> = task["run_at"].as_str().unwrap().parse().unwrap();
    assert!(run_at >= before, "{run_at}");
    body["run_at"] = json!((chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339());
    let (status, again) = post(&c, "/tasks", &body).await;
    assert_eq!((status, &again["id"]), (200, &task["id"]), "{again}");
}

#[sqlx::test]
async fn each_task_type_is_accepted_with_its_payload(pool: PgPool) {
    let c = client(pool.clone()).await;
    // two days ahead, given in Madrid's winter offset, whole seconds
    let at =
        chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + 2 * 86_400, 0).unwrap();
    let madrid = chrono::FixedOffset::east_opt(3600).unwrap();
    let run_at = at
        .with_timezone(&madrid)
        .format("%Y-%m-%dT%H:%M:%S+01:00")
        .to_string();
    let bodies = [
        json!({"type": "send_email", "payload": {"to": "ana@clinic.es", "subject": "Confirmación de cita", "body": "<p>Su cita…</p>"}}),
        json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": "Texto del SMS"}}),
        json!({"type": "send_whatsapp", "payload": {"phone": "+34123456789", "message": "Mensaje"}, "max_attempts": 5}),
        json!({"type": "sync_calendar", "payload": {"event_id": "123", "action": "create", "appointment_data": {"starts_at": "2030-12-01T10:00:00+01:00"}}, "run_at": run_at}),
    ];
    for body in bodies {
        let (status, task) = post(&c, "/tasks", &body).await;
        assert_eq!(status, 201, "{task}");
        assert_eq!(task["type"], body["type"]);
        assert_eq!(task["payload"], body["payload"]);
    }
    let (_, task) = post(&c, "/tasks", &json!({"type": "sync_calendar", "payload": {"event_id": "9", "action": "delete"}, "run_at": run_at})).await;
    assert_eq!(
        task["run_at"],
        at.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    );
    assert_eq!(counts(&pool).await, (5, 5, 5));
}

#[sqlx::test]
async fn a_batch_is_all_or_nothing(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut tasks: Vec<Value> = (0..5).map(|i| sms(&format!("m{i}"))).collect();
    tasks[3]["payload"]["phone"] = json!("bad");
    let (status, err) = post(&c, "/tasks/batch", &json!({"tasks": tasks})).await;
    assert_eq!(status, 422);
    assert_eq!(err["field"], "tasks[3].payload.phone");
    assert_eq!(counts(&pool).await, (0, 0, 0));

    // A conflicting idempotency key in the middle fails the whole batch too.
    let mut held = sms("held");
    held["idempotency_key"] = json!("held");
    assert_eq!(post(&c, "/tasks", &held).await.0, 201);
    let mut tasks: Vec<Value> = (0..5).map(|i| sms(&format!("m{i}"))).collect();
    tasks[2]["idempotency_key"] = json!("held");
    let (status, err) = post(&c, "/tasks/batch", &json!({"tasks": tasks})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    assert_eq!(counts(&pool).await, (1, 1, 1));

    for n in [0usize, 1001] {
        let tasks: Vec<Value> = (0..n).map(|i| sms(&format!("m{i}"))).collect();
        let (status, err) = post(&c, "/tasks/batch", &json!({"tasks": tasks})).await;
        assert_eq!((status, err["field"].as_str()), (422, Some("tasks")));
    }
    assert_eq!(counts(&pool).await, (1, 1, 1));
}

#[sqlx::test]
async fn a_batch_of_a_thousand_is_written_in_order(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut tasks: Vec<Value> = (0..1000).map(|i| sms(&format!("m{i}"))).collect();
    // a key repeated within the batch and one already held both return the existing task
    let mut held = sms("held");
    held["idempotency_key"] = json!("held");
    let (_, held_task) = post(&c, "/tasks", &held).await;
    tasks[10] = held.clone();
    tasks[20]["idempotency_key"] = json!("twice");
    tasks[21] = tasks[20].clone();
    let (status, result) = post(&c, "/tasks/batch", &json!({"tasks": tasks})).await;
    assert_eq!(status, 201);
    assert_eq!(
        (result["created"].as_u64(), result["existing"].as_u64()),
        (Some(998), Some(2))
    );
    let out = result["tasks"].as_array().unwrap();
    assert_eq!(out.len(), 1000);
    assert_eq!(out[10]["id"], held_task["id"]);
    assert_eq!(out[20]["id"], out[21]["id"]);
    assert_eq!(out[999]["payload"]["message"], "m999");
    assert_eq!(counts(&pool).await, (999, 999, 999));

    // the outbox serves them in request order
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT task_id FROM outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let expected: Vec<uuid::Uuid> =
        std::iter::once(held_task["id"].as_str().unwrap().parse().unwrap())
            .chain(
                out.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 10 && *i != 21)
                    .map(|(_, t)| t["id"].as_str().unwrap().parse().unwrap()),
            )
            .collect();
    assert_eq!(ids, expected);

    // the same batch again creates nothing
    let mut again: Vec<Value> = vec![held];
    again.push(tasks[20].clone());
    let (status, result) = post(&c, "/tasks/batch", &json!({"tasks": again})).await;
    assert_eq!((status, result["created"].as_u64()), (200, Some(0)));
}

/// A task the enqueue leaves to the relays (here one scheduled a second ahead) wakes them once
/// it has committed; one it published itself does not.
#[sqlx::test]
async fn an_enqueue_wakes_the_relays_after_it_commits(pool: PgPool) {
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(arnela::relay::CHANNEL).await.unwrap();
    let ctx = common::context(pool.clone()).await;
    common::seed(&ctx).await;
    let c = common::client_for(ctx);
    let mut soon = sms("hola");
    soon["run_at"] = json!((chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339());
    assert_eq!(post(&c, "/tasks", &soon).await.0, 201);
    let note = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap();
    assert_eq!(note.channel(), arnela::relay::CHANNEL);
    // by the time the relays hear it, the task is committed
    assert_eq!(counts(&pool).await, (1, 1, 1));

    assert_eq!(post(&c, "/tasks", &sms("now")).await.0, 201);
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
    assert!(quiet.is_err(), "a published task wakes no relay");
}

mod limits {
    //! What holds before an operation runs: the token is checked before the body is read, a
    //! body must arrive in time and within the size limit, and requests beyond the in-flight
    //! limit are refused at once (the probes excepted).

    use super::common;
    use arnela::api::auth::Role;
    use arnela::api::limits::HttpLimits;
    use poem::test::TestClient;
    use poem::Body;
    use sqlx::PgPool;
    use std::time::Duration;

    /// A chunked body that sends `first` and then nothing, ever.
    fn stalled(first: &'static str) -> Body {
        let chunks =
            futures::stream::once(async move { Ok::<_, std::io::Error>(first.as_bytes()) })
                .chain(futures::stream::pending());
        Body::from_bytes_stream(chunks)
    }

    use futures::StreamExt;

    async fn client_with(pool: PgPool, limits: HttpLimits) -> TestClient<impl poem::Endpoint> {
        let mut ctx = common::context(pool).await;
        ctx.limits = limits;
        TestClient::new(arnela::api::endpoint(ctx))
    }

    #[sqlx::test]
    async fn the_token_is_checked_before_the_body_is_read(pool: PgPool) {
        let c = client_with(
            pool,
            HttpLimits::new(64, 64, 1 << 20, Duration::from_secs(60)),
        )
        .await;
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            c.post("/tasks")
                .content_type("application/json")
                .body(stalled("{\"type\": \"send_sms\", "))
                .send(),
        )
        .await
        .expect("answered without waiting for the body");
        assert_eq!(resp.0.status().as_u16(), 401);
    }

    #[sqlx::test]
    async fn a_body_that_does_not_arrive_in_time_is_a_408(pool: PgPool) {
        let limits = HttpLimits::new(64, 64, 1 << 20, Duration::from_millis(300));
        let c = client_with(pool.clone(), limits.clone()).await;
        let resp = c
            .post("/tasks")
            .header("authorization", common::bearer(Role::Producer))
            .content_type("application/json")
            .body(stalled("{\"type\": \"send_sms\", "))
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 408);
        let err: serde_json::Value = resp.0.into_body().into_json().await.unwrap();
        assert_eq!(err["code"], "request_timeout");
        assert_eq!(common::counts(&pool).await, (0, 0, 0));
    }

    #[sqlx::test]
    async fn a_chunked_body_over_the_limit_is_a_413_without_being_kept(pool: PgPool) {
        let c = client_with(
            pool.clone(),
            HttpLimits::new(64, 64, 4096, Duration::from_secs(30)),
        )
        .await;
        // 1 MiB in 1 KiB chunks, no Content-Length: refused once 4 KiB have passed
        let chunks =
            futures::stream::iter((0..1024).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
        let resp = c
            .post("/tasks/batch")
            .header("authorization", common::bearer(Role::Producer))
            .content_type("application/json")
            .body(Body::from_bytes_stream(chunks))
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 413);
        let err: serde_json::Value = resp.0.into_body().into_json().await.unwrap();
        assert_eq!(err["code"], "payload_too_large");
        assert_eq!(common::counts(&pool).await, (0, 0, 0));
    }

    #[sqlx::test]
    async fn requests_beyond_the_in_flight_limit_are_refused_at_once(pool: PgPool) {
        let limits = HttpLimits::new(64, 1, 1 << 20, Duration::from_secs(60));
        let c = std::sync::Arc::new(client_with(pool, limits.clone()).await);
        // one request holds the only slot while its body never arrives
        let holder = {
            let c = c.clone();
            tokio::spawn(async move {
                c.post("/tasks")
                    .header("authorization", common::bearer(Role::Producer))
                    .content_type("application/json")
                    .body(stalled("{"))
                    .send()
                    .await
                    .0
                    .status()
            })
        };
        common::eventually(Duration::from_secs(5), "the slot is taken", || {
            let limits = limits.clone();
            async move { (limits.in_flight() == 1).then_some(()) }
        })
        .await;
        let resp = c
            .get("/stats")
            .header("authorization", common::bearer(Role::Auditor))
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 503);
        assert!(resp.0.headers().contains_key("retry-after"));
        let err: serde_json::Value = resp.0.into_body().into_json().await.unwrap();
        assert_eq!(err["code"], "overloaded");
        // the probes still answer
        assert_eq!(c.get("/health/live").send().await.0.status().as_u16(), 200);
        holder.abort();
        common::eventually(Duration::from_secs(5), "the slot is free again", || {
            let limits = limits.clone();
            async move { (limits.in_flight() == 0).then_some(()) }
        })
        .await;
        let resp = c
            .get("/stats")
            .header("authorization", common::bearer(Role::Auditor))
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 200);
    }

    /// The bodies of all requests together hold at most the budget: a body that would pass it
    /// is refused with 503, and the budget is back once the requests end.
    #[sqlx::test]
    async fn request_bodies_together_stay_within_the_budget(pool: PgPool) {
        let limits =
            HttpLimits::with_body_budget(64, 64, 64 * 1024, Duration::from_secs(60), 96 * 1024);
        let c = std::sync::Arc::new(client_with(pool, limits.clone()).await);
        // one request holds 64 KiB of the 96 KiB budget while the rest of its body never comes
        let holder = {
            let c = c.clone();
            tokio::spawn(async move {
                let first =
                    futures::stream::once(async { Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]) })
                        .chain(futures::stream::pending());
                c.post("/tasks")
                    .header("authorization", common::bearer(Role::Producer))
                    .content_type("application/json")
                    .body(Body::from_bytes_stream(first))
                    .send()
                    .await
                    .0
                    .status()
            })
        };
        common::eventually(Duration::from_secs(5), "the first body is held", || {
            let limits = limits.clone();
            async move { (limits.body_bytes_held() >= 64 * 1024).then_some(()) }
        })
        .await;
        let second = vec![b' '; 48 * 1024];
        let resp = c
            .post("/tasks")
            .header("authorization", common::bearer(Role::Producer))
            .content_type("application/json")
            .body(second.clone())
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 503);
        let err: serde_json::Value = resp.0.into_body().into_json().await.unwrap();
        assert_eq!(err["code"], "overloaded");
        holder.abort();
        common::eventually(Duration::from_secs(5), "the budget is back", || {
            let limits = limits.clone();
            async move { (limits.body_bytes_held() == 0).then_some(()) }
        })
        .await;
        let resp = c
            .post("/tasks")
            .header("authorization", common::bearer(Role::Producer))
            .content_type("application/json")
            .body(second)
            .send()
            .await;
        assert_eq!(
            resp.0.status().as_u16(),
            400,
            "read (and refused as not JSON), not 503"
        );
    }

    /// The budget counts bytes, not chunks: a body sent a byte at a time spends no more of it.
    #[sqlx::test]
    async fn tiny_chunks_spend_the_budget_by_their_bytes(pool: PgPool) {
        let limits =
            HttpLimits::with_body_budget(64, 64, 64 * 1024, Duration::from_secs(60), 16 * 1024);
        let c = client_with(pool.clone(), limits.clone()).await;
        let body = common::sms("hola").to_string().into_bytes();
        let chunks = futures::stream::iter(
            body.into_iter()
                .map(|b| Ok::<_, std::io::Error>(vec![b]))
                .collect::<Vec<_>>(),
        );
        let resp = c
            .post("/tasks")
            .header("authorization", common::bearer(Role::Producer))
            .content_type("application/json")
            .body(Body::from_bytes_stream(chunks))
            .send()
            .await;
        assert_eq!(resp.0.status().as_u16(), 201);
        assert_eq!(limits.body_bytes_held(), 0);
    }

    /// The connection limit, on a real listener: with two connections open a third is not
    /// served until one closes.
    #[sqlx::test]
    async fn connections_beyond_the_limit_wait_for_one_to_close(pool: PgPool) {
        use poem::listener::{Acceptor, Listener, TcpListener};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = HttpLimits::new(2, 64, 1 << 20, Duration::from_secs(30));
        let mut ctx = common::context(pool).await;
        ctx.limits = limits.clone();
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .unwrap();
        let addr = acceptor.local_addr()[0].as_socket_addr().copied().unwrap();
        let acceptor = arnela::api::limits::LimitedAcceptor::new(acceptor, limits.clone());
        let server =
            tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(arnela::api::endpoint(ctx)));
        const PROBE: &[u8] = b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n";
        let ask = |mut s: tokio::net::TcpStream| async move {
            s.write_all(PROBE).await.unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.unwrap();
            (s, String::from_utf8_lossy(&buf).into_owned())
        };
        let (a, answer) = ask(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!(answer, "HTTP/1.1 200");
        let (b, _) = ask(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!(limits.open_connections(), 2);
        let third = tokio::spawn(async move {
            ask(tokio::net::TcpStream::connect(addr).await.unwrap())
                .await
                .1
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!third.is_finished(), "a third connection was served");
        drop(a);
        let answer = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("served once a connection closed")
            .unwrap();
        assert_eq!(answer, "HTTP/1.1 200");
        drop(b);
        server.abort();
    }
}
