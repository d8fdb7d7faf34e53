"""`--out` files: never written through a name planted at `<out>.partial` or at `<out>` (issue 13, item 8)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from custodian.errors import ConsoleError, LedgerError
from custodian.output_file import replacing, write_replacing


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file the attacker wants the console's user to overwrite."""
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def test_writes_the_file_0600_and_leaves_no_partial(tmp_path: Path) -> None:
    out = tmp_path / "manifest.toml"
    write_replacing(out, b"hello")
    assert out.read_bytes() == b"hello"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["manifest.toml"]


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "manifest.toml"
    out.write_text("old")
    write_replacing(out, b"new")
    assert out.read_bytes() == b"new"


def test_a_symlink_planted_at_the_partial_name_is_refused_not_followed(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "manifest.toml"
    planted = tmp_path / "manifest.toml.partial"
    planted.symlink_to(victim)
    with pytest.raises(ConsoleError, match=r"manifest\.toml\.partial exists"):
        write_replacing(out, b"attacker-chosen bytes")
    assert victim.read_text() == "precious"
    assert planted.is_symlink()
    assert not out.exists()


def test_a_dangling_symlink_at_the_partial_name_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    (tmp_path / "out.partial").symlink_to(target)
    with pytest.raises(ConsoleError, match="exists"):
        write_replacing(tmp_path / "out", b"x")
    assert not target.exists()


def test_a_symlink_at_the_output_name_is_replaced_not_written_through(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "manifest.toml"
    out.symlink_to(victim)
    write_replacing(out, b"manifest")
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert out.read_bytes() == b"manifest"


def test_a_failure_while_writing_keeps_the_old_file_and_removes_the_partial(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.write_text("old export")

    def export() -> None:
        with replacing(out) as handle:
            handle.write(b'{"seq":1}\n')
            raise LedgerError("audit chain broken at entry 2")

    with pytest.raises(LedgerError, match="broken"):
        export()
    assert out.read_text() == "old export"
    assert os.listdir(tmp_path) == ["audit.jsonl"]


def test_an_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConsoleError, match=r"cannot write .*absent/out: No such file or directory"):
        write_replacing(tmp_path / "absent" / "out", b"x")
