//! Retention: the log's monthly partitions, archives written, verified offline, dropped and
//! restored into a scratch database, and finished tasks retired from the projection.

use crate::common;
use arnela::domain::TaskId;

use arnela::archive::{self, verify_files};
use arnela::domain::checkpoint::signing_key;
use arnela::domain::event::{canonical_bytes, event_hash, Placement, HASH_VERSION};
use arnela::store::retention::{self, Partition};
use arnela::store::{audit, checkpoints};
use chrono::{DateTime, TimeZone, Utc};
use common::{client, drop_role, get, pool_as, post, runtime_role, sms, tamper};
use serde_json::json;
use sqlx::PgPool;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

fn month(year: i32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, m, 1, 0, 0, 0).unwrap()
}

/// Appends event `sequence` of `task` as stored at `recorded_at` (in the month's partition),
/// chained to `prev`, with its hash computed as the service computes it. Returns its hash.
async fn append_at(
    pool: &PgPool,
    task: Uuid,
    sequence: i32,
    prev: Option<&[u8]>,
    recorded_at: DateTime<Utc>,
) -> Vec<u8> {
    // placed as the service places it: by the appending transaction's id
    let mut tx = pool.begin().await.unwrap();
    let position: i64 = sqlx::query_scalar("SELECT event_position(0)")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let data = json!({"attempt": sequence, "note": format!("event {sequence} of {task}")});
    let document = canonical_bytes(
        HASH_VERSION,
        task,
        sequence,
        "dispatched",
        1,
        &data,
        recorded_at,
    );
    let hash = event_hash(
        prev,
        &document,
        Some(Placement {
            position,
            recorded_at,
        }),
    )
    .to_vec();
    sqlx::query(
        "INSERT INTO task_events (position, task_id, sequence, event_type, event_version, data, \
           occurred_at, recorded_at, prev_hash, hash, hash_version, task_type) \
         VALUES ($1, $2, $3, 'dispatched', 1, $4, $5, $5, $6, $7, $8, 'send_sms')",
    )
    .bind(position)
    .bind(task)
    .bind(sequence)
    .bind(&data)
    .bind(recorded_at)
    .bind(prev)
    .bind(&hash)
    .bind(HASH_VERSION)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    hash
}

/// A finished task's head in `retired_tasks`, as retention leaves it.
async fn retire_head(pool: &PgPool, task: Uuid, version: i32, hash: &[u8]) {
    sqlx::query(
        "INSERT INTO retired_tasks (id, task_type, status, owner, attempts, max_attempts, \
           run_at, version, last_hash, created_at, updated_at) \
         VALUES ($1, 'send_sms', 'succeeded', '', 1, 3, now(), $2, $3, now(), now()) \
         ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
           last_hash = excluded.last_hash",
    )
    .bind(task)
    .bind(version)
    .bind(hash)
    .execute(pool)
    .await
    .unwrap();
}

async fn make_partition(pool: &PgPool, at: DateTime<Utc>) {
    sqlx::query("SELECT task_events_partition($1)")
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
}

async fn count_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM task_events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rewrites an archive's data file with `edit` applied to its uncompressed lines.
fn rewrite_data(file: &Path, edit: impl Fn(String) -> String) {
    let mut text = String::new();
    zstd::Decoder::new(std::fs::File::open(file).unwrap())
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let edited = edit(text);
    let mut out = zstd::Encoder::new(std::fs::File::create(file).unwrap(), 3).unwrap();
    out.write_all(edited.as_bytes()).unwrap();
    out.finish().unwrap();
}

