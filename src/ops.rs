//! `arnela tasks …`: the operator console's operations for terminals and scripts. It talks to a
//! running service over its HTTP API with a bearer token, so the API's roles apply unchanged
//! (an auditor's token lists and shows, and is refused every action). Tables for people by
//! default, JSON with `--json` (one document per command; `tail` prints one event per line).

use anyhow::{bail, Context};
use chrono::{DateTime, Local, Utc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

use crate::api::auth::parse_ttl;
use crate::domain::{TaskStatus, TaskType};

/// Where the service is and who is asking.
#[derive(Debug, Args)]
pub struct Target {
    /// The service's base URL.
    #[arg(
        long,
        env = "ARNELA_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// A bearer token (`arnela token`): auditor to read, admin to act.
    #[arg(long, env = "ARNELA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Which dead letters a bulk action takes.
#[derive(Debug, Args)]
pub struct DeadFilterArgs {
    /// Only this task type.
    #[arg(long = "type")]
    pub task_type: Option<TaskType>,
    /// Only dead letters whose reason contains this text (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Dead-lettered since: RFC 3339, or an age such as 30m, 12h or 7d.
    #[arg(long, value_parser = parse_when)]
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before: RFC 3339, or an age such as 30m, 12h or 7d.
    #[arg(long, value_parser = parse_when)]
    pub until: Option<DateTime<Utc>>,
    /// Act; without it only the matching dead letters are counted.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks, oldest first (filters as `GET /tasks`).
    List {
        #[arg(long = "type")]
        task_type: Option<TaskType>,
        #[arg(long)]
        status: Option<TaskStatus>,
        /// Created since: RFC 3339, or an age such as 30m, 12h or 7d.
        #[arg(long, value_parser = parse_when)]
        since: Option<DateTime<Utc>>,
        /// Created before: RFC 3339, or an age such as 30m, 12h or 7d.
        #[arg(long, value_parser = parse_when)]
        until: Option<DateTime<Utc>>,
        /// Only the task with this idempotency key.
        #[arg(long)]
        key: Option<String>,
        /// At most this many tasks (pages of up to 500 are read).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A task's state, its timeline (every event) and its hash chain's verdict.
    Show { id: Uuid },
    /// Requeue a dead task.
    Retry {
        id: Uuid,
        /// New attempts to allow (default 3).
        #[arg(long)]
        attempts: Option<i32>,
    },
    /// Cancel a waiting or running task, or discard a dead one.
    Cancel {
        id: Uuid,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Requeue every dead letter matching the filter (counts only, unless --yes).
    RetryDead(DeadFilterArgs),
    /// Discard every dead letter matching the filter (counts only, unless --yes).
    CancelDead(DeadFilterArgs),
    /// Task types and whether each is paused.
    Types,
    /// Pause a task type: its tasks stay queued until it is resumed.
    Pause { task_type: TaskType },
    /// Resume a paused task type.
    Resume { task_type: TaskType },
    /// Follow the global event log (from the start, or after a position).
    Tail {
        /// Start after this log position (default: the end of the log, only new events).
        #[arg(long)]
        after: Option<i64>,
        /// Stop after printing this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Seconds between polls once caught up.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

/// `30m`, `12h`, `7d` ago, or an RFC 3339 time.
fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = parse_ttl(s).map_err(|e| format!("{e}; or give an RFC 3339 time"))?;
    Ok(Utc::now() - chrono::Duration::from_std(age).map_err(|e| e.to_string())?)
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the service at {}", self.url))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the answer")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["message"].as_str().unwrap_or("no message");
            let code = value["code"].as_str().unwrap_or("error");
            bail!(
                "the service answered {}: {code}: {message}",
                status.as_u16()
            );
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(Method::POST, path, body).await
    }
}

/// Runs one `arnela tasks` command.
pub async fn run(target: Target, command: TasksCommand) -> anyhow::Result<()> {
    let token = target
        .token
        .context("no token: pass --token or set ARNELA_TOKEN (see `arnela token`)")?;
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?,
        url: target.url.trim_end_matches('/').to_owned(),
        token,
    };
    let json_out = target.json;
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match command {
        TasksCommand::List {
            task_type,
            status,
            since,
            until,
            key,
            limit,
        } => {
            let mut query = Vec::new();
            if let Some(t) = task_type {
                query.push(("type", t.as_str().to_owned()));
            }
            if let Some(s) = status {
                query.push(("status", s.as_str().to_owned()));
            }
            if let Some(t) = since {
                query.push(("created_from", t.to_rfc3339()));
            }
            if let Some(t) = until {
                query.push(("created_to", t.to_rfc3339()));
            }
            if let Some(k) = key {
                query.push(("idempotency_key", k));
            }
            let items = list(&client, query, limit).await?;
            if json_out {
                print(&Value::Array(items));
            } else {
                let rows = items.iter().map(|t| {
                    vec![
                        text(&t["id"]),
                        text(&t["type"]),
                        text(&t["status"]),
                        format!("{}/{}", t["attempts"], t["max_attempts"]),
                        when(&t["created_at"]),
                        text(&t["last_error"]),
                    ]
                });
                table(
                    &["ID", "TYPE", "STATUS", "ATTEMPTS", "CREATED", "LAST ERROR"],
                    rows,
                );
                eprintln!("{} task(s)", items.len());
            }
        }
        TasksCommand::Show { id } => {
            let task = client.get(&format!("/tasks/{id}")).await?;
            let events = client.get(&format!("/tasks/{id}/events")).await?;
            let verdict = client.get(&format!("/tasks/{id}/verify")).await?;
            if json_out {
                print(&json!({"task": task, "events": events, "chain": verdict}));
            } else {
                for (k, v) in [
                    ("id", text(&task["id"])),
                    ("type", text(&task["type"])),
                    ("status", text(&task["status"])),
                    (
                        "attempts",
                        format!("{}/{}", task["attempts"], task["max_attempts"]),
                    ),
                    ("owner", text(&task["owner"])),
                    ("created", when(&task["created_at"])),
                    ("updated", when(&task["updated_at"])),
                    ("last error", text(&task["last_error"])),
                ] {
                    println!("{k:>10}  {v}");
                }
                println!();
                let rows = events.as_array().into_iter().flatten().map(|e| {
                    vec![
                        e["sequence"].to_string(),
                        text(&e["type"]),
                        when(&e["occurred_at"]),
                        details(&e["type"], &e["data"]),
                    ]
                });
                table(&["#", "EVENT", "AT", "DETAILS"], rows);
                println!();
                if verdict["ok"].as_bool() == Some(true) {
                    println!("hash chain intact ({} events)", verdict["events"]);
                } else {
                    println!("hash chain BROKEN: {}", text(&verdict["problem"]));
                }
            }
        }
        TasksCommand::Retry { id, attempts } => {
            let path = match attempts {
                Some(n) => format!("/tasks/{id}/retry?attempts={n}"),
                None => format!("/tasks/{id}/retry"),
            };
            let task = client.post(&path, None).await?;
            report_task(&task, json_out, "requeued");
        }
        TasksCommand::Cancel { id, reason } => {
            let mut url = reqwest::Url::parse(&format!("http://x/tasks/{id}/cancel"))?;
            if let Some(r) = reason {
                url.query_pairs_mut().append_pair("reason", &r);
            }
            let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
            let task = client.post(&path, None).await?;
            report_task(&task, json_out, "cancelled");
        }
        TasksCommand::RetryDead(f) => bulk(&client, "/dead-letters/retry", f, json_out).await?,
        TasksCommand::CancelDead(f) => bulk(&client, "/dead-letters/cancel", f, json_out).await?,
        TasksCommand::Types => {
            let types = client.get("/task-types").await?;
            if json_out {
                print(&types);
            } else {
                let rows = types["types"].as_array().into_iter().flatten().map(|t| {
                    let paused = t["paused"].as_bool() == Some(true);
                    vec![
                        text(&t["type"]),
                        if paused { "paused" } else { "active" }.to_owned(),
                        when(&t["paused_at"]),
                        text(&t["paused_by"]),
                    ]
                });
                table(&["TYPE", "STATE", "SINCE", "BY"], rows);
            }
        }
        TasksCommand::Pause { task_type } => {
            let state = client
                .post(&format!("/task-types/{}/pause", task_type.as_str()), None)
                .await?;
            report_type(&state, json_out);
        }
        TasksCommand::Resume { task_type } => {
            let state = client
                .post(&format!("/task-types/{}/resume", task_type.as_str()), None)
                .await?;
            report_type(&state, json_out);
        }
        TasksCommand::Tail {
            after,
            count,
            interval,
        } => tail(&client, after, count, interval, json_out).await?,
    }
    Ok(())
}

/// Reads pages of `GET /tasks` until `limit` tasks or the last page.
async fn list(
    client: &Client,
    query: Vec<(&str, String)>,
    limit: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut after: Option<i64> = None;
    while items.len() < limit {
        let page_size = (limit - items.len()).min(500);
        let mut url = reqwest::Url::parse("http://x/tasks")?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &query {
                q.append_pair(k, v);
            }
            q.append_pair("limit", &page_size.to_string());
            if let Some(a) = after {
                q.append_pair("after", &a.to_string());
            }
        }
        let page = client
            .get(&format!("/tasks?{}", url.query().unwrap_or_default()))
            .await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_after"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(items)
}

/// A bulk dead-letter action: counts first; acts only with `--yes`.
async fn bulk(
    client: &Client,
    path: &str,
    f: DeadFilterArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut body = json!({"dry_run": !f.yes});
    if let Some(t) = f.task_type {
        body["type"] = json!(t.as_str());
    }
    if let Some(r) = &f.reason {
        body["reason"] = json!(r);
    }
    if let Some(t) = f.since {
        body["failed_from"] = json!(t.to_rfc3339());
    }
    if let Some(t) = f.until {
        body["failed_to"] = json!(t.to_rfc3339());
    }
    let outcome = client.post(path, Some(body)).await?;
    if json_out {
        println!("{outcome}");
    } else if f.yes {
        println!(
            "{} dead letter(s) matched, {} changed",
            outcome["matched"], outcome["changed"]
        );
    } else {
        println!(
            "{} dead letter(s) match; nothing changed (run again with --yes to act)",
            outcome["matched"]
        );
    }
    Ok(())
}

/// Follows `GET /events`: from `after`, or from the end of the log.
async fn tail(
    client: &Client,
    after: Option<i64>,
    count: Option<usize>,
    interval: f64,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut after = match after {
        Some(a) => a,
        None => {
            // the end of the log: page through it without printing
            let mut a = 0;
            loop {
                let page = client.get(&format!("/events?after={a}&limit=1000")).await?;
                let next = page["next_after"].as_i64().unwrap_or(a);
                let n = page["events"].as_array().map_or(0, Vec::len);
                a = next;
                if n < 1000 {
                    break a;
                }
            }
        }
    };
    let mut printed = 0usize;
    let pause = Duration::from_secs_f64(interval.clamp(0.05, 3600.0));
    loop {
        let page = client
            .get(&format!("/events?after={after}&limit=1000"))
            .await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            if json_out {
                println!("{e}");
            } else {
                println!(
                    "{:>20}  {}  {}  {:<18} {}",
                    e["position"],
                    when(&e["recorded_at"]),
                    text(&e["task_id"]),
                    text(&e["type"]),
                    details(&e["type"], &e["data"])
                );
            }
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        after = page["next_after"].as_i64().unwrap_or(after);
        if events.len() < 1000 {
            tokio::time::sleep(pause).await;
        }
    }
}

fn report_task(task: &Value, json_out: bool, what: &str) {
    if json_out {
        println!("{task}");
    } else {
        println!(
            "{} {what}: status {}, attempts {}/{}",
            text(&task["id"]),
            text(&task["status"]),
            task["attempts"],
            task["max_attempts"]
        );
    }
}

fn report_type(state: &Value, json_out: bool) {
    if json_out {
        println!("{state}");
    } else if state["paused"].as_bool() == Some(true) {
        println!(
            "{}: paused since {} by {}",
            text(&state["type"]),
            when(&state["paused_at"]),
            text(&state["paused_by"])
        );
    } else {
        println!("{}: active", text(&state["type"]));
    }
}

/// A string field, or `-` when absent.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A time in this machine's time zone.
fn when(v: &Value) -> String {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map_or_else(
            || text(v),
            |t| {
                t.with_timezone(&Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            },
        )
}

/// The telling fields of an event's data, in one line.
fn details(event_type: &Value, data: &Value) -> String {
    let field = |k: &str| data.get(k).filter(|v| !v.is_null()).map(text);
    let parts: Vec<Option<String>> = match event_type.as_str().unwrap_or_default() {
        "attempt_succeeded" => vec![
            field("attempt").map(|a| format!("attempt {a}")),
            field("duration_ms").map(|d| format!("{d} ms")),
        ],
        "attempt_failed" => vec![
            field("attempt").map(|a| format!("attempt {a}")),
            field("kind"),
            field("error"),
        ],
        "dead_lettered" => vec![field("reason")],
        "requeued" => vec![field("by").map(|b| format!("by {b}"))],
        "cancelled" | "erased" => vec![field("by").map(|b| format!("by {b}")), field("reason")],
        "attempt_started" => vec![
            field("attempt").map(|a| format!("attempt {a}")),
            field("worker_id").map(|w| format!("worker {w}")),
        ],
        "retry_scheduled" => vec![
            field("next_attempt").map(|a| format!("attempt {a}")),
            field("available_at").map(|t| format!("due {t}")),
        ],
        _ => vec![field("attempt").map(|a| format!("attempt {a}"))],
    };
    let line = parts.into_iter().flatten().collect::<Vec<_>>().join(", ");
    // one line per event, whatever a provider wrote
    line.replace(['\n', '\r'], " ")
}

/// Prints `rows` under `header`, columns padded to their widest cell (the last one is not).
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let out: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    (*c).to_owned()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", out.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}
