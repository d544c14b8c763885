"""The demo's folder: only a new, empty or earlier demo's folder is taken, and only what
the demo puts there is ever removed (proxy/demo.py DemoDir)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy.demo import DEMO_ENTRIES, MARKER, DemoDir, cmd_demo
from proxy.errors import PgsealError


def _run_leaving_files(folder: DemoDir) -> None:
    """What a demo leaves behind when it is killed: its entries and its marker."""
    for name in DEMO_ENTRIES:
        if "." in name:
            (folder.base / name).write_text("{}\n")
        else:
            (folder.base / name).mkdir()
            (folder.base / name / "inside").write_text("x")


def _killed(folder: DemoDir) -> None:
    """The demo process died: its lock went with it; its files stayed."""
    assert folder._lock is not None
    os.close(folder._lock)
    folder._lock = None


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_a_new_folder_is_created_marked_and_removed(tmp_path: Path) -> None:
    folder = DemoDir(tmp_path / "a" / "demo")
    folder.claim()
    assert folder.created and (folder.base / MARKER).is_file()
    _run_leaving_files(folder)
    folder.release()
    assert not folder.base.exists()
    assert (tmp_path / "a").is_dir()  # only the demo's own folder goes


def test_an_empty_folder_is_cleared_again_but_kept(tmp_path: Path) -> None:
    base = tmp_path / "empty"
    base.mkdir()
    folder = DemoDir(base)
    folder.claim()
    assert not folder.created
    _run_leaving_files(folder)
    folder.release()
    assert base.is_dir() and _names(base) == []


def test_what_the_user_puts_in_the_folder_meanwhile_stays(tmp_path: Path) -> None:
    folder = DemoDir(tmp_path / "demo")
    folder.claim()
    _run_leaving_files(folder)
    (folder.base / "notes.txt").write_text("mine")
    (folder.base / ".git").mkdir()
    folder.release()
    assert _names(folder.base) == [".git", "notes.txt"]  # the folder too: it is not empty


@pytest.mark.parametrize("entry", ["precious.txt", "pg", ".hidden", "hsm"])
def test_a_folder_with_anything_in_it_is_refused_untouched(tmp_path: Path, entry: str) -> None:
    base = tmp_path / "mine"
    base.mkdir()
    (base / entry).write_text("keep me")
    with pytest.raises(PgsealError, match="not empty"):
        DemoDir(base).claim()
    assert _names(base) == [entry]


def test_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(PgsealError, match="not a folder"):
        DemoDir(path).claim()
    assert path.read_text() == "x"


def test_an_earlier_demos_leftovers_are_cleared_and_its_origin_kept(tmp_path: Path) -> None:
    killed = DemoDir(tmp_path / "demo")
    killed.claim()
    _run_leaving_files(killed)
    _killed(killed)
    again = DemoDir(tmp_path / "demo")
    again.claim()
    assert again.created  # still the demo's own creation
    assert _names(again.base) == [MARKER]
    again.release()
    assert not again.base.exists()


def test_an_earlier_demos_folder_holding_other_files_is_refused(tmp_path: Path) -> None:
    # Killed demo, then `pgseal hsm init` with defaults put a real token in .pgseal/hsm.
    killed = DemoDir(tmp_path / ".pgseal")
    killed.claim()
    _run_leaving_files(killed)
    (killed.base / "hsm").mkdir()
    (killed.base / "hsm" / "token").write_text("the real master key")
    _killed(killed)
    other = DemoDir(killed.base)
    with pytest.raises(PgsealError, match=r"files no demo made \(hsm\)"):
        other.claim()
    assert (killed.base / "hsm" / "token").read_text() == "the real master key"


def test_a_marker_the_demo_did_not_write_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    base.mkdir()
    (base / MARKER).write_text("something else\n")
    with pytest.raises(PgsealError, match="not a demo's marker"):
        DemoDir(base).claim()
    assert (base / MARKER).read_text() == "something else\n"


def test_a_second_demo_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    running = DemoDir(tmp_path / "demo")
    running.claim()
    _run_leaving_files(running)
    with pytest.raises(PgsealError, match="another pgseal demo is running"):
        DemoDir(running.base).claim()
    assert _names(running.base) == sorted([MARKER, *DEMO_ENTRIES])  # nothing touched
    running.release()
    assert not running.base.exists()


def test_a_kept_trail_keeps_the_marker_so_the_next_demo_clears_it(tmp_path: Path) -> None:
    folder = DemoDir(tmp_path / "demo")
    folder.claim()
    _run_leaving_files(folder)
    folder.release(keep=("audit.jsonl",))
    assert _names(folder.base) == sorted([MARKER, "audit.jsonl"])
    again = DemoDir(folder.base)
    again.claim()
    again.release()
    assert not folder.base.exists()


def test_an_unwritable_place_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cmd_demo(SimpleNamespace(dir=str(blocker / "demo")), None) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgseal: demo --dir ") and "\n" not in err, err
    assert blocker.read_text() == "x"  # refused before anything was started or configured
