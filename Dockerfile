# syntax=docker/dockerfile:1
# Multi-stage: build the release binary, then copy it alone onto a slim base that runs it
# as an unprivileged user. The chart runs it with a read-only root filesystem.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source-only changes reuse the cached layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# Touch so cargo rebuilds the crate itself, not the cached stub.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin webhook-operator

FROM debian:bookworm-slim
# CA roots for the provider APIs (TLS is verified against the system store).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/webhook-operator && chown 65532:65532 /var/lib/webhook-operator
COPY --from=build /src/target/release/webhook-operator /usr/local/bin/webhook-operator
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/webhook-operator"]
CMD ["run"]
