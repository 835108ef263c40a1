#!/usr/bin/env bash
# Checks what can be checked of the compose stack without a Docker engine, with Debian's
# docker-compose (installed with apt when missing): the newcomer's `cp .env.example .env` is
# refused until every secret is set, with a message saying how to generate one; the stack runs
# in production unless .env chooses development; no secret reaches a command line.
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

# 3. No secret on a command line: redis-server reads its password from a file.
resolved="$(config)"
python3 - "$resolved" <<'PY' || fail "a secret appears in a command or entrypoint"
import sys, yaml
doc = yaml.safe_load(sys.argv[1])
for name, service in doc["services"].items():
    for key in ("command", "entrypoint"):
        words = service.get(key) or []
        text = " ".join(words) if isinstance(words, list) else str(words)
        for secret in ("REDIS_PASSWORD", "DB_PASSWORD", "JWT_SECRET"):
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
