#!/bin/sh
# /usr/local/bin/redis-server in docker/compat/redis.Dockerfile: Debian's redis-server with protected mode off
# unless the command line sets it, as the official image builds Redis (other containers reach it over the
# compose network, not over loopback; with protected mode on and no password they are refused).
case " $* " in *" --protected-mode "*) exec /usr/bin/redis-server "$@" ;; esac
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a config file comes first
  conf=$1; shift
  exec /usr/bin/redis-server "$conf" "$@" --protected-mode no
fi
exec /usr/bin/redis-server "$@" --protected-mode no
