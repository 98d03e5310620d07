# The image deploy/kubernetes runs, ghcr.io/lifeboat-dr/lifeboat:0.1.0 (the tag is the
# version in Cargo.toml):
#
#   docker build -t ghcr.io/lifeboat-dr/lifeboat:0.1.0 .      # or: podman build ...
#
# At the repository root: the build context is the whole crate (Cargo.toml, Cargo.lock,
# .cargo/config.toml, src/, benches/), and .dockerignore beside it keeps target/, .git/
# and the overlays' tls/ and tokens/ (key material) out of the context.

# Builder: the release binary. Debian 12 like the runtime stage, so the glibc it links
# against is the one it runs on.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
# RocksDB's bindings are generated with libclang, and .cargo/config.toml builds its C++
# with clang++.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target dir are build caches (BuildKit, podman): a rebuild after a
# source change does not compile RocksDB again. The binary leaves the cache in this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lifeboat \
 && install -D -m 0755 target/release/lifeboat /out/lifeboat

# Runtime: glibc, libgcc and libstdc++ (RocksDB is C++) and nothing else: no shell, no
# package manager. Only the binary is copied in.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/lifeboat /usr/local/bin/lifeboat
# distroless's "nonroot", by number so the kubelet's runAsNonRoot can check it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lifeboat"]
CMD ["--help"]
