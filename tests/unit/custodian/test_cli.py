"""The console's argument handling: misuse exits 2, a refusal exits 1 with one line."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from custodian.cli import _parser, main
from custodian.config import MAX_GRANT_UNITS

# Remote options, complete: only their use is wrong in the commands that take them.
_REMOTE = ["--admin", "127.0.0.1:1", "--admin-key", "k", "--admin-cert", "c", "--custodian-ca", "a"]


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
        ["grant", "d", str(10**30)],
        ["grant", "d", str(2**64)],
        ["revoke", "d", str(2**64)],
        ["grant", "d", "\u0661"],
        ["deployment", "create", "d", "--model", "m", "--manifest", "f", "--lease-size", "4294967296"],
        ["deployment", "create", "d", "--model", "m", "--manifest", "f", "--offline-grace", "1000000000000"],
        ["deployment", "create", "d", "--model", "m", "--manifest", "f", "--offline-grace", "2"],
        ["deployment", "create", "d", "--model", "m", "--manifest", "f", "--zeroize-after", "4294967296"],
        ["admin-cert", "ops", "--out", "o", "--days", "0"],
        ["admin-cert", "ops", "--out", "o", "--days", "99999999999999999999"],
        [*_REMOTE, "admin-cert", "ops", "--out", "o"],
        [*_REMOTE, "serve"],
        ["serve", "--console", "nohost"],
        ["console"],
        [*_REMOTE, "console", "login"],
    ],
    ids=["nothing", "unknown-command", "grant-no-units", "grant-zero", "grant-words", "revoke-neither",
         "revoke-both", "create-no-manifest", "create-negative-lease", "listen-no-port", "listen-port-range",
         "model-no-action", "audit-last-words", "admin-without-credentials", "export-without-out",
         "grant-10e30", "grant-2e64", "revoke-2e64", "grant-arabic-digit", "lease-size-2e32",
         "offline-grace-huge", "offline-grace-below", "zeroize-after-2e32", "admin-cert-zero-days",
         "admin-cert-days-huge", "admin-cert-remote", "serve-remote", "console-no-port", "console-no-action",
         "console-login-remote"],
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
        "console",
    ):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [["usage"], ["grant", "d", "5"], ["model", "list"], ["audit"]],
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


def test_an_out_of_range_number_names_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["grant", "d", str(10**30)])
    assert f"give 1 to {MAX_GRANT_UNITS}" in capsys.readouterr().err


def test_misuse_with_json_is_a_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["grant", "d", str(2**64), "--json"])
    assert exited.value.code == 2
    doc = json.loads(capsys.readouterr().out)
    assert (doc["error"], doc["exit_code"]) == ("UsageError", 2)
    assert "out of range" in doc["reason"]


def test_a_refusal_with_json_is_a_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--json", "--data", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert (doc["error"], doc["exit_code"]) == ("ConsoleError", 1)
    assert doc["reason"].startswith("no custodian is serving")
    assert captured.err == ""


def test_a_manifest_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "enclave.toml"
    manifest.write_bytes(b'platform = "sim"\n# \xff\xfe\n')
    argv = ["deployment", "create", "d", "--model", "m", "--manifest", str(manifest), "--data", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"custodian: manifest {manifest} is not UTF-8 text (byte 19 is not)\n"


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _subcommands(sub)
    return found


def test_help_describes_every_positional_and_states_numeric_ranges() -> None:
    for parser in _subcommands(_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.dest} has no help"
            if action.type is not None and getattr(action.type, "__qualname__", "").startswith(
                "whole_number"
            ):
                assert re.search(r"\d+ to \d+", action.help), f"{parser.prog} {action.dest}: no range"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in action.help, f"{parser.prog} {action.dest}: no default"
