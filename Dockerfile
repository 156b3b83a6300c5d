# syntax=docker/dockerfile:1
# The backflow image: one static (musl) binary, stripped of debug info by the release profile
# (`strip = "debuginfo"` in Cargo.toml), on distroless/static, running as non-root
# (uid 65532). ENTRYPOINT is the binary; the chart passes `operator …`, run Jobs pass
# `run --namespace NS --sync NAME`.
#   docker build -t REGISTRY/backflow:TAG .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/backflow:TAG --push .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH:-amd64}" in \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo x86_64-unknown-linux-musl ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin backflow --target "$(cat /rust-target)" \
 && cp "target/$(cat /rust-target)/release/backflow" /backflow

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /backflow /usr/local/bin/backflow
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/backflow"]
CMD ["operator"]
