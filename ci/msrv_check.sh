#!/usr/bin/env bash
# The minimum Rust version Cargo.toml declares (`rust-version`) is at least the highest one any
# dependency this build locks declares (on Linux): a lower one would promise builds that cannot
# work. Our own code is held to it by clippy's `incompatible_msrv` lint, part of
# `cargo clippy -D warnings`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --locked --format-version 1 --filter-platform x86_64-unknown-linux-gnu \
    | python3 -c '
import json
import sys

meta = json.load(sys.stdin)


def version(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


used = {n["id"] for n in meta["resolve"]["nodes"]}
ours = next(p for p in meta["packages"] if p["id"] in meta["workspace_members"])
deps = [(version(p["rust_version"]), p["name"] + " " + p["version"])
        for p in meta["packages"]
        if p["rust_version"] and p["id"] in used and p["id"] not in meta["workspace_members"]]
needed, who = max(deps)
declared = version(ours["rust_version"] or "0")
print("rust-version", ours["rust_version"], "- the highest a locked dependency declares:",
      ".".join(map(str, needed)), "(" + who + ")")
if declared < needed:
    sys.exit("Cargo.toml rust-version is below what a locked dependency needs")
'
