//! The integration tests, one binary: each module tests one part of the service against the
//! real Postgres and Redis (a database and a key prefix of its own per test). `common` holds
//! the shared fixtures. Run one module with `cargo test --test it audit::`.

mod common;

mod audit;
mod auth;
mod binding;
mod cache;
mod channels;
mod cluster;
mod console;
mod crash;
mod engine;
mod enqueue;
mod erasure;
mod health;
mod layers;
mod metrics;
mod openapi;
mod outage;
mod pooler;
mod projector;
mod replica;
mod retention;
mod schedules;
mod settings_doc;
mod shutdown;
mod soak;
mod trace_context;
