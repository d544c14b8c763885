#!/usr/bin/env bash
# Installs what pgseal needs on a fresh Debian/Ubuntu machine: system packages
# (only when root or sudo is available; otherwise a clear message naming them),
# then a virtualenv with pgseal and its test dependencies.
# Usage: scripts/bootstrap.sh [run|test|bench]
set -euo pipefail
purpose="${1:-run}"
cd "$(dirname "$0")/.."

need=()
have_pg_server() { compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null; }
have_pg_server || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || compgen -G "/usr/lib/*/softhsm/libsofthsm2.so" >/dev/null || need+=(softhsm2)
if [ "$purpose" = bench ] || [ "$purpose" = test ]; then
  command -v pgbouncer >/dev/null || need+=(pgbouncer)
fi

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO=none; fi
  if [ "$SUDO" = none ]; then
    echo "pgseal: missing system packages: ${need[*]}" >&2
    echo "pgseal: install them with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "pgseal: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pgseal-installed
# Reinstalled when the project changed, or when the compiled build no longer matches its
# sources (an edit or a pull since: proxy/_native.py would otherwise run the pure build).
stale_build() { ! .venv/bin/python -W ignore -c 'import sys, proxy._native as n; sys.exit(bool(n.build_problems()))' 2>/dev/null; }
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || stale_build; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
