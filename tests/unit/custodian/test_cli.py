"""The console's argument handling: misuse exits 2, a refusal exits 1 with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from custodian.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["grant", "d"],
        ["grant", "d", "0"],
        ["grant", "d", "many"],
        ["revoke", "d"],
        ["revoke", "d", "5", "--all"],
        ["deployment", "create", "d", "--model", "m"],
        ["deployment", "create", "d", "--model", "m", "--manifest", "f", "--lease-size", "-3"],
        ["serve", "--listen", "nohost"],
        ["serve", "--listen", "127.0.0.1:99999"],
        ["model"],
        ["audit", "--last", "x"],
        ["--admin", "127.0.0.1:1", "usage"],
        ["audit", "export"],
    ],
    ids=["nothing", "unknown-command", "grant-no-units", "grant-zero", "grant-words", "revoke-neither",
         "revoke-both", "create-no-manifest", "create-negative-lease", "listen-no-port", "listen-port-range",
         "model-no-action", "audit-last-words", "admin-without-credentials", "export-without-out"],
)  # fmt: skip
def test_argument_misuse_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_describes_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in (
        "serve",
        "ca",
        "model",
        "deployment",
        "grant",
        "revoke",
        "suspend",
        "resume",
        "usage",
        "enclaves",
    ):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [["usage"], ["grant", "d", "5"], ["model", "list", "--json"], ["audit"]],
    ids=["usage", "grant", "model-list", "audit"],
)
def test_without_a_custodian_the_console_says_so_in_one_line(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--data", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("custodian: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_a_missing_model_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "admin.sock").touch()
    assert main(["model", "add", str(tmp_path / "absent.onnx"), "--data", str(tmp_path)]) == 1
    assert "cannot read" in capsys.readouterr().err
