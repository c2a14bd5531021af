# CI only (scripts/test-deploy): an S3-compatible server inside the Swarm
# stack, s3s-fs (crates.io, built on the host and kept in the CI cache):
# buckets are directories under /data, objects files.
FROM debian:bookworm-slim
COPY s3s-fs /usr/local/bin/s3s-fs
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/s3s-fs", "--host", "0.0.0.0", "--port", "9000"]
