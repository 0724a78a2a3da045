# Builds etl-serve and the example plugins, and serves `wordcount`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace

FROM debian:bookworm-slim
COPY --from=build /src/target/release/etl-serve /usr/local/bin/etl-serve
COPY --from=build /src/target/release/libwordcount.so /opt/etl/plugins/libwordcount.so
ENV ETL_SERVE_PLUGIN=/opt/etl/plugins/libwordcount.so UVICORN_HOST=0.0.0.0 UVICORN_PORT=8080
USER 65532:65532
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["etl-serve"]