#[sqlx::test]
async fn partitions_are_made_ahead_and_by_the_owner_only(pool: PgPool) {
    let now = Utc::now();
    let made: Vec<String> = retention::partitions(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    let mut wanted = Partition::of(now);
    for _ in 0..=retention::MONTHS_AHEAD {
        assert!(
            made.contains(&wanted.name),
            "{made:?} lacks {}",
            wanted.name
        );
        wanted = wanted.next();
    }
    // a pass half a year on makes the months it needs, once
    let later = now + chrono::Duration::days(200);
    let created = retention::ensure_partitions(&pool, later).await.unwrap();
    assert_eq!(created.len(), 3, "{created:?}");
    assert!(retention::ensure_partitions(&pool, later)
        .await
        .unwrap()
        .is_empty());

    // The runtime role may have the next months made, but reaches a partition only through
    // the log: it can neither read nor rewrite, truncate or drop one directly.
    let role = runtime_role(&pool).await;
    let runtime = pool_as(&pool, &role).await;
    let created = retention::ensure_partitions(&runtime, now + chrono::Duration::days(400))
        .await
        .unwrap();
    assert!(!created.is_empty());
    let c = client(runtime.clone()).await;
    let (status, _) = post(&c, "/tasks", &sms("hola")).await;
    assert_eq!(status, 201);
    let this_month = Partition::of(Utc::now()).name;
    for sql in [
        format!("SELECT * FROM {this_month}"),
        format!("DELETE FROM {this_month}"),
        format!("TRUNCATE {this_month}"),
        format!("DROP TABLE {this_month}"),
        format!("ALTER TABLE task_events DETACH PARTITION {this_month}"),
        "INSERT INTO task_event_anchors VALUES (gen_random_uuid(), 1, '\\x00', 'x')".into(),
        "DELETE FROM retired_tasks".into(),
    ] {
        let err = sqlx::query(&sql).execute(&runtime).await.unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    // even the owner cannot empty a partition (TRUNCATE is refused by trigger on each)
    let err = sqlx::query(&format!("TRUNCATE {this_month}"))
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    runtime.close().await;
    drop_role(&pool, &role).await;
}

/// Two old months of history: task A spans both (events 1–2 in May, 3 in June), B is all in
/// May, C all in June; a checkpoint after each month.
struct History {
    a: Uuid,
    b: Uuid,
    c: Uuid,
}

async fn two_old_months(pool: &PgPool, key: &ed25519_dalek::SigningKey) -> History {
    let (may, june) = (month(2026, 5), month(2026, 6));
    make_partition(pool, may).await;
    make_partition(pool, june).await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let at = |m: DateTime<Utc>, minutes: i64| m + chrono::Duration::minutes(minutes);
    let a1 = append_at(pool, a, 1, None, at(may, 1)).await;
    let a2 = append_at(pool, a, 2, Some(&a1), at(may, 2)).await;
    let b1 = append_at(pool, b, 1, None, at(may, 3)).await;
    let b2 = append_at(pool, b, 2, Some(&b1), at(may, 4)).await;
    retire_head(pool, a, 2, &a2).await;
    retire_head(pool, b, 2, &b2).await;
    checkpoint_until(pool, key, &[(a, 2), (b, 2)]).await;
    let a3 = append_at(pool, a, 3, Some(&a2), at(june, 1)).await;
    let c1 = append_at(pool, c, 1, None, at(june, 2)).await;
    retire_head(pool, a, 3, &a3).await;
    retire_head(pool, c, 1, &c1).await;
    checkpoint_until(pool, key, &[(a, 3), (c, 1)]).await;
    History { a, b, c }
}

/// Writes checkpoints until they record every head of `heads`: a checkpoint covers the log up
/// to its commit-safe horizon, which another test's transaction on this server may hold back
/// for a moment.
async fn checkpoint_until(pool: &PgPool, key: &ed25519_dalek::SigningKey, heads: &[(Uuid, i32)]) {
    let wanted: Vec<(Uuid, i32)> = heads.to_vec();
    common::eventually(std::time::Duration::from_secs(30), "checkpointed", || {
        let (pool, key, wanted) = (pool.clone(), key.clone(), wanted.clone());
        async move {
            checkpoints::write(&pool, &key).await.unwrap();
            let recorded: Vec<(Uuid, i32)> =
                sqlx::query_as("SELECT task_id, version FROM audit_checkpoint_heads")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            wanted.iter().all(|h| recorded.contains(h)).then_some(())
        }
    })
    .await;
}

fn files(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| archive::paths(dir, n).0).collect()
}

#[sqlx::test]
async fn archive_drop_verify_offline_and_restore(pool: PgPool) {
    let key = signing_key(&"22".repeat(32)).unwrap();
    let public = key.verifying_key().to_bytes();
    let history = two_old_months(&pool, &key).await;
    assert!(audit::verify(&pool, |_| {}).await.unwrap().ok());
    let dir = tempfile::tempdir().unwrap();

    // This month cannot be archived: it has not ended.
    let next = Partition::of(Utc::now()).ends_at;
    let err = archive::archive_before(
        &pool,
        next,
        dir.path(),
        &key,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("only ended months"), "{err}");

    let done = archive::archive_before(
        &pool,
        month(2026, 7),
        dir.path(),
        &key,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let summary: Vec<(&str, u64, u64, u64)> = done
        .iter()
        .map(|a| (a.partition.as_str(), a.events, a.tasks, a.anchors))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("task_events_p202605", 4, 2, 2),
            ("task_events_p202606", 2, 2, 2)
        ]
    );
    assert!(done.iter().all(|a| a.checkpoints >= 1), "{done:?}");
    // the partitions are gone, the log still verifies (chains end at their anchors), and so
    // do the checkpoints (their heads are archived, covered by anchors)
    let left: Vec<String> = retention::partitions(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(
        !left.iter().any(|n| n.as_str() <= "task_events_p202606"),
        "{left:?}"
    );
    assert_eq!(count_events(&pool).await, 0);
    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.tasks, 3);
    let cps = checkpoints::verify(&pool, Some(&public)).await.unwrap();
    assert!(cps.broken.is_empty(), "{cps:?}");
    // the history endpoint says where a history went
    let c = client(pool.clone()).await;
    let (status, body) = get(&c, &format!("/tasks/{}/events", history.b)).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.to_string().contains("archived (task_events_p202605)"),
        "{body}"
    );
    assert!(cps.archived_heads >= 4, "{cps:?}");

    // Offline: both archives together (A's June event links to its May one), June's alone
    // (A continues from an archive not given), through the CLI as well.
    let both = files(dir.path(), &["task_events_p202605", "task_events_p202606"]);
    let checks = verify_files(&both, Some(&public));
    assert!(checks.iter().all(|c| c.ok()), "{checks:?}");
    assert!(
        checks
            .iter()
            .all(|c| c.continued == 0 && c.heads_checked >= 2),
        "{checks:?}"
    );
    let june = verify_files(&both[1..], Some(&public));
    assert!(june[0].ok(), "{june:?}");
    assert_eq!(june[0].continued, 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["audit", "verify", "--archive"])
        .args(&both)
        .env("AUDIT_PUBLIC_KEY", hex::encode(public))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(
        text.contains("ok: ") && text.contains("4 events of 2 tasks"),
        "{text}"
    );
    let other = signing_key(&"33".repeat(32))
        .unwrap()
        .verifying_key()
        .to_bytes();
    assert!(
        !verify_files(&both, Some(&other))[0].ok(),
        "another key is not trusted"
    );

    // Not into the database that archived them, nor any with tasks of its own ...
    let err = archive::restore(&pool, &both, Some(&public))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("archived task_events_p202605 itself"),
        "{err}"
    );
    // ... but into a scratch database: its log verifies there.
    let scratch = format!("scratch_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {scratch}"))
        .execute(&pool)
        .await
        .unwrap();
    let options = pool.connect_options().as_ref().clone().database(&scratch);
    let restored_db = arnela::store::connect(options, 2).await.unwrap();
    arnela::store::migrate(&restored_db).await.unwrap();
    let (checks, inserted) = archive::restore(&restored_db, &both[1..], Some(&public))
        .await
        .unwrap();
    assert!(checks[0].ok());
    assert_eq!(inserted, 2, "June alone first");
    let (_, inserted) = archive::restore(&restored_db, &both, Some(&public))
        .await
        .unwrap();
    assert_eq!(inserted, 4, "then May; June's events are there already");
    let report = audit::verify(&restored_db, |_| {}).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.tasks, report.events), (3, 6));
    for id in [history.a, history.b, history.c] {
        assert!(audit::verify_task(&restored_db, TaskId::from(id))
            .await
            .unwrap()
            .unwrap()
            .ok());
    }
    restored_db.close().await;
    sqlx::query(&format!("DROP DATABASE {scratch} WITH (FORCE)"))
        .execute(&pool)
        .await
        .unwrap();

    // Tampering with an archive is found: an event's content, the manifest's counts (its
    // signature), a whole line removed.
    let copy = tempfile::tempdir().unwrap();
    let copy_of = |name: &str| {
        let (data, manifest) = archive::paths(dir.path(), name);
        let (d, m) = archive::paths(copy.path(), name);
        std::fs::copy(data, &d).unwrap();
        std::fs::copy(manifest, &m).unwrap();
        d
    };
    let may = copy_of("task_events_p202605");
    rewrite_data(&may, |t| t.replacen("event 1 of", "event one of", 1));
    let found = &verify_files(std::slice::from_ref(&may), Some(&public))[0].problems;
    assert!(
        found.iter().any(|p| p.contains("was altered"))
            && found.iter().any(|p| p.contains("data_sha256")),
        "{found:?}"
    );
    let may = copy_of("task_events_p202605");
    rewrite_data(&may, |t| {
        let lines: Vec<&str> = t.lines().collect();
        lines[..lines.len() - 1].join("\n") + "\n"
    });
    let found = &verify_files(std::slice::from_ref(&may), Some(&public))[0].problems;
    assert!(
        found.iter().any(|p| p.contains("events differs")),
        "{found:?}"
    );
    let may = copy_of("task_events_p202605");
    let (_, manifest) = archive::paths(copy.path(), "task_events_p202605");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"events\": 4", "\"events\": 3")).unwrap();
    let found = &verify_files(std::slice::from_ref(&may), Some(&public))[0].problems;
    assert!(
        found.iter().any(|p| p.contains("signature does not hold")),
        "{found:?}"
    );
}

