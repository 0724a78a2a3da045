# syntax=docker/dockerfile:1
# etl-serve serving the example `wordcount` plugin (the default target), or
# a Python plugin through the Python bridge (the `python` target).
#
# To serve your own plugin, copy its library into the image and point
# ETL_SERVE_PLUGIN at it (or pass --plugin PATH as the command).
#
#   docker build -t etl-serve .
#   docker run --rm -p 8080:8080 etl-serve
#
#   docker build --target python -t etl-serve-python .
#   docker run --rm -p 8080:8080 etl-serve-python

# ---- build: only what ships ----------------------------------------------
# Pinned to the toolchain the project is tested with. Its Debian release
# (bookworm, 12) must be the runtime's: the binary is linked against the
# builder's glibc and would need symbols an older runtime glibc lacks.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# The registry and the target directory are cache mounts: a change to docs
# or to one crate rebuilds only what it touches. The binary and the plugin
# are stripped (31.1 MB to 6.7 MB, and 2.7 MB to 0.49 MB); the binary's
# debug info stays in the build stage, under /out/debug.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p etl-serve -p wordcount \
    && install -D -m 0755 target/release/etl-serve /out/etl-serve \
    && install -D -m 0644 target/release/libwordcount.so /out/plugins/libwordcount.so \
    && mkdir -p /out/debug \
    && objcopy --only-keep-debug /out/etl-serve /out/debug/etl-serve.debug \
    && strip --strip-unneeded /out/etl-serve /out/plugins/libwordcount.so

# ---- build the Python bridge ---------------------------------------------
# Against Debian 12's Python 3.11, the minor version of the python image
# below: libpython's soname (libpython3.11.so.1.0) and ABI are those of
# every 3.11 release.
FROM build AS build-python
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-dev=3.11.2-1+b1 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p etl-python \
    && install -D -m 0644 target/release/libetl_python.so /out/python/libetl_python.so \
    && strip --strip-unneeded /out/python/libetl_python.so

# ---- run a Python plugin: docker build --target python ------------------
# The plugin's virtualenv holds what etl-uvicorn plugins import (the
# reference package, pinned) and the plugin's own requirements; the example
# is the reference's word count. For your plugin, build FROM this target,
# COPY its code into /opt/etl/plugin, install its requirements with
# /opt/venv/bin/pip, and set ETL_SERVE_PLUGIN_CONFIG to its APP and
# etl-uvicorn options.
FROM python:3.11.11-slim-bookworm AS python
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir unstructured-platform-plugins==0.1.0
COPY --from=build-python /out/etl-serve /usr/local/bin/etl-serve
COPY --from=build-python /out/python/libetl_python.so /opt/etl/libetl_python.so
COPY bench/reference/etl_bench_plugins.py /opt/etl/plugin/
WORKDIR /opt/etl/plugin
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ETL_SERVE_PLUGIN=/opt/etl/libetl_python.so \
    ETL_SERVE_PLUGIN_CONFIG=etl_bench_plugins:wordcount \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8080 \
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=30
# Numeric, so that runAsNonRoot can verify it; no home directory needed.
USER 65532:65532
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/etl-serve", "--probe"]
ENTRYPOINT ["/usr/local/bin/etl-serve"]

# ---- run: glibc and libgcc only, no shell, non-root ---------------------
# The last stage, so the default target.
# Debian 12, as the builder above. distroless publishes no version tags, so
# the image is pinned by digest: a rebuild gets the same bytes. To move to
# a newer one, look its digest up with
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot
# and replace the one below.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /out/etl-serve /usr/local/bin/etl-serve
COPY --from=build /out/plugins/ /opt/etl/plugins/
ENV ETL_SERVE_PLUGIN=/opt/etl/plugins/libwordcount.so \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8080 \
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=30
# 65532 is distroless's "nonroot"; numeric so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
# Kubernetes and `docker stop` send SIGTERM; etl-serve drains on it.
STOPSIGNAL SIGTERM
# No shell or curl in the image: etl-serve asks itself (GET /readyz on the
# address the same variables describe; exit 0 when ready).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/etl-serve", "--probe"]
ENTRYPOINT ["/usr/local/bin/etl-serve"]
