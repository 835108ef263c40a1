//! Archives of the event log (README "Audit", "Archives"): `arnela audit archive --before
//! 2026-06` writes each closed monthly partition to a compressed, self-verifying file, verifies
//! the file, and only then removes the partition from the database ([`archive_before`]);
//! `arnela audit verify --archive FILE` checks files without any database ([`verify_files`]);
//! `arnela audit restore FILE` puts one back into a scratch database ([`restore`]).
//!
//! An archive is two files:
//! - `task_events_pYYYYMM.jsonl.zst`: JSON Lines compressed with zstd. First one line per
//!   checkpoint that names an event of the month (`{"checkpoint": {..., "heads": [...]}}`, with
//!   every head the checkpoint recorded, so its Merkle root can be recomputed), then one line per
//!   event (`{"event": {...}}`, every stored column, hashes in hex), in task and sequence order.
//! - `task_events_pYYYYMM.manifest.json`: what the file holds (counts, position range), the
//!   SHA-256 of the uncompressed lines, the SHA-256 over every chain's ends (task id, first
//!   sequence and link, last sequence and hash: the hash range), signed with the service's
//!   Ed25519 key (AUDIT_SIGNING_KEY) over the SHA-256 of the manifest's other fields.

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::api::events::CheckpointView;
use crate::domain::checkpoint::{check_link, merkle_root, sign, signature_holds, Head};
use crate::domain::TaskId;
use crate::store::archive::{self as store_archive, ArchivedEvent};
use crate::store::audit::{check_event, Link};
use crate::store::checkpoints::Checkpoint;
use crate::store::retention::{self, Partition};

/// The format named in every manifest.
pub const FORMAT: &str = "arnela-archive/1";
/// Events read from the database per page.
const PAGE: i64 = 5000;

/// What a manifest says of its archive (the part its signature covers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBody {
    pub format: String,
    pub partition: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub events: u64,
    pub tasks: u64,
    pub checkpoints: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    /// The data file's name, beside the manifest.
    pub data_file: String,
    /// SHA-256 of the data file's uncompressed lines.
    pub data_sha256: String,
    /// SHA-256 over each chain's ends, in task order (see `ChainEnds`).
    pub chains_sha256: String,
    pub created_at: DateTime<Utc>,
}

impl ManifestBody {
    /// What the signature signs.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(serde_json::to_vec(self).expect("a manifest serializes")).into()
    }
}

/// A signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub body: ManifestBody,
    pub public_key: String,
    pub signature: String,
}

/// One line of a data file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Checkpoint {
        #[serde(flatten)]
        checkpoint: CheckpointView,
        heads: Vec<HeadLine>,
    },
    Event(ArchivedEvent),
}

#[derive(Debug, Serialize, Deserialize)]
struct HeadLine {
    task_id: TaskId,
    version: i32,
    hash: String,
}

/// The ends of one task's chain within an archive: digested, in task order, into the manifest's
/// `chains_sha256`.
#[derive(Debug, Default)]
struct ChainEnds {
    digest: Sha256,
    current: Option<Ends>,
    tasks: u64,
}

/// A chain's task, first sequence and link, last sequence and hash.
#[derive(Debug)]
struct Ends {
    task: TaskId,
    first: i32,
    link: Option<Vec<u8>>,
    last: i32,
    hash: Vec<u8>,
}

impl ChainEnds {
    fn push(&mut self, e: &ArchivedEvent) {
        match &mut self.current {
            Some(ends) if ends.task == e.task_id => {
                ends.last = e.sequence;
                ends.hash.clone_from(&e.hash);
            }
            _ => {
                self.flush();
                self.current = Some(Ends {
                    task: e.task_id,
                    first: e.sequence,
                    link: e.prev_hash.clone(),
                    last: e.sequence,
                    hash: e.hash.clone(),
                });
                self.tasks += 1;
            }
        }
    }

    fn flush(&mut self) {
        if let Some(ends) = self.current.take() {
            self.digest.update(ends.task.as_bytes());
            self.digest.update(ends.first.to_be_bytes());
            self.digest.update(ends.link.unwrap_or_else(|| vec![0; 32]));
            self.digest.update(ends.last.to_be_bytes());
            self.digest.update(ends.hash);
        }
    }

    fn finish(mut self) -> (u64, String) {
        self.flush();
        (self.tasks, hex::encode(self.digest.finalize()))
    }
}

