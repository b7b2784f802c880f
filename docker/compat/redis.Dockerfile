# Stand-in for redis:7.4-alpine where Docker Hub cannot be reached (scripts/compose-e2e.sh builds it and names it
# in a compose override; users pull the official image). Debian's redis-server (7.0, AOF multi-part files as in
# 7.4); the same contract as the official image for docker-compose.yml: `redis-server` on PATH, `redis-cli` for
# the health check, the `redis` user owning /data (a new volume inherits that owner), protected mode off by
# default (docker/compat/redis-server.sh).
ARG BASE_IMAGE=local/debian:bookworm
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o redis -g redis -m 0750 /data
COPY docker/compat/redis-server.sh /usr/local/bin/redis-server
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
