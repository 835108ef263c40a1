#!/usr/bin/env bash
# Checks the monitoring files of deploy/ with promtool (Debian's `prometheus` package, installed
# with apt when missing): the alert rules are valid, the Prometheus configuration loads, the
# rules' unit tests pass, every alert's runbook_url names a heading of README.md, and every
# query of the Grafana dashboard parses. The metric names themselves are checked by
# ci/metric_names.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf 'alerts_check.sh: %s\n' "$*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}

if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian's prometheus package)"
    install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            prometheus >/dev/null
    }
    install || { apt-get update -q >/dev/null && install; }
fi
log "$(promtool --version 2>&1 | head -n1)"

promtool check rules deploy/prometheus/alerts.yml >&2 || fail "promtool check rules"
# Loads alerts.yml too. The configuration names no credentials file (it scrapes the
# unauthenticated METRICS_ADDR listener), so it checks without secrets.
promtool check config deploy/prometheus/prometheus.yml >&2 || fail "promtool check config"
promtool test rules deploy/prometheus/alerts.test.yml >&2 || fail "promtool test rules"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 - "$WORK/dashboard_rules.yml" <<'PY' || fail "runbook links or dashboard queries"
import json, re, sys, yaml

problems = []

# 1. Every alert has the annotations the README's runbook relies on, and its runbook_url is a
#    heading of README.md (GitHub's anchors: lower case, punctuation dropped, spaces to '-').
def slug(heading):
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", heading.strip().lower()))
readme = open("README.md").read()
anchors = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", readme, re.M)}
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
for rule in alerts:
    name = rule["alert"]
    ann = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        if not ann.get(key):
            problems.append(f"{name} has no {key} annotation")
    if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
        problems.append(f"{name} has no severity label (critical or warning)")
    url = ann.get("runbook_url", "")
    m = re.fullmatch(r"README\.md#([\w-]+)", url)
    if not m:
        problems.append(f"{name}: runbook_url {url!r} is not README.md#<anchor>")
    elif m.group(1) not in anchors:
        problems.append(f"{name}: runbook_url {url!r}: README.md has no such heading")
    elif m.group(1) != name.lower():
        problems.append(f"{name}: runbook_url {url!r} should be README.md#{name.lower()}")

# 2. Every alert is exercised by the unit tests.
tests = yaml.safe_load(open("deploy/prometheus/alerts.test.yml"))
tested = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", [])}
firing = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
quiet = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", []) if not c.get("exp_alerts")}
for rule in alerts:
    if rule["alert"] not in firing:
        problems.append(f"{rule['alert']}: no test case where it fires")
    if rule["alert"] not in quiet:
        problems.append(f"{rule['alert']}: no test case where it stays quiet")
for name in sorted(tested - {r["alert"] for r in alerts}):
    problems.append(f"alerts.test.yml tests {name}, which alerts.yml does not define")

# 3. The dashboard's queries, with Grafana's variables filled in, as recording rules for
#    promtool to parse.
dash = json.load(open("deploy/grafana/arnela.json"))
variables = {"__rate_interval": "1m", "job": "arnela", "type": ".*"}
defined_vars = {v["name"] for v in dash["templating"]["list"]} | {"__rate_interval"}
records = []
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dash["panels"]):
    ds = p.get("datasource")
    if p["type"] != "row" and ds != {"type": "prometheus", "uid": "${datasource}"}:
        problems.append(f"panel {p.get('title')!r}: datasource is not the ${{datasource}} variable")
    for t in p.get("targets", []):
        expr = t["expr"]
        for var in re.findall(r"\$(\w+)", expr):
            if var not in defined_vars:
                problems.append(f"panel {p['title']!r}: ${var} is not a dashboard variable")
        expr = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), expr)
        records.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}, open(sys.argv[1], "w"))
print(f"{len(alerts)} alerts with README runbooks, {len(records)} dashboard queries", file=sys.stderr)

if problems:
    for p in problems:
        print(f"alerts_check.sh: FAILED: {p}", file=sys.stderr)
    sys.exit(1)
PY
promtool check rules "$WORK/dashboard_rules.yml" >/dev/null || {
    promtool check rules "$WORK/dashboard_rules.yml" >&2 || true
    fail "a query of deploy/grafana/arnela.json does not parse"
}
log "ok: rules, configuration, rule tests, runbook links and dashboard queries"
