# syntax=docker/dockerfile:1.7
# Image of the coordinator: its static binary plus a pinned helm, on distroless/static
# (uid 65532, CA certificates included for OCI chart pulls). The coordinator runs helm as an
# argv array, never through a shell, so the image needs no shell.
#
#   docker build -f docker/coordinator.Dockerfile -t <registry>/kata-lifecycle-manager-coordinator:0.1.0 .
#
# Build from the repository root (the whole Cargo workspace is the context).

ARG RUST_VERSION=1.95
ARG GO_VERSION=1.26
# Keep in step with HELM_VERSION in tests/tools/install.sh (what the tests run against).
ARG HELM_VERSION=v3.22.0

FROM docker.io/library/rust:${RUST_VERSION}-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p klm-coordinator \
 && install -D -m 0755 target/release/klm-coordinator /out/klm-coordinator

# helm from source at the pinned tag: the Go module checksum database verifies the source, so
# no release tarball (and no checksum to maintain) is needed. CGO off = a static binary.
# The k8sVersion ldflags are what helm's own Makefile sets (its client-go is v0.37 -> 1.37);
# without them `helm template`/`helm lint` assume Kubernetes 1.20.
FROM docker.io/library/golang:${GO_VERSION}-alpine AS helm
ARG HELM_VERSION
ARG HELM_K8S_MINOR=37
ENV CGO_ENABLED=0 GOFLAGS=-trimpath
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    GOBIN=/out go install \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${HELM_K8S_MINOR} \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${HELM_K8S_MINOR}" \
      helm.sh/helm/v3/cmd/helm@${HELM_VERSION} \
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
