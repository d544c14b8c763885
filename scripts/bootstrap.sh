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

# The interpreter for .venv; PYTHON overrides. What each candidate is, printed by itself:
# "shared" or "linked" (is libpython a separate shared library?), or nothing when it cannot
# hold pgseal's build (Python 3.11+, venv with pip, Python.h for the compiled modules).
describe_python() {
  "$1" - 2>/dev/null <<'PYEOF'
import os, sys, sysconfig
if sys.version_info >= (3, 11) and sys.implementation.name == "cpython":
    import ensurepip, venv  # noqa: F401  (Debian ships ensurepip apart, in python3-venv)
    if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        with open("/proc/self/maps") as maps:
            print("shared" if "libpython" in maps.read() else "linked")
PYEOF
}
# A distribution's python3 (Debian, Ubuntu, Fedora) is built with profile-guided and
# link-time optimization into one executable. A pyenv or plain source build is, by default,
# neither, and loads libpython as a shared library: calls into the interpreter then go
# through the PLT, and the proxy's encrypted data path costs 15-20% more CPU per
# transaction (bench/README.md). So a candidate with libpython linked in comes first.
pick_python() {
  local cand kind first=""
  for cand in python3 /usr/bin/python3 python3.13 python3.12 python3.11; do
    command -v "$cand" >/dev/null 2>&1 || continue
    kind="$(describe_python "$cand" || true)"
    [ -n "$kind" ] || continue
    if [ "$kind" = linked ]; then echo "$cand"; return; fi
    [ -n "$first" ] || first="$cand"
  done
  echo "${first:-python3}"
}
if [ ! -x .venv/bin/python ]; then
  PY="${PYTHON:-$(pick_python)}"
  echo "pgseal: creating .venv with $PY ($(command -v "$PY"))" >&2
  "$PY" -m venv .venv
elif [ -z "${PYTHON:-}" ] && [ "$(describe_python .venv/bin/python || true)" = shared ]; then
  better="$(pick_python)"
  if [ "$(describe_python "$better" || true)" = linked ]; then
    echo "pgseal: .venv runs on a Python with a shared libpython; $better has it linked in" \
      "and runs the proxy faster: rm -rf .venv && make bootstrap" >&2
  fi
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
