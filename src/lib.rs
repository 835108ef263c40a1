//! Arnela: the event-sourced task processor with a persistent outbox behind a clinic's
//! appointment system.
//!
//! `POST /tasks` appends an `enqueued` event, writes the task's projection row and an outbox row
//! in one Postgres transaction. Postgres is the system of record; Redis is transport and cache.
//!
//! # Layout
//!
//! Dependencies point one way, from the layers of CONTRIBUTING ("Layers", checked by
//! `tests/it/layers.rs`): [`domain`] (pure) ← [`store`] (the only SQL) and [`queue`] (Redis) ←
//! [`config`], [`binding`], [`cache`] ← [`metrics`] ← the engine ([`worker`], [`relay`],
//! [`rescuer`], [`projector`], …) ← [`channel`] and [`api`] ← [`app`], which wires everything.
//!
//! - [`domain`]: task types and payload validation, events and their hash chain, the task state
//!   machine, the retry policy. No I/O.
//! - [`store`]: Postgres: transactional enqueue, the one transition path of every later state
//!   change (lock, decide, record, derived outbox changes), event appends with expected
//!   versions, the commit-safe global log, audit verification, migrations.
//! - [`queue`]: Redis key names, the delivery message and the list operations.
//! - [`binding`]: the Redis namespace records the database it serves; a process attached to
//!   another database refuses to start, publish or take deliveries.
//! - [`relay`]: moves due outbox rows to the Redis queue (`Relay::run_once` is one batch).
//! - [`worker`]: takes deliveries, claims attempts under a lease, runs handlers, records
//!   outcomes (`Worker::process_next` is one delivery); `worker::pool` runs many with claims
//!   sized to the handlers' pace; `worker::lease` is the one lease renewer of every path.
//! - [`rescuer`]: expired leases, an emptied Redis, deliveries lost in transit
//!   (`Rescuer::run_once` is one pass).
//! - [`api`]: the poem-openapi HTTP service, its documents and error mapping.
//! - [`channel`]: the delivery channels (SMTP / SendGrid e-mail, Twilio SMS and WhatsApp, Google
//!   Calendar), their message templates, error classification and rate limits.
//! - [`projector`]: reads the global log from durable checkpoints: cluster-wide totals and
//!   attempt durations, cache invalidations (`Projector::run_once` is one batch).
//! - [`cache`]: cache-aside over Redis with single-flight misses, generation-guarded writes, the
//!   key builders and the invalidation rules.
//! - [`metrics`]: the Prometheus registry (`prometheus-client`) shared by a process's roles and
//!   the scrape-time collectors of cluster figures.
//! - [`config`]: typed settings from the environment, validated once.
//! - [`app`]: builds the application without starting it; owns pools and the shutdown token.
//! - [`cli`]: the `arnela` command line; [`healthcheck`]: the container health probe. The load
//!   generator is a binary of its own (`arnela-bench`, `bench/src`), outside this library.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod archive;
pub mod backoff;
pub mod binding;
pub mod cache;
pub mod channel;
pub mod checkpointer;
pub mod cli;
pub mod config;
pub mod dead_letters;
pub mod domain;
pub mod engine;
pub mod healthcheck;
pub mod maintenance;
pub mod metrics;
pub mod ops;
pub mod projector;
pub mod queue;
pub mod relay;
pub mod rescuer;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod worker;
