#!/usr/bin/env bash
# cargo-deny over the locked dependency graph, with deny.toml: every crate's license is one we
# allow, no `*` version requirement (several versions of one crate are only reported), every
# crate comes from crates.io. cargo-deny is installed (pinned) only when `cargo deny` is missing.
# Advisories are not checked here: cargo-deny fetches the RustSec database from GitHub, which this
# CI cannot reach; run `cargo deny --locked check advisories` where it can.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2
log() { printf 'deny.sh: %s\n' "$*" >&2; }

if ! cargo deny --version >/dev/null 2>&1; then
    log "installing cargo-deny $CARGO_DENY_VERSION"
    cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi
log "$(cargo deny --version)"
cargo deny --locked check licenses bans sources
