# schemashift: one static-ish binary (librdkafka and rustls built in).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin schemashift

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/schemashift /usr/local/bin/schemashift
USER nobody
ENTRYPOINT ["schemashift"]
CMD ["--help"]
