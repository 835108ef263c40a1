#!/usr/bin/env bash
# Installs PgBouncer 1.24.1 as /usr/local/bin/pgbouncer for the pooler test (tests/it/pooler.rs)
# unless a PgBouncer of at least 1.21 is already on the PATH. Debian 12's own package is 1.18,
# which cannot carry prepared statements in transaction mode (README, "PgBouncer"), so this
# builds Debian 13's source package of 1.24.1 (the upstream tarball, from Debian's archive,
# checked against its digest) with Debian 12's libevent and OpenSSL.
set -euo pipefail

VERSION=1.24.1
SHA256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
URL="http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_${VERSION}.orig.tar.gz"

log() { printf 'ci/pgbouncer.sh: %s\n' "$*" >&2; }

if command -v pgbouncer >/dev/null; then
    have=$(pgbouncer --version | awk 'NR == 1 { print $NF }')
    if printf '1.21\n%s\n' "$have" | sort -V -C; then
        log "PgBouncer $have is installed"
        exit 0
    fi
    log "PgBouncer $have is older than 1.21; building $VERSION"
fi

missing=()
for pkg in libevent-dev libssl-dev pkg-config make gcc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL -o "$work/src.tar.gz" "$URL"
echo "$SHA256  $work/src.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/src.tar.gz" -C "$work"
(
    cd "$work/pgbouncer-$VERSION"
    ./configure --prefix=/usr/local --without-cares --without-systemd >/dev/null
    make -j2 >/dev/null
    make install >/dev/null
)
log "installed $(/usr/local/bin/pgbouncer --version | head -1)"