#[sqlx::test]
async fn a_partition_that_does_not_verify_is_not_dropped(pool: PgPool) {
    let key = signing_key(&"44".repeat(32)).unwrap();
    let history = two_old_months(&pool, &key).await;
    tamper(
        &pool,
        "UPDATE task_events SET data = '{\"forged\": true}' WHERE task_id = $1 AND sequence = 1",
        history.b,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let err = archive::archive_before(
        &pool,
        month(2026, 6),
        dir.path(),
        &key,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("does not verify") && text.contains(&history.b.to_string()),
        "{text}"
    );
    assert_eq!(count_events(&pool).await, 6, "nothing was dropped");
    assert!(retention::partitions(&pool)
        .await
        .unwrap()
        .iter()
        .any(|p| p.name == "task_events_p202605"));
}

#[sqlx::test]
async fn finished_tasks_are_retired_and_still_read_verify_and_erase(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, t) = post(&c, "/tasks", &sms(&format!("cita {i}"))).await;
        assert_eq!(status, 201, "{t}");
        ids.push(t["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    // two finish (cancelled); the third still waits and must stay
    for id in &ids[..2] {
        let (status, body) = post(&c, &format!("/tasks/{id}/cancel"), &json!(null)).await;
        assert_eq!(status, 200, "{body}");
    }
    let maintenance = arnela::maintenance::Maintenance {
        pool: pool.clone(),
        retention: Some(chrono::Duration::days(30)),
        interval: std::time::Duration::from_secs(3600),
    };
    let pass = maintenance.run_once(Utc::now()).await.unwrap();
    assert_eq!(pass.tasks_retired, 0, "nothing is 30 days old");
    let pass = maintenance
        .run_once(Utc::now() + chrono::Duration::days(31))
        .await
        .unwrap();
    assert_eq!(pass.tasks_retired, 2);
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tasks")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec![ids[2]]);

    // still readable (without its payload), still verifying
    let (status, view) = get(&c, &format!("/tasks/{}", ids[0])).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(
        (view["status"].as_str(), view["payload"].as_str()),
        (Some("cancelled"), Some("[retired]"))
    );
    assert!(audit::verify(&pool, |_| {}).await.unwrap().ok());

    // erasable: the erased event chains onto the retired head, and the log verifies
    let (status, erased) = post(&c, &format!("/tasks/{}/erase", ids[0]), &json!(null)).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["payload"], json!("[erased]"));
    let (status, again) = post(&c, &format!("/tasks/{}/erase", ids[0]), &json!(null)).await;
    assert_eq!(status, 200, "idempotent: {again}");
    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert!(report.ok(), "{report:?}");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM task_data_keys WHERE task_id = $1")
        .bind(ids[0])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(keys, 0);

    // a retired task's tail removed is still found (its head is kept)
    tamper(
        &pool,
        "DELETE FROM task_events WHERE task_id = $1 \
           AND sequence = (SELECT max(sequence) FROM task_events WHERE task_id = $1)",
        ids[1],
    )
    .await;
    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert_eq!(report.broken.len(), 1, "{report:?}");
    assert_eq!(report.broken[0].task_id, TaskId::from(ids[1]));
    assert!(
        report.broken[0].reason.contains("events were removed"),
        "{report:?}"
    );
}

#[sqlx::test]
async fn the_archive_commands_run_as_the_owner_only(pool: PgPool) {
    let seed = "55".repeat(32);
    let key = signing_key(&seed).unwrap();
    two_old_months(&pool, &key).await;
    let role = runtime_role(&pool).await;
    // the service's own URL, as the runtime role
    let url = common::database_url(&pool).replacen("postgres@", &format!("{role}@"), 1);
    let dir = tempfile::tempdir().unwrap();
    let archive = |owner: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"));
        cmd.args(["audit", "archive", "--before", "2026-06", "--dir"])
            .arg(dir.path())
            .env("DATABASE_URL", &url)
            .env("AUDIT_SIGNING_KEY", &seed);
        if let Some(owner) = owner {
            cmd.env("DB_MIGRATION_USER", owner);
        }
        cmd.output().unwrap()
    };
    let refused = archive(None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let done = archive(Some("postgres"));
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        text.contains("archived task_events_p202605: 4 events of 2 tasks"),
        "{text}"
    );
    assert!(!text.contains("p202606"), "June is kept: {text}");
    assert_eq!(count_events(&pool).await, 2);
    assert!(audit::verify(&pool, |_| {}).await.unwrap().ok());
    drop_role(&pool, &role).await;
}
