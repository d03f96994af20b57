# The one cleanroom binary: `cleanroom scheduler`, `cleanroom executor`,
# `cleanroom serve` and the operator commands.
#   docker build -t cleanroom .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cleanroom && cp target/release/cleanroom /cleanroom

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /cleanroom /usr/local/bin/cleanroom
# An unprivileged user; Kubernetes pods run as 65532 too.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cleanroom"]
CMD ["--help"]
