# syntax=docker/dockerfile:1
#
# One image with both binaries: the orchestrator (default entrypoint) and the example service
# (`entrypoint: ["/usr/local/bin/service"]` in compose/docker-compose.yml, `command:` in
# compose/k8s/base/service.yaml). Build from the repository root:
#
#   docker build -t servicekit:local .
#
# The builder is pinned to the toolchain the project is developed with (the workspace's
# rust-version is the minimum); both stages are bookworm, so the glibc the binaries link
# against is the one the runtime has.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binaries are copied out of
# the cached target/ in the same step, since a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p servicekit-orchestrator --bin orchestrator \
 && cargo build --release --locked --example service \
 && mkdir -p /out \
 && cp target/release/orchestrator target/release/examples/service /out/

FROM debian:bookworm-slim AS runtime
# A fixed numeric non-root user, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 servicekit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin servicekit
COPY --from=builder /out/orchestrator /usr/local/bin/orchestrator
COPY --from=builder /out/service /usr/local/bin/service
USER 10001:10001
# 9000: the orchestrator; 8000: the example service (SERVICEKIT_PORT).
EXPOSE 9000 8000
# Both binaries deregister/stop cleanly on SIGTERM (what `docker stop` and Kubernetes send).
STOPSIGNAL SIGTERM
# GETs /health on ORCHESTRATOR_BIND's port (default 127.0.0.1:9000); no curl needed. A
# container running the example service overrides it with
# `orchestrator healthcheck --url http://127.0.0.1:8000/health`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/orchestrator", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/orchestrator"]
