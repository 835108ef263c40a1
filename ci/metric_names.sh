#!/usr/bin/env bash
# Every metric name the alert rules, their unit tests and the Grafana dashboard use must be a
# family the service exports: defined in src/ (`Family::counter|gauge|histogram("arnela_…")`, or the registry's
# `counter|gauge|histogram(r, "arnela_…")`)
# and listed in README "Metrics". `_bucket`, `_sum` and `_count` are accepted on histograms
# only. A renamed or misspelt family fails here instead of leaving an alert that never fires or
# a panel that stays empty.
#   bash ci/metric_names.sh [FILE...]    (default: the files below)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if (($# == 0)); then
    set -- deploy/prometheus/alerts.yml deploy/prometheus/alerts.test.yml deploy/grafana/arnela.json
fi

python3 - "$@" <<'PY'
import pathlib, re, sys

def log(msg):
    print(f"metric_names.sh: {msg}", file=sys.stderr)

# Families defined in the code, with their type.
defined = {}
for path in sorted(pathlib.Path("src").rglob("*.rs")):
    text = path.read_text()
    # `Family::counter("arnela_…"`, and the registry's helpers named after the type, which take
    # the registry first (`counter(r, "arnela_…"`).
    for kind, name in re.findall(
        r'\b(counter|gauge|histogram)\(\s*(?:\w+,\s*)?"(arnela_[a-z0-9_]+)"', text
    ):
        defined[name] = kind
if len(defined) < 10:
    log(f"FAILED: found only {len(defined)} families in src/; has Family:: changed?")
    sys.exit(1)

# Families documented in README "Metrics" (the first column of its table).
readme = pathlib.Path("README.md").read_text()
section = re.search(r"^## Metrics\n(.*?)^## ", readme, re.S | re.M)
if not section:
    log('FAILED: README.md has no "## Metrics" section')
    sys.exit(1)
documented = set()
for line in section.group(1).splitlines():
    if line.startswith("| `arnela_"):
        first = line.split("|")[1]
        documented.update(re.findall(r"`(arnela_[a-z0-9_]+)`", first))

problems = []
for name in sorted(set(defined) - documented):
    problems.append(f"{name} is exported by src/ but missing from README \"Metrics\"")
for name in sorted(documented - set(defined)):
    problems.append(f"{name} is listed in README \"Metrics\" but no Family in src/ defines it")

used_total = 0
for file in sys.argv[1:]:
    text = pathlib.Path(file).read_text()
    used = set(re.findall(r"\barnela_[a-z0-9_]+", text))
    used_total += len(used)
    for name in sorted(used):
        base = name
        if name not in defined:
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and defined.get(name[: -len(suffix)]) == "histogram":
                    base = name[: -len(suffix)]
                    break
        if base not in defined:
            problems.append(f"{file}: {name} is not a family the service exports")
        elif base not in documented:
            problems.append(f"{file}: {name} is not listed in README \"Metrics\"")
    if not used:
        problems.append(f"{file}: uses no arnela_ metric at all")

if problems:
    for p in problems:
        log(f"FAILED: {p}")
    sys.exit(1)
log(f"ok: {len(defined)} families in src/ and README agree; "
    f"{used_total} names used in {len(sys.argv) - 1} files are all exported")
PY
