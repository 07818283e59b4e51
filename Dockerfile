# syntax=docker/dockerfile:1
# The operator image: one static-ish binary on a distroless, non-root base.
#   docker build -t rdphealth-operator:0.1.0 .

ARG RUST_VERSION=1.95

# --- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_PROFILE_RELEASE_STRIP=symbols

# Dependencies first, against stub sources, so this layer is reused until Cargo.toml or
# Cargo.lock change. The bench stub exists because Cargo.toml declares the bench target.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/codec.rs \
    && cargo build --release --locked --bin rdphealth \
    && rm -rf src target/release/rdphealth* target/release/deps/rdphealth-* \
       target/release/deps/librdphealth-* target/release/.fingerprint/rdphealth-operator-*

# The real sources (guest-scripts are compiled in with include_str!).
COPY src ./src
COPY guest-scripts ./guest-scripts
RUN cargo build --release --locked --bin rdphealth \
    && install -D -m 0755 target/release/rdphealth /out/rdphealth

# --- runtime -------------------------------------------------------------------------------
# glibc and libgcc only, no shell, no package manager; runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="rdphealth-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps Azure Windows VMs reachable over Remote Desktop" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/rdphealth /rdphealth
USER 65532:65532
# /metrics, /healthz and /readyz.
EXPOSE 8080
ENTRYPOINT ["/rdphealth"]
CMD ["run"]
