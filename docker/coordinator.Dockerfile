# syntax=docker/dockerfile:1.7
# Image of the coordinator: its static binary plus a pinned helm, on distroless/static
# (uid 65532, CA certificates included for OCI chart pulls). The coordinator runs helm as an
# argv array, never through a shell, so the image needs no shell.
#
#   docker build -f docker/coordinator.Dockerfile -t <registry>/kata-lifecycle-manager-coordinator:0.1.0 .
#
# Without a container engine, `make images` (docker/build-images.sh) writes the same image
# (same paths, user, entrypoint) as an OCI archive; the real-node test runs that one.
# Build from the repository root (the whole Cargo workspace is the context).

ARG RUST_VERSION=1.95
ARG GO_VERSION=1.26
# Keep in step with HELM4_VERSION in tests/tools/install.sh (what the tests run against; the
# coordinator also works with Helm 3 >= 3.14, see the README).
ARG HELM_VERSION=v4.3.1

FROM docker.io/library/rust:${RUST_VERSION}-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p klm-coordinator \
 && install -D -m 0755 target/release/klm-coordinator /out/klm-coordinator

# helm from source at the pinned tag: the Go module checksum database verifies the source, so
# no release tarball (and no checksum to maintain) is needed. CGO off = a static binary. Helm 4
# reads the Kubernetes version it assumes from its client-go build info: only the version stamp.
FROM docker.io/library/golang:${GO_VERSION}-alpine AS helm
ARG HELM_VERSION
ENV CGO_ENABLED=0 GOFLAGS=-trimpath
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    GOBIN=/out go install \
      -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
      helm.sh/helm/v4/cmd/helm@${HELM_VERSION} \
 && /out/helm version --short

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=helm /out/helm /usr/local/bin/helm
COPY --from=build /out/klm-coordinator /usr/local/bin/klm-coordinator
USER 65532:65532
# helm needs writable homes; the chart mounts an emptyDir at /tmp and points HELM_*_HOME there.
ENV HOME=/tmp HELM_CACHE_HOME=/tmp/helm/cache HELM_CONFIG_HOME=/tmp/helm/config HELM_DATA_HOME=/tmp/helm/data
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/klm-coordinator"]
CMD ["run"]
