# syntax=docker/dockerfile:1
# Packaging only: the binaries are compiled outside the image build and copied onto a
# minimal base (the pattern of kube-rs's controller-rs). The build context needs no source
# tree and no Cargo manifest, so a change to the crate's layout cannot break the image.
#
#   cargo build --release --locked --bins && docker build -t webhook-operator .
#   hack/image.sh build               # the same with buildah, dev profile (what CI builds)
#
# BIN_DIR is the cargo profile directory the binaries come from (relative to the context;
# .dockerignore lets only the binaries of target/release and target/debug through).
ARG BASE=docker.io/library/debian:bookworm-slim

# CA roots for the provider APIs (TLS is verified against the system store). They come from
# Debian's ca-certificates in a stage of their own, so the runtime stage needs no RUN, no
# package manager and no network, and carries the bundle without openssl and apt's state.
FROM ${BASE} AS certs
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /out/var/lib/webhook-operator

FROM ${BASE}
ARG BIN_DIR=target/release
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The embedded queue's directory (the chart mounts a volume here), owned by the runtime user.
COPY --from=certs --chown=65532:65532 /out/var/lib/webhook-operator /var/lib/webhook-operator
# Every binary of the image: to ship another one, add its name to this line.
COPY ${BIN_DIR}/webhook-operator /usr/local/bin/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# Nothing in the image is written at run time: it runs with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/webhook-operator"]
CMD ["run"]
