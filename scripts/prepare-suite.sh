#!/usr/bin/env bash
# Prepare the representation-quality suite's labelled data sets (benchmarks/suite_data.py, issue 12).
# Installs the Debian packages the sets come from (only those missing; needs root or sudo and the Debian
# mirror), then runs the preparation with the project's venv. Arguments go to `suite_data.py prepare`:
#   scripts/prepare-suite.sh [--root DIR] [--only NAME ...] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(dataset-fashion-mnist opencv-doc openclipart-png oxygen-icon-theme faenza-icon-theme tango-icon-theme)
need=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  echo "installing ${need[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }
exec "$PY" benchmarks/suite_data.py prepare "$@"
