"""`pgseal demo` run as a user runs it: the example application's plaintext through the
proxy and cells in PostgreSQL, a psql-style session as tenant acme, the audit trail
verified on Ctrl-C, and the demo's folder gone afterwards."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.localpg import free_port

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).parent / "pgseal"
PGSEAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]
READY = "pgseal demo is running"


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    """stdout lines up to and including the first one holding `needle`."""
    lines: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if needle in line:
                break
        found.set()  # the needle, or the end of the output (the demo stopped)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not found.wait(timeout) or not lines or needle not in lines[-1]:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no {needle!r}; output:\n" + "\n".join(lines) + f"\n{err}")
    return lines


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root the demo runs PostgreSQL as the postgres user,
    # who cannot enter pytest's private (0700) base folder.
    path = Path(tempfile.mkdtemp(prefix="pgseal-test-demo-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_shows_plaintext_through_the_proxy_and_cells_in_postgres(scratch: Path) -> None:
    base = scratch / "demo"  # new: the demo creates it and removes it when it stops
    port = free_port()
    proc = subprocess.Popen(
        [*PGSEAL, "demo", "--dir", str(base), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PGSEAL_")},
    )
    try:
        out = _read_until(proc, READY, timeout=180)
        text = "\n".join(out)
        # examples/demo_app.py: the application reads its plaintext back ...
        assert "What the application sees" in text
        assert "123-45-6789" in text and "Alice Example" in text
        # ... and the same row read straight from PostgreSQL holds cells, not the SSN.
        stored = text.split("What PostgreSQL stores", 1)[1]
        assert "123-45-6789" not in stored and "Alice Example" not in stored
        assert (base / ".pgseal-demo").is_file()

        rest = _read_until(proc, "Ctrl-C", timeout=10)
        dsns = re.findall(r'psql "([^"]+)"', "\n".join(out + rest))
        proxy_dsn, direct_dsn = dsns[0], dsns[1]
        assert f":{port}/" in proxy_dsn
        # What the printed psql line does: tenant acme sees its own row, in plaintext.
        with psycopg.connect(proxy_dsn, connect_timeout=10) as conn:
            rows = conn.execute("SELECT ssn, name FROM patients ORDER BY id").fetchall()
        assert rows == [("123-45-6789", "Alice Example")]
        with psycopg.connect(direct_dsn, connect_timeout=10) as conn:
            cells = conn.execute("SELECT ssn, name FROM patients").fetchall()
        assert len(cells) == 2 and all(isinstance(v, bytes) for row in cells for v in row)
        assert not any(b"123-45-6789" in v or b"Alice" in v for row in cells for v in row)
        # The commands it prints work against it as printed.
        printed = [line.strip() for line in out + rest
                   if " explain --policies " in line or " policy check --policies " in line]
        assert len(printed) == 2, printed
        for line in printed:
            result = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, (line, result.stdout, result.stderr)
        assert "policy ok" in result.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            tail, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            tail, err = proc.communicate()
    assert proc.returncode == 0, err
    # Ctrl-C: audit.stop written, the trail verified, everything removed.
    verified = [line for line in tail.splitlines() if line.startswith("pgseal audit verify:")]
    assert verified and ": ok, " in verified[0] and "ends with audit.stop" in verified[0], tail
    assert "stopped and cleaned up" in tail
    assert not base.exists()
    assert "Traceback" not in err
    assert list(scratch.iterdir()) == []


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("important\n")
    result = subprocess.run(
        [*PGSEAL, "demo", "--dir", str(mine)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("pgseal: ") and "\n" not in err and "not empty" in err, err
    assert result.stdout == ""  # refused before anything was started
    assert (mine / "precious.txt").read_text() == "important\n"
    assert sorted(p.name for p in mine.iterdir()) == ["precious.txt"]
