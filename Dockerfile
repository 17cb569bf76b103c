# syntax=docker/dockerfile:1
# The mediacache image: built with the Rust toolchain, run from a distroless base as a non-root user.
#   docker build -t mediacache:0.1.0 .

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin mediacache \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin mediacache

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mediacache /usr/local/bin/mediacache
USER 65532:65532
# No transparent huge pages for the allocator's memory even where the host turns them on for
# every process: mimalloc then asks the kernel to keep them off (`PR_SET_THP_DISABLE`).
ENV MIMALLOC_ALLOW_THP=0
# gRPC, and metrics/health when metrics_listen is set.
EXPOSE 50051 9100
ENTRYPOINT ["/usr/local/bin/mediacache"]
# Memory tier only, reachable from outside the container; the Helm chart passes --config.
CMD ["serve", "--listen", "0.0.0.0:50051"]
