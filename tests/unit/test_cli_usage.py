"""Usage errors: exit 2 and one line on stderr (DESIGN.md 3), before any config is read."""

from __future__ import annotations

import pytest

from proxy.cli import main


@pytest.mark.parametrize(("argv", "says"), [
    ([], "a command is required"),
    (["keys"], "an action is required"),
    (["audit", "verify"], "FILE or --postgres"),
    (["keys", "rotate", "--tenant", "t", "--destroy-old"], "--destroy-old needs --rekey"),
    (["migrate", "encrypt", "nodots"], "'nodots': expected SCHEMA.TABLE.COLUMN"),
    (["migrate", "decrypt", 'public."t.c'], "unterminated quote"),
])
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGSEAL_CONFIG", "/nonexistent/pgseal.yaml")  # never read
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err, err
