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

# The interpreter .venv is created with (PYTHON= chooses it; it only counts when .venv is
# created). Candidates, in order:
PGSEAL_PYTHONS="${PGSEAL_PYTHONS:-python3 /usr/bin/python3 python3.13 python3.12 python3.11}"
# What a candidate is, printed by itself: "shared X.Y" or "linked X.Y" (is libpython a
# separate shared library?), or nothing when it cannot hold pgseal's build (CPython 3.11+,
# venv with pip, Python.h for the compiled modules).
describe_python() {
  "$1" - 2>/dev/null <<'PYEOF'
import os, sys, sysconfig
if sys.version_info >= (3, 11) and sys.implementation.name == "cpython":
    import ensurepip, venv  # noqa: F401  (Debian ships ensurepip apart, in python3-venv)
    if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        with open("/proc/self/maps") as maps:
            kind = "shared" if "libpython" in maps.read() else "linked"
        print(kind, "%d.%d" % sys.version_info[:2])
PYEOF
}
# Debian's and Ubuntu's python3 is built with profile-guided and link-time optimization
# into one executable. A pyenv build is, by default, neither, and loads libpython as a
# shared library: the proxy's encrypted data path then costs 15-20% more CPU per
# transaction (bench/README.md). A libpython linked in is only a sign of the first kind
# (a plain source build has it too, Fedora's optimized python3 has it shared), so it
# decides only between candidates of the same version as the first usable one, which
# stays the choice otherwise: a newer Python is never picked for it.
pick_python() {
  local cand kind first="" first_version=""
  for cand in $PGSEAL_PYTHONS; do
    command -v "$cand" >/dev/null 2>&1 || continue
    kind="$(describe_python "$cand" || true)"
    [ -n "$kind" ] || continue
    if [ -z "$first" ]; then
      first="$cand" first_version="${kind#* }"
    fi
    if [ "$kind" = "linked $first_version" ]; then echo "$cand"; return; fi
  done
  echo "${first:-python3}"
}
python_identity() {
  "$1" -c 'import os, platform, sys; print(platform.python_version(), os.path.realpath(sys.executable))' 2>/dev/null || true
}
if [ ! -x .venv/bin/python ]; then
  PY="${PYTHON:-$(pick_python)}"
  echo "pgseal: creating .venv with Python $(python_identity "$PY")" >&2
  "$PY" -m venv .venv
elif [ -n "${PYTHON:-}" ]; then
  if [ "$(python_identity .venv/bin/python)" != "$(python_identity "$PYTHON")" ]; then
    echo "pgseal: .venv exists with Python $(python_identity .venv/bin/python); PYTHON=$PYTHON" \
      "counts only when .venv is created: rm -rf .venv first" >&2
  fi
else
  mine="$(describe_python .venv/bin/python || true)"
  better="$(pick_python)"
  if [ "${mine%% *}" = shared ] && [ "$(describe_python "$better" || true)" = "linked ${mine#* }" ]; then
    echo "pgseal: .venv runs on a Python with a shared libpython; $better has it linked in" \
      "and may run the proxy faster: rm -rf .venv && make bootstrap" >&2
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
