# regcache container image.
#
#   docker build -t regcache .
#   docker run -d -p 5000:5000 -v regcache:/var/lib/regcache regcache
#
# Two stages: the official Rust image builds the binary; the runtime image is
# distroless-style (FROM scratch): the binary, the few shared libraries it
# links (glibc, libgcc_s), the CA bundle for HTTPS upstreams, a passwd entry
# for the non-root user, /tmp (worker sockets) and the cache volume. No shell,
# no package manager; the HEALTHCHECK uses `regcache healthcheck`.
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts,
# which keep cargo's target dir and crate downloads between builds. A vendored
# tree (`cargo vendor` + .cargo/config.toml in the context) builds offline.
#
# CARGO_PROFILE: `release` (default: optimised, fat LTO, one codegen unit) for real images;
# scripts/test-deploy passes a quicker profile to test the image in CI.

FROM rust:1-bookworm AS build
ARG CARGO_PROFILE=release
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=regcache-target,sharing=locked,target=/src/target \
    --mount=type=cache,id=regcache-cargo-registry,sharing=locked,target=/usr/local/cargo/registry \
    set -eu; \
    cargo build --locked --profile "$CARGO_PROFILE" --bin regcache; \
    case "$CARGO_PROFILE" in dev|test) out=debug ;; bench) out=release ;; *) out="$CARGO_PROFILE" ;; esac; \
    install -D -m 0755 "target/$out/regcache" /rootfs/usr/local/bin/regcache; \
    strip /rootfs/usr/local/bin/regcache
# The runtime filesystem: every shared library the binary links (from ldd, so
# nothing is missed), the CA bundle, users, a sticky /tmp and the cache dir
# owned by the runtime user (a new named volume takes over that ownership).
RUN set -eu; \
    for lib in $(ldd /rootfs/usr/local/bin/regcache | grep -o '/[^ ]*'); do \
        cp -L --parents "$lib" /rootfs; \
    done; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp /rootfs/var/lib/regcache; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nregcache:x:65532:65532:regcache:/var/lib/regcache:/sbin/nologin\n' > /rootfs/etc/passwd; \
    printf 'root:x:0:\nregcache:x:65532:\n' > /rootfs/etc/group; \
    printf 'hosts: files dns\n' > /rootfs/etc/nsswitch.conf; \
    chmod 1777 /rootfs/tmp; \
    chown 65532:65532 /rootfs/var/lib/regcache

FROM scratch
COPY --from=build /rootfs /
ENV REGCACHE_LISTEN=0.0.0.0:5000 \
    REGCACHE_STORAGE=/var/lib/regcache \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /var/lib/regcache
VOLUME ["/var/lib/regcache"]
EXPOSE 5000
# regcache handles SIGTERM itself (drains in-flight requests, stops workers,
# exits 0); give it REGISTRY_HTTP_DRAINTIMEOUT (30 s) + a few seconds to stop.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/regcache", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/regcache"]
CMD ["serve"]
