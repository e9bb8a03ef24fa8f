# Multi-stage build: a static-ish release binary on a distroless runtime that
# runs as a non-root user. Config and certificates are mounted, never baked in.
#
#   docker build -t arcgis-app-proxy .
#   docker run --rm -p 8443:8443 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/proxy.toml:/etc/arcgis-app-proxy/proxy.toml:ro" \
#     -v "$PWD/certs:/etc/arcgis-app-proxy/certs:ro" \
#     -e ARCGIS_CLIENT_SECRET \
#     arcgis-app-proxy
#
# In the container, set admin_listen = "0.0.0.0:9090" so probes can reach it,
# and publish that port only to the orchestrator, never to the internet.

FROM rust:1.95-slim-bookworm AS build
# The release binary is profile-guided (bench/pgo-build): trained on the
# demo under wrk and h2load, it spends 10-11 % less CPU per request than a
# plain build (BENCHMARKS.md, run CL). `--build-arg PGO=0` builds it plainly.
ARG PGO=1
# `--build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD)`: the build
# context has no .git, so `--version` and arcgis_proxy_build_info would
# say "unknown".
ARG GIT_COMMIT=unknown
ENV AAP_GIT_COMMIT=$GIT_COMMIT
RUN if [ "$PGO" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends wrk nghttp2-client python3 \
      && rm -rf /var/lib/apt/lists/* \
      && rustup component add llvm-tools; \
    fi
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when the
# manifest or the lockfile change, not for every source edit. (The manifest
# names the bench targets, so they come along; src/ is a stub until the
# real one is copied.)
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY benches ./benches
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo fetch --locked \
 && rm -rf src
COPY src ./src
COPY demo ./demo
COPY bench/pgo-build ./bench/pgo-build
RUN if [ "$PGO" = 1 ]; then \
      bench/pgo-build && cp target/pgo/release/arcgis-app-proxy /arcgis-app-proxy; \
    else \
      cargo build --release --locked --bin arcgis-app-proxy \
      && cp target/release/arcgis-app-proxy /arcgis-app-proxy; \
    fi \
 && strip /arcgis-app-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="arcgis-app-proxy" \
      org.opencontainers.image.description="Authenticating reverse proxy for ArcGIS: anonymous web apps, no token ever shown" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.revision="$GIT_COMMIT"
COPY --from=build /arcgis-app-proxy /usr/local/bin/arcgis-app-proxy
USER nonroot:nonroot
EXPOSE 8443 9090
STOPSIGNAL SIGTERM
# The image has no shell or curl: the binary probes its own admin listener
# (admin_listen = "0.0.0.0:9090" in the container, see above).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["/usr/local/bin/arcgis-app-proxy", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/arcgis-app-proxy"]
CMD ["--config", "/etc/arcgis-app-proxy/proxy.toml"]
