# CI only (scripts/test-deploy): Debian's docker-registry (distribution 2.8)
# as a stand-in upstream inside compose/Swarm networks. Auth and TLS come
# from REGISTRY_* variables; storage is a bind mount at /data seeded by the
# script.
FROM debian:bookworm-slim
COPY docker-registry /usr/local/bin/docker-registry
COPY registry.yml /etc/registry.yml
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/docker-registry", "serve", "/etc/registry.yml"]
