# Arnela task processor: multi-stage image.
#
#   docker build -t arnela .
#   docker run --rm arnela --help
#
# Base images are pinned to exact tags so a rebuild gives the same toolchain and the same
# runtime libraries. To update: bump the tag (and keep builder and runtime on the same Debian
# release, here bookworm, so the binary links against the glibc it was built with).

# ---------------------------------------------------------------------------------------------
# Builder: compiles the release binary.
# ---------------------------------------------------------------------------------------------
FROM rust:1.95.0-bookworm AS builder

WORKDIR /build

# sqlx's query macros never reach a database during `docker build`: they read the query
# descriptions committed in `.sqlx/` (copied in step 2; `bash ci/sqlx_check.sh --prepare`
# rewrites them, see CONTRIBUTING "Checked SQL").
ENV CARGO_TERM_COLOR=never \
    SQLX_OFFLINE=true

# 1. Dependencies only. This layer is rebuilt only when Cargo.toml or Cargo.lock change, so
#    editing the application does not recompile the whole dependency tree. The crate's own
#    targets are stubs here and are cleaned afterwards, so that step 2 always rebuilds them
#    (COPY keeps the sources' modification times, which may be older than the stub's build).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin arnela \
    && cargo clean --release --package arnela \
    && rm -rf src

# 2. The application. `migrations/` is embedded into the binary at compile time by
#    `sqlx::migrate!`, so it must be present here. (`openapi/` is not copied: the spec is
#    generated from the code, and the committed copy is only compared against it by the tests.
#    Should the code ever `include_str!` it, add `COPY openapi ./openapi` and allow it in
#    .dockerignore.)
COPY src ./src
COPY migrations ./migrations
COPY .sqlx ./.sqlx
RUN cargo build --release --locked --bin arnela

# ---------------------------------------------------------------------------------------------
# Runtime: the binary, CA certificates and an unprivileged user; nothing else.
# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-20260824-slim AS runtime

LABEL org.opencontainers.image.title="arnela" \
      org.opencontainers.image.description="Event-sourced task processor with a persistent outbox for the Arnela clinic back end" \
      org.opencontainers.image.licenses="MIT"

# ca-certificates is deliberately not version-pinned: it must follow Debian's security updates
# for this release; the base image tag above is what pins the rest of the system.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 arnela \
    && useradd --system --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin arnela

COPY --from=builder /build/target/release/arnela /usr/local/bin/arnela

# Numeric, so that orchestrators enforcing "run as non-root" can verify it without /etc/passwd.
USER 10001:10001

# The port the server listens on inside the container; publish it with `-p HOST:8080`.
ENV APP_PORT=8080
EXPOSE 8080

# `arnela healthcheck` GETs http://127.0.0.1:$APP_PORT/health/live and exits non-zero unless it
# answers 2xx; the start period covers the database migrations run at start-up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["arnela", "healthcheck"]

ENTRYPOINT ["arnela"]
CMD ["serve"]
