# Multi-stage build: compile in the Rust image, run from a distroless base (glibc, no shell,
# non-root user 65532). Mount your own config over /etc/canary-proxy/canary.toml; inside a
# container the listeners must bind 0.0.0.0 (and the admin listener then needs a token).
FROM rust:1.95-slim-bookworm AS build
# The etcd client ([store]) compiles etcd's protobuf definitions at build time: protoc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY tests ./tests
COPY canary.toml ./
RUN cargo build --release --locked --bin canary-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/canary-proxy /usr/local/bin/canary-proxy
COPY canary.toml /etc/canary-proxy/canary.toml
USER nonroot:nonroot
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/canary-proxy"]
CMD ["--config", "/etc/canary-proxy/canary.toml"]
