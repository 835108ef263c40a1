#!/usr/bin/env bash
# Checks what can be checked of the compose stack without a Docker engine, with Debian's
# docker-compose (installed with apt when missing): the newcomer's `cp .env.example .env` is
# refused until every secret is set, with a message saying how to generate one; the stack runs
# in production unless .env chooses development; no secret reaches a command line; the
# `observability` profile (Prometheus, Grafana) is opt-in, pinned, provisioned read-only from
# deploy/, published on loopback only, and scrapes the port the API's metrics listener uses.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf 'compose_check.sh: %s\n' "$*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}

if ! command -v docker-compose >/dev/null 2>&1; then
    log "installing docker-compose (Debian's package)"
    install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            docker-compose >/dev/null
    }
    install || { apt-get update -q >/dev/null && install; }
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp "$ROOT/compose.yaml" "$ROOT/.env.example" "$ROOT/Dockerfile" "$WORK/"
cp -R "$ROOT/deploy" "$WORK/"
cd "$WORK"
config() { docker-compose --project-directory "$WORK" -f compose.yaml config 2>&1; }
api_env() { # $1: variable; prints its value in the resolved api service
    config | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["services"]["api"]["environment"].get(sys.argv[1], ""))' "$1"
}

# 1. The example as it is: refused, naming the secret and how to generate one.
cp .env.example .env
if out="$(config)"; then
    fail "docker-compose config accepted .env.example without secrets"
fi
grep -q "openssl rand -hex 32" <<<"$out" || fail "the refusal does not say how to generate a secret: $out"
for secret in DB_PASSWORD REDIS_PASSWORD JWT_SECRET; do
    grep -Eq "^$secret=$" .env.example || fail ".env.example gives $secret a value"
done
log "ok: .env.example alone is refused: $(tail -n1 <<<"$out" | cut -c1-160)"

# 2. Secrets set, nothing else: production.
printf 'JWT_SECRET=%s\nDB_PASSWORD=%s\nREDIS_PASSWORD=%s\n' \
    "$(openssl rand -hex 32)" "$(openssl rand -hex 24)" "$(openssl rand -hex 24)" >>.env
[[ "$(api_env APP_ENV)" == "production" ]] || fail "the stack does not default to production"
log "ok: with the secrets set the stack runs APP_ENV=production"

# 3. No secret on a command line: redis-server reads its password from a file, Grafana its admin
#    password from its environment.
echo "GRAFANA_ADMIN_PASSWORD=$(openssl rand -hex 24)" >>.env
resolved="$(config)"
python3 - "$resolved" <<'PY' || fail "a secret appears in a command or entrypoint"
import sys, yaml
doc = yaml.safe_load(sys.argv[1])
for name, service in doc["services"].items():
    for key in ("command", "entrypoint"):
        words = service.get(key) or []
        text = " ".join(words) if isinstance(words, list) else str(words)
        for secret in ("REDIS_PASSWORD", "DB_PASSWORD", "JWT_SECRET", "GRAFANA_ADMIN_PASSWORD"):
            value = str(service.get("environment", {}).get(secret, ""))
            if value and value in text:
                print(f"{name}.{key} holds the value of {secret}")
                sys.exit(1)
PY
log "ok: no secret value in any command or entrypoint"

# 4. Development is an explicit choice.
echo "APP_ENV=development" >>.env
[[ "$(api_env APP_ENV)" == "development" ]] || fail "APP_ENV=development in .env is not honoured"
log "ok: APP_ENV=development in .env chooses development"

# 5. The observability profile.
observability="$(docker-compose --project-directory "$WORK" -f compose.yaml --profile observability config 2>&1)" ||
    fail "docker-compose --profile observability config: $observability"
python3 - "$observability" "$WORK" <<'PY' || fail "the observability profile"
import os, re, sys, yaml
doc, work = yaml.safe_load(sys.argv[1]), sys.argv[2]
services, networks = doc["services"], doc.get("networks", {})
problems = []
for name in ("prometheus", "grafana"):
    svc = services.get(name)
    if svc is None:
        problems.append(f"no {name} service")
        continue
    if svc.get("profiles") != ["observability"]:
        problems.append(f"{name} is not only in the observability profile: {svc.get('profiles')}")
    image = svc.get("image", "")
    if not re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image):
        problems.append(f"{name}: image {image!r} is not pinned to a version")
    for opt in ("no-new-privileges:true",):
        if opt not in svc.get("security_opt", []):
            problems.append(f"{name}: no security_opt {opt}")
    if "healthcheck" not in svc:
        problems.append(f"{name}: no healthcheck")
    for vol in svc.get("volumes", []):
        source, target, *mode = vol.split(":") if isinstance(vol, str) else (vol["source"], vol["target"], "ro" if vol.get("read_only") else "rw")
        if source.startswith("/"):  # a bind mount (named volumes have no slash)
            if not source.startswith(work + "/deploy/"):
                problems.append(f"{name}: bind mount {source} is not under deploy/")
            if not os.path.exists(source):
                problems.append(f"{name}: bind mount {source} does not exist")
            if mode != ["ro"]:
                problems.append(f"{name}: bind mount {source} is not read-only")
# Published ports: only the API's and Grafana's, on loopback.
for name, svc in services.items():
    for port in svc.get("ports", []):
        text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}:{port.get('target')}"
        if name == "grafana" and not text.startswith("127.0.0.1:"):
            problems.append(f"grafana publishes {text}, not on 127.0.0.1 only")
        if name not in ("api", "grafana"):
            problems.append(f"{name} publishes {text}")
# Prometheus reaches the API's metrics listener on an internal network, at the port it listens on.
api, prom = services["api"], services.get("prometheus", {})
shared = set(api.get("networks", {})) & set(prom.get("networks", {}))
if not shared:
    problems.append("prometheus shares no network with api")
elif not all(networks.get(n, {}).get("internal") for n in prom.get("networks", {})):
    problems.append("prometheus is on a network that is not internal")
metrics_addr = str(api.get("environment", {}).get("METRICS_ADDR", ""))
with open(os.path.join(work, "deploy/prometheus/prometheus.yml")) as f:
    config = yaml.safe_load(f)
targets = [t for job in config["scrape_configs"] if job["job_name"] == "arnela"
           for sc in job.get("static_configs", []) for t in sc["targets"]]
if not metrics_addr:
    problems.append("the api's METRICS_ADDR is empty by default: Prometheus would scrape nothing")
elif targets != [f"api:{metrics_addr.rsplit(':', 1)[1]}"]:
    problems.append(f"prometheus.yml scrapes {targets}, the api's METRICS_ADDR is {metrics_addr}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
PY
log "ok: --profile observability: prometheus and grafana pinned and opt-in, provisioned read-only from deploy/; grafana on 127.0.0.1 only; prometheus scrapes the api's METRICS_ADDR port"
