#!/bin/sh
# Create the stack's secrets as files on first start (docker compose's `secrets-init` service).
#
# Why: secrets must be files, never environment values baked into the compose file or an image
# (reliability.md row 32), and `docker compose up` must work without a manual step. Files that
# already exist are kept, so a user may put their own API keys / password into the volume first.
# Files are owned by the service user (uid 10001) and readable by it alone; PostgreSQL reads its
# password as root during its first start.
set -eu
dir="${1:-/secrets}"
umask 077
mkdir -p "$dir"
token() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
if [ ! -s "$dir/postgres_password" ]; then
  token > "$dir/postgres_password.tmp" && mv "$dir/postgres_password.tmp" "$dir/postgres_password"
  echo "created $dir/postgres_password"
fi
if [ ! -s "$dir/api_keys" ]; then
  token > "$dir/api_keys.tmp" && mv "$dir/api_keys.tmp" "$dir/api_keys"
  echo "created $dir/api_keys (one API key per line; read it with: docker compose exec api cat /secrets/api_keys)"
fi
chmod 0400 "$dir/postgres_password" "$dir/api_keys"
