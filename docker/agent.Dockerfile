# syntax=docker/dockerfile:1.7
# Image of the per-node agent: one static binary on distroless/static, uid 65532.
#
#   docker build -f docker/agent.Dockerfile -t <registry>/kata-lifecycle-manager-agent:0.1.0 .
#
# Without a container engine, `make images` (docker/build-images.sh) writes the same image
# (same paths, user, entrypoint) as an OCI archive; the real-node test runs that one.
# Build from the repository root (the whole Cargo workspace is the context). Multi-arch works
# with buildx (--platform linux/amd64,linux/arm64): rust:alpine targets musl natively, so the
# binary is static on every platform without naming a target triple.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-alpine AS build
# ring (rustls' crypto) compiles C and assembly.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is copied out in the
# same step because the cached target dir is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p klm-agent \
 && install -D -m 0755 target/release/klm-agent /out/klm-agent

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/klm-agent /usr/local/bin/klm-agent
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/klm-agent"]
