#!/usr/bin/env bash
# Debian packages the tests use: Chromium for the browser tests, Fashion-MNIST (IDX files) for data tests, OpenCV's
# digit sheet (opencv-doc, 96 MB) for the quality guard (tests/benchmarks/test_quality_guard.py: the suite's
# opencv-digits set), three icon themes for the suite-data tests,
# docker-compose (v1, static validation of docker-compose.yml only), Redis and PostgreSQL servers.
# Installs only what is missing; needs root (or sudo) and the Debian mirror.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/doc/opencv-doc/examples/data/digits.png ] || need+=(opencv-doc)
for theme in oxygen-icon-theme:oxygen/base faenza-icon-theme:Faenza tango-icon-theme:Tango; do
  [ -d "/usr/share/icons/${theme#*:}" ] || need+=("${theme%%:*}")
done
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v redis-server >/dev/null || need+=(redis-server)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
