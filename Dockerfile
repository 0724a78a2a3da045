# etl-serve serving the example `wordcount` plugin.
#
# To serve your own plugin, copy its library into the image and point
# ETL_SERVE_PLUGIN at it (or pass --plugin PATH as the command).

# ---- build: etl-serve and the example plugins ---------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace \
    && install -D -m 0755 target/release/etl-serve /out/etl-serve \
    && install -D -m 0644 target/release/libwordcount.so /out/plugins/libwordcount.so

# ---- run: glibc and libgcc only, no shell, non-root ---------------------
FROM gcr.io/distroless/cc-debian12:nonroot
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
ENTRYPOINT ["/usr/local/bin/etl-serve"]