/// The two files of partition `name` in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.jsonl.zst")),
        dir.join(format!("{name}.manifest.json")),
    )
}

/// The manifest of an archive named by either of its files.
fn manifest_path(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match name.strip_suffix(".jsonl.zst") {
        Some(stem) => file.with_file_name(format!("{stem}.manifest.json")),
        None => file.to_path_buf(),
    }
}

/// Writes `partition`'s archive into `dir` (the data file, then the manifest, each written to a
/// temporary name, synced and renamed). Reads the partition in pages of short transactions.
pub async fn write(
    pool: &PgPool,
    partition: &Partition,
    dir: &Path,
    key: &SigningKey,
) -> anyhow::Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (data_path, manifest_file) = paths(dir, &partition.name);
    let partial = data_path.with_extension("zst.partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut out = zstd::Encoder::new(std::io::BufWriter::new(file), 3)?;
    let mut digest = Sha256::new();
    let mut put = |out: &mut dyn Write, line: &Line| -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        digest.update(&bytes);
        out.write_all(&bytes)?;
        Ok(())
    };
    let checkpoints = store_archive::checkpoints_naming(pool, partition).await?;
    for (c, heads) in &checkpoints {
        put(
            &mut out,
            &Line::Checkpoint {
                checkpoint: CheckpointView::from(c.clone()),
                heads: heads
                    .iter()
                    .map(|h| HeadLine {
                        task_id: h.task_id,
                        version: h.version,
                        hash: hex::encode(&h.hash),
                    })
                    .collect(),
            },
        )?;
    }
    let (mut events, mut first_position, mut last_position) = (0u64, None::<i64>, None::<i64>);
    let mut chains = ChainEnds::default();
    let mut after = None;
    loop {
        let page = store_archive::events_page(pool, partition, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.task_id, last.sequence));
        for e in page {
            events += 1;
            first_position = Some(first_position.map_or(e.position, |p| p.min(e.position)));
            last_position = Some(last_position.map_or(e.position, |p| p.max(e.position)));
            chains.push(&e);
            put(&mut out, &Line::Event(e))?;
        }
    }
    let file = out.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&partial, &data_path)?;
    let (tasks, chains_sha256) = chains.finish();
    let body = ManifestBody {
        format: FORMAT.into(),
        partition: partition.name.clone(),
        starts_at: partition.starts_at,
        ends_at: partition.ends_at,
        events,
        tasks,
        checkpoints: checkpoints.len() as u64,
        first_position,
        last_position,
        data_file: format!("{}.jsonl.zst", partition.name),
        data_sha256: hex::encode(digest.finalize()),
        chains_sha256,
        created_at: crate::domain::event::db_time(Utc::now()),
    };
    let manifest = Manifest {
        signature: hex::encode(sign(key, &body.digest())),
        public_key: hex::encode(key.verifying_key().to_bytes()),
        body,
    };
    let partial = manifest_file.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, &manifest_file)?;
    Ok(manifest)
}

/// What checking one archive found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchiveCheck {
    pub file: String,
    pub partition: String,
    pub events: u64,
    pub tasks: u64,
    pub checkpoints: u64,
    /// Checkpoint heads that name an event of this archive, each found with the same hash.
    pub heads_checked: u64,
    /// Chains that continue from an earlier archive not given (their first link is unchecked
    /// here; the database's anchors or that archive check it).
    pub continued: u64,
    /// Every problem found (empty: the archive holds).
    pub problems: Vec<String>,
    #[serde(skip)]
    manifest: Option<Manifest>,
    #[serde(skip)]
    continued_links: Vec<(TaskId, i32, Vec<u8>)>,
}

impl ArchiveCheck {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The last event of each task seen in the archives checked so far (for the next one).
pub type Carried = HashMap<TaskId, (i32, Vec<u8>)>;

/// Checks archives in order (oldest first), without any database: each manifest's signature
/// (by `trusted` when given), the data file's digest, counts and position range, every event's
/// hash and link, chains continuing from the previous archives given, and every checkpoint in
/// the file (hash, signature, Merkle root over its heads, its heads' events in this archive).
pub fn verify_files(files: &[PathBuf], trusted: Option<&[u8]>) -> Vec<ArchiveCheck> {
    let mut carried = Carried::new();
    let last = files.len().saturating_sub(1);
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut check = ArchiveCheck {
                file: f.display().to_string(),
                ..ArchiveCheck::default()
            };
            // the last archive's chain ends are needed by none after it
            if let Err(e) = check_file(f, trusted, &mut carried, i < last, &mut check) {
                check.problems.push(format!("{e:#}"));
            }
            check
        })
        .collect()
}

