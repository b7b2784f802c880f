# Stand-in for postgres:16-alpine where Docker Hub cannot be reached (scripts/compose-e2e.sh builds it and names
# it in a compose override; users pull the official image). Debian's PostgreSQL 15 behind an entrypoint with the
# official image's contract, the part docker-compose.yml uses: POSTGRES_USER, POSTGRES_DB, POSTGRES_PASSWORD_FILE
# (read as root on first start), PGDATA=/var/lib/postgresql/data, password auth over TCP, `pg_isready` on PATH.
ARG BASE_IMAGE=local/debian:bookworm
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 2775 /run/postgresql
COPY docker/compat/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["postgres-entrypoint"]
# the official image's choice: SIGINT = fast shutdown (SIGTERM would wait for every client to leave)
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
