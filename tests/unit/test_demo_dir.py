"""The demo's folder: only a new, empty or earlier demo's folder is taken, and only what
the demo put there is removed (proxy/demo.py claim_dir / release_dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.demo import MARKER, claim_dir, release_dir
from proxy.errors import PgsealError


def test_a_new_folder_is_created_marked_and_removed(tmp_path: Path) -> None:
    base = tmp_path / "a" / "demo"
    assert claim_dir(base) is True
    assert (base / MARKER).is_file()
    (base / "pg").mkdir()
    (base / "pg" / "postgres.log").write_text("log")
    (base / "audit.jsonl").write_text("{}\n")
    release_dir(base, True)
    assert not base.exists()
    assert (tmp_path / "a").is_dir()  # only the demo's own folder goes


def test_an_empty_folder_is_emptied_again_but_kept(tmp_path: Path) -> None:
    base = tmp_path / "empty"
    base.mkdir()
    assert claim_dir(base) is False
    (base / "hsm").mkdir()
    release_dir(base, False)
    assert base.is_dir() and list(base.iterdir()) == []


@pytest.mark.parametrize("entry", ["precious.txt", "pg", ".hidden"])
def test_a_folder_with_anything_else_is_refused_untouched(tmp_path: Path, entry: str) -> None:
    base = tmp_path / "mine"
    base.mkdir()
    if "." in entry:
        (base / entry).write_text("keep me")
    else:
        (base / entry).mkdir()
    with pytest.raises(PgsealError, match="not empty"):
        claim_dir(base)
    assert [p.name for p in base.iterdir()] == [entry]
    release_dir(base, False)  # a refused folder has no marker: release leaves it alone
    assert [p.name for p in base.iterdir()] == [entry]


def test_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(PgsealError, match="not a folder"):
        claim_dir(path)
    assert path.read_text() == "x"


def test_an_earlier_demos_leftovers_are_cleared_and_its_origin_kept(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    assert claim_dir(base) is True  # an earlier demo, killed before it could clean up
    (base / "pg").mkdir()
    (base / "audit.jsonl").write_text("{}\n")
    assert claim_dir(base) is True  # the folder is still the demo's own creation
    assert [p.name for p in base.iterdir()] == [MARKER]
    release_dir(base, True)
    assert not base.exists()

    given = tmp_path / "given"
    given.mkdir()
    assert claim_dir(given) is False
    (given / "hsm").mkdir()
    assert claim_dir(given) is False  # the user's folder: emptied, never removed
    release_dir(given, False)
    assert given.is_dir() and list(given.iterdir()) == []


def test_an_unwritable_place_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from proxy.demo import cmd_demo

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cmd_demo(SimpleNamespace(dir=str(blocker / "demo")), None) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgseal: demo --dir ") and "\n" not in err, err
    assert blocker.read_text() == "x"  # refused before anything was started or configured
