"""A database password given as a flag shows in the process list: the console says so."""

from __future__ import annotations

import argparse

import pytest

from custodian._cli_args import DATABASE_ENV
from custodian._cli_replica import check_serve_options


def _check(database: str | None) -> None:
    args = argparse.Namespace(command="serve", database=database, master_key=None)
    check_serve_options(argparse.ArgumentParser(), args)


@pytest.mark.parametrize(
    "url", ["postgresql://u:pw@h/db", "postgresql://u@h/db?password=pw"], ids=["user-part", "parameter"]
)
def test_a_password_in_the_flag_is_warned_about(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    _check(url)
    err = capsys.readouterr().err
    assert "process list" in err
    assert DATABASE_ENV in err
    assert "pw" not in err


@pytest.mark.parametrize("from_env", [True, False], ids=["from-environment", "no-password"])
def test_no_warning_without_a_password_on_the_command_line(
    from_env: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql://u:pw@h/db" if from_env else "postgresql://u@h/db"
    if from_env:
        monkeypatch.setenv(DATABASE_ENV, url)
    else:
        monkeypatch.delenv(DATABASE_ENV, raising=False)
    _check(url)
    assert capsys.readouterr().err == ""