/// Checks one archive by itself (see [`verify_files`]).
pub fn verify_file(file: &Path, trusted: Option<&[u8]>) -> ArchiveCheck {
    verify_files(&[file.to_path_buf()], trusted)
        .pop()
        .expect("one check per file")
}

/// Checks one archive; `carried` links its chains to earlier archives' and, when `record`,
/// receives this one's chain ends.
fn check_file(
    file: &Path,
    trusted: Option<&[u8]>,
    carried: &mut Carried,
    record: bool,
    check: &mut ArchiveCheck,
) -> anyhow::Result<()> {
    let manifest_file = manifest_path(file);
    let text = std::fs::read(&manifest_file)
        .with_context(|| format!("cannot read {}", manifest_file.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a manifest", manifest_file.display()))?;
    let body = &manifest.body;
    check.partition.clone_from(&body.partition);
    if body.format != FORMAT {
        bail!("unknown archive format {:?}", body.format);
    }
    let key = hex::decode(&manifest.public_key).unwrap_or_default();
    let signature = hex::decode(&manifest.signature).unwrap_or_default();
    if !signature_holds(&key, &body.digest(), &signature) {
        check
            .problems
            .push("the manifest's signature does not hold (forged or altered)".into());
    }
    if trusted.is_some_and(|k| k != key.as_slice()) {
        check
            .problems
            .push("the manifest is signed with another key than the trusted one".into());
    }
    let data_path = manifest_file.with_file_name(&body.data_file);
    let reader = std::fs::File::open(&data_path)
        .with_context(|| format!("cannot read {}", data_path.display()))?;
    let mut lines = std::io::BufReader::new(zstd::Decoder::new(reader)?);
    let mut digest = Sha256::new();
    let mut chains = ChainEnds::default();
    let mut named: HashMap<(TaskId, i32), Vec<u8>> = HashMap::new();
    let mut prev_checkpoint: Option<Checkpoint> = None;
    let mut prev: Option<ArchivedEvent> = None;
    let (mut first_position, mut last_position) = (None::<i64>, None::<i64>);
    let mut line = String::new();
    let mut number = 0u64;
    let mut problems = Vec::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            break;
        }
        number += 1;
        digest.update(line.as_bytes());
        let parsed: Line =
            serde_json::from_str(&line).with_context(|| format!("line {number} is unreadable"))?;
        match parsed {
            Line::Checkpoint { checkpoint, heads } => {
                if check.events > 0 {
                    problems.push(format!("line {number}: a checkpoint after the events"));
                }
                let c = Checkpoint::try_from(checkpoint).map_err(|m| anyhow!(m))?;
                let heads: Vec<Head> = heads
                    .into_iter()
                    .map(|h| {
                        Ok(Head {
                            task_id: h.task_id,
                            version: h.version,
                            hash: hex::decode(&h.hash)
                                .map_err(|_| anyhow!("line {number}: a head's hash is not hex"))?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                check_checkpoint(&c, &heads, prev_checkpoint.as_ref(), trusted, &mut problems);
                named.extend(heads.into_iter().map(|h| ((h.task_id, h.version), h.hash)));
                check.checkpoints += 1;
                prev_checkpoint = Some(c);
            }
            Line::Event(e) => {
                check.events += 1;
                first_position = Some(first_position.map_or(e.position, |p| p.min(e.position)));
                last_position = Some(last_position.map_or(e.position, |p| p.max(e.position)));
                if e.recorded_at < body.starts_at || e.recorded_at >= body.ends_at {
                    problems.push(format!(
                        "task {} event {}: recorded at {}, outside the archive's month",
                        e.task_id, e.sequence, e.recorded_at
                    ));
                }
                if let Some(hash) = named.get(&(e.task_id, e.sequence)) {
                    if *hash == e.hash {
                        check.heads_checked += 1;
                    } else {
                        problems.push(format!(
                            "task {} event {}: differs from the head a checkpoint recorded",
                            e.task_id, e.sequence
                        ));
                    }
                }
                check_chained(&e, prev.as_ref(), carried, check, &mut problems);
                chains.push(&e);
                if record {
                    carried.insert(e.task_id, (e.sequence, e.hash.clone()));
                }
                prev = Some(e);
            }
        }
    }
    let (tasks, chains_sha256) = chains.finish();
    check.tasks = tasks;
    let mut differs = |what: &str, ok: bool| {
        if !ok {
            problems.push(format!("the manifest's {what} differs from the file's"));
        }
    };
    differs(
        "data_sha256",
        hex::encode(digest.finalize()) == body.data_sha256,
    );
    differs("chains_sha256", chains_sha256 == body.chains_sha256);
    differs("events", check.events == body.events);
    differs("tasks", tasks == body.tasks);
    differs("checkpoints", check.checkpoints == body.checkpoints);
    differs(
        "position range",
        (first_position, last_position) == (body.first_position, body.last_position),
    );
    check.problems.extend(problems);
    check.manifest = Some(manifest);
    Ok(())
}

/// Checks event `e` against the one before it in the file (`prev`, in task and sequence
/// order) or, for a task's first event here, against an earlier archive's last one.
fn check_chained(
    e: &ArchivedEvent,
    prev: Option<&ArchivedEvent>,
    carried: &Carried,
    check: &mut ArchiveCheck,
    problems: &mut Vec<String>,
) {
    let stored = e.stored();
    let found = match prev.filter(|p| p.task_id == e.task_id) {
        Some(p) => check_event(
            &stored,
            p.sequence + 1,
            Some(Link {
                hash: &p.hash,
                hash_version: p.hash_version,
            }),
        ),
        None if prev.is_some_and(|p| p.task_id > e.task_id) => {
            Some("out of task order (the file was reordered)".into())
        }
        None if e.sequence == 1 => check_event(&stored, 1, None),
        None => match carried.get(&e.task_id) {
            Some((seq, hash)) => check_event(
                &stored,
                seq + 1,
                Some(Link {
                    hash,
                    hash_version: 0,
                }),
            ),
            None => {
                // continues from an archive not given: its link is taken as it is
                check.continued += 1;
                let link = e.prev_hash.clone().unwrap_or_default();
                check
                    .continued_links
                    .push((e.task_id, e.sequence - 1, link.clone()));
                check_event(
                    &stored,
                    e.sequence,
                    Some(Link {
                        hash: &link,
                        hash_version: 0,
                    }),
                )
            }
        },
    };
    if let Some(reason) = found {
        problems.push(format!("task {} event {}: {reason}", e.task_id, e.sequence));
    }
}

/// Checks a checkpoint of an archive: its hash and signature, its link to the checkpoint
/// before it in the file when that is its predecessor, and its Merkle root over its heads.
fn check_checkpoint(
    c: &Checkpoint,
    heads: &[Head],
    prev: Option<&Checkpoint>,
    trusted: Option<&[u8]>,
    problems: &mut Vec<String>,
) {
    // numbering and links across checkpoints not in this file are the database's to check
    let link = match prev.filter(|p| p.seq + 1 == c.seq) {
        Some(p) => Some(p.hash.as_slice()),
        None => c.prev_hash.as_deref(),
    };
    let found = check_link(&c.link(), c.seq, link, trusted);
    problems.extend(
        found
            .into_iter()
            .map(|p| format!("checkpoint {}: {p}", c.seq)),
    );
    if merkle_root(heads).as_slice() != c.merkle_root || heads.len() as i32 != c.tasks {
        problems.push(format!(
            "checkpoint {}: its heads do not give its Merkle root",
            c.seq
        ));
    }
}

/// What archiving one partition did.
#[derive(Debug, Clone, Serialize)]
pub struct Archived {
    pub partition: String,
    pub data_file: PathBuf,
    pub manifest_file: PathBuf,
    pub events: u64,
    pub tasks: u64,
    pub checkpoints: u64,
    pub anchors: u64,
}

/// Archives every monthly partition that ends by `before` (the first of a month, which must
/// not be later than this month's first day): writes its files into `dir`, verifies them
/// against the database (the same number of events; chains continuing from earlier archives
/// linked to their anchors), then removes the partition. Stops at the first partition that
/// does not verify, leaving it in place.
pub async fn archive_before(
    pool: &PgPool,
    before: DateTime<Utc>,
    dir: &Path,
    key: &SigningKey,
    lock_timeout: std::time::Duration,
) -> anyhow::Result<Vec<Archived>> {
    let this_month = Partition::of(Utc::now());
    if before > this_month.starts_at {
        bail!(
            "--before {} is later than this month's start ({}): only ended months can be archived",
            before.format("%Y-%m"),
            this_month.starts_at.format("%Y-%m")
        );
    }
    let mut done = Vec::new();
    for partition in retention::partitions(pool).await? {
        if partition.ends_at > before {
            continue;
        }
        let open = store_archive::transactions_started_before(pool, partition.ends_at).await?;
        if open > 0 {
            bail!(
                "{open} transactions that started before {} are still open and could still \
                 append to {}: try again when they have ended",
                partition.ends_at,
                partition.name
            );
        }
        let manifest = write(pool, &partition, dir, key).await?;
        let (data_file, manifest_file) = paths(dir, &partition.name);
        let public = key.verifying_key().to_bytes();
        let check = verify_file(&data_file, Some(&public));
        let stored = store_archive::count(pool, &partition).await?;
        let mut problems = check.problems.clone();
        if stored as u64 != check.events {
            problems.push(format!(
                "the file holds {} events, the partition {stored}",
                check.events
            ));
        }
        problems.extend(
            store_archive::unanchored(pool, &check.continued_links)
                .await?
                .into_iter()
                .map(|(task, seq)| {
                    format!(
                        "task {task}: continues after event {seq}, which no earlier archive \
                         recorded (or recorded with another hash)"
                    )
                }),
        );
        if !problems.is_empty() {
            bail!(
                "{} was written but does not verify, so {} stays in the database:\n  {}",
                data_file.display(),
                partition.name,
                problems.join("\n  ")
            );
        }
        let anchors = store_archive::remove_partition(
            pool,
            store_archive::ArchiveRecord {
                partition: &partition,
                events: stored,
                tasks: manifest.body.tasks as i64,
                manifest: &serde_json::to_value(&manifest)?,
            },
            lock_timeout,
        )
        .await?;
        done.push(Archived {
            partition: partition.name.clone(),
            data_file,
            manifest_file,
            events: manifest.body.events,
            tasks: manifest.body.tasks,
            checkpoints: manifest.body.checkpoints,
            anchors,
        });
    }
    Ok(done)
}

/// Verifies archives (as [`verify_files`], by `trusted` when given) and puts their events back
/// into the database `pool` points at (meant for a scratch database, migrated). Returns the
/// checks and the events inserted; inserts nothing unless every archive holds.
pub async fn restore(
    pool: &PgPool,
    files: &[PathBuf],
    trusted: Option<&[u8]>,
) -> anyhow::Result<(Vec<ArchiveCheck>, u64)> {
    if let Some(refusal) = store_archive::live_database(pool).await? {
        bail!("{refusal}: restore into a scratch database (created and migrated for it)");
    }
    let checks = verify_files(files, trusted);
    if checks.iter().any(|c| !c.ok()) {
        return Ok((checks, 0));
    }
    let mut inserted = 0;
    for (file, check) in files.iter().zip(&checks) {
        let manifest = check
            .manifest
            .as_ref()
            .expect("a verified archive has its manifest");
        let partition = Partition::from_name(&manifest.body.partition)
            .ok_or_else(|| anyhow!("{}: not a monthly partition", manifest.body.partition))?;
        let data = manifest_path(file).with_file_name(&manifest.body.data_file);
        let mut lines = std::io::BufReader::new(zstd::Decoder::new(std::fs::File::open(&data)?)?);
        let mut batch: Vec<ArchivedEvent> = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let end = lines.read_line(&mut line)? == 0;
            if !end {
                if let Line::Event(e) = serde_json::from_str(&line)? {
                    batch.push(e);
                }
            }
            // whole chains per batch: a chain's head is recorded from its last event
            let cut = batch.len() >= PAGE as usize
                && batch.last().map(|l| l.task_id) != batch.first().map(|f| f.task_id);
            if end || cut {
                let keep = if end {
                    Vec::new()
                } else {
                    let last = batch.last().map(|l| l.task_id);
                    let at = batch
                        .iter()
                        .position(|e| Some(e.task_id) == last)
                        .unwrap_or(0);
                    batch.split_off(at)
                };
                inserted +=
                    store_archive::restore(pool, &manifest.body.partition, &partition, &batch)
                        .await?;
                batch = keep;
            }
            if end {
                break;
            }
        }
    }
    Ok((checks, inserted))
}
