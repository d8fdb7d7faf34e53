"""Custodian replicas on one PostgreSQL database, as real processes: shared keys, one ledger, any replica.

The database is a real PostgreSQL server the harness started (``tests/postgres_support``);
each replica is ``custodian serve --database URL`` with a data directory of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client import connect
from client.errors import QuotaExhaustedError, SuspendedError
from testkit.processes import (
    DIGITS_MODEL,
    DIGITS_SAMPLES,
    Custodian,
    Enclave,
    enclave_manifest,
    isolated_env,
    poll,
    run,
    running,
    script,
)
from tests.postgres_support import Postgres, TcpProxy, start_postgres

pytestmark = pytest.mark.integration


def _replica(tmp: Path, name: str, env: dict[str, str], url: str) -> Custodian:
    return Custodian(tmp / name, env, extra_args=["--database", url])


def _custodian(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = run([script("custodian"), *args], env, check=False)
    return result.returncode, result.stdout, result.stderr


def test_a_second_replica_needs_the_master_key_then_serves_what_the_first_one_holds(
    tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.new_database()
    env = isolated_env(tmp_path)
    first, second = _replica(tmp_path, "a", env, url), _replica(tmp_path, "b", env, url)
    enclave = Enclave(tmp_path / "enclave", env)
    with running(first, second, enclave):
        first.start()
        master = tmp_path / "a" / "master.key"
        assert stat.S_IMODE(master.stat().st_mode) == 0o600
        assert not (tmp_path / "a" / "ledger.sqlite3").exists()
        assert not list((tmp_path / "a").glob("*-ca.key"))

        # A replica without the master key refuses, and says which file it needs.
        serve = ["serve", "--data", str(tmp_path / "b"), "--database", url, "--listen", "127.0.0.1:0"]
        code, _, err = _custodian(env, *serve)
        assert code == 1, err
        assert f"no master key at {tmp_path / 'b' / 'master.key'}" in err
        assert "--master-key FILE" in err
        init = ["replica", "init", "--data", str(tmp_path / "b"), "--database", url]
        code, _, err = _custodian(env, *init)
        assert code == 1
        assert "no master key at" in err
        # Another key is not this database's.
        other = tmp_path / "other.key"
        other.write_bytes(os.urandom(32))
        other.chmod(0o600)
        code, _, err = _custodian(env, *init, "--master-key", str(other))
        assert code == 1
        assert "is not this database's master key" in err
        # With a copy of the first replica's file, it is ready.
        shutil.copy(master, tmp_path / "b" / "master.key")
        (tmp_path / "b" / "master.key").chmod(0o600)
        code, out, err = _custodian(env, *init)
        assert code == 0, err
        assert out.startswith("ready:")
        second.start()

        # One CA, one set of models and deployments, whichever replica is asked.
        assert first.ca_pem() == second.ca_pem()
        ca = first.ca_file()
        first.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        assert [m["name"] for m in second.console("model", "list")] == ["digits"]
        manifest = enclave_manifest(tmp_path / "enclave.toml", ca, env)
        token = second.console("deployment", "create", "d", "--model", "digits", "--manifest", str(manifest))[
            "join_token"
        ]
        first.console("grant", "d", "5")
        second.console("grant", "d", "3")

        # An enclave enrols with the second replica and gets the model the first one sealed.
        enclave.start(second, ca, "d", token)
        end_user, image = tmp_path / "end-user.toml", (DIGITS_SAMPLES / "digit-3.png").read_bytes()
        first.console("deployment", "manifest", "d", "--out", str(end_user))
        with connect(enclave.address, end_user) as conn:
            for _ in range(3):
                assert conn.infer_image(image).top[0].label == "three"
        poll(lambda: first.usage("d")["used"] == 3)
        usage = second.usage("d")
        assert usage["granted_total"] == 8
        # Every replica lists the fleet, and says which replica holds the enclave's stream.
        (listed,) = first.console("enclaves")
        assert (listed["state"], listed["replica"]) == ("connected", second.enrolment)

        # A suspension taken by the first replica is pushed by the second, on whose stream the
        # enclave is: only a notification from the database can wake that stream (the first
        # replica has no stream to push on; heartbeats are not counted as pushes).
        pushes = "custos_custodian_control_pushes_total"
        before = second.metric(pushes)
        first.console("suspend", "d")
        poll(lambda: second.metric(pushes) > before)
        assert first.metric(pushes) == 0
        with connect(enclave.address, end_user) as conn:
            with pytest.raises(SuspendedError):
                poll(lambda: conn.infer_image(image) and False, deadline=5)
        first.console("resume", "d")
        poll(lambda: second.metric(pushes) > before + 1)

    for log in (first.log, second.log, enclave.log):
        assert postgres.password not in log.read_text()


def test_grants_and_revokes_on_two_replicas_at_once_add_up_exactly(
    tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.new_database()
    env = isolated_env(tmp_path)
    first, second = _replica(tmp_path, "a", env, url), _replica(tmp_path, "b", env, url)
    with running(first, second):
        first.start()
        (tmp_path / "b").mkdir(mode=0o700)
        shutil.copy(tmp_path / "a" / "master.key", tmp_path / "b" / "master.key")
        second.start()
        ca = first.ca_file()
        first.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        manifest = enclave_manifest(tmp_path / "enclave.toml", ca, env)
        first.console("deployment", "create", "d", "--model", "digits", "--manifest", str(manifest))
        first.console("grant", "d", "1000")

        def change(i: int) -> None:
            replica = (first, second)[i % 2]
            if i % 3 == 2:
                replica.console("revoke", "d", "7")
            else:
                replica.console("grant", "d", str(10 + i))

        calls = range(24)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(change, calls))
        granted = 1000 + sum(10 + i for i in calls if i % 3 != 2)
        revoked = 7 * sum(1 for i in calls if i % 3 == 2)
        for replica in (first, second):
            usage = replica.usage("d")
            assert (usage["granted_total"], usage["revoked"]) == (granted, revoked)
            assert usage["balance"] == granted - revoked

    # A replica's data directory has no ledger file: the console says where the log is.
    code, _, err = _custodian(env, "--data", str(tmp_path / "a"), "audit")
    assert code == 1
    assert "give --database URL" in err
    # One audit chain, read from the database with no replica running, and verified offline.
    export = tmp_path / "audit.jsonl"
    code, _, err = _custodian(env, "audit", "export", "--database", url, "--out", str(export))
    assert code == 0, err
    code, _, err = _custodian(env, "audit", "verify", str(export), "--json")
    assert code == 0, err
    grants = [line for line in export.read_text().splitlines() if '"quota.grant"' in line]
    assert len(grants) == 1 + sum(1 for i in calls if i % 3 != 2)


def test_kill_9_of_the_replica_an_enclave_is_on_mid_burst_moves_it_and_nothing_is_lost(
    tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.new_database()
    env = isolated_env(tmp_path)
    first, second = _replica(tmp_path, "a", env, url), _replica(tmp_path, "b", env, url)
    enclave = Enclave(tmp_path / "enclave", env)
    with running(first, second, enclave):
        first.start()
        (tmp_path / "b").mkdir(mode=0o700)
        shutil.copy(tmp_path / "a" / "master.key", tmp_path / "b" / "master.key")
        second.start()
        ca = first.ca_file()
        first.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        manifest = enclave_manifest(tmp_path / "enclave.toml", ca, env)
        created = first.console(
            "deployment",
            "create",
            "d",
            "--model",
            "digits",
            "--manifest",
            str(manifest),
            "--lease-size",
            "20",
        )
        first.console("grant", "d", "100000")
        # Enrolled with the first replica, the enclave knows both.
        enclave.start([first, second], ca, "d", created["join_token"])
        end_user = tmp_path / "end-user.toml"
        second.console("deployment", "manifest", "d", "--out", str(end_user))
        image = (DIGITS_SAMPLES / "digit-3.png").read_bytes()
        served = 0
        with connect(enclave.address, end_user) as conn:
            for i in range(120):
                if i == 40:
                    first.stop(signal.SIGKILL)  # mid-burst, the replica the enclave is on
                conn.infer_image(image)  # end users see nothing: every call is served
                served += 1
            poll(lambda: enclave.metric("custos_enclave_custodian_failovers_total") >= 1)
            poll(lambda: second.console("enclaves")[0]["replica"] == second.enrolment)
            for _ in range(40):
                conn.infer_image(image)
                served += 1
        enclave.stop()  # the final report, to the second replica
        usage = second.usage("d")
        assert usage["used"] == served
        assert usage["unreported"] == 0
        assert usage["balance"] + usage["leased"] + usage["used"] + usage["revoked"] == 100000

    export = tmp_path / "audit.jsonl"
    code, _, err = _custodian(env, "audit", "export", "--database", url, "--out", str(export))
    assert code == 0, err
    code, out, err = _custodian(env, "audit", "verify", str(export))
    assert code == 0, err + out


def test_a_replica_cut_off_from_the_database_refuses_work_and_says_why_the_other_carries_on(
    tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.new_database()
    proxy = TcpProxy(postgres.port)
    env = isolated_env(tmp_path)
    cut_off = _replica(tmp_path, "a", env, postgres.url(url.rsplit("/", 1)[1], port=proxy.port))
    other = _replica(tmp_path, "b", env, url)
    enclave = Enclave(tmp_path / "enclave", env)
    try:
        with running(cut_off, other, enclave):
            cut_off.start()
            (tmp_path / "b").mkdir(mode=0o700)
            shutil.copy(tmp_path / "a" / "master.key", tmp_path / "b" / "master.key")
            other.start()
            ca = cut_off.ca_file()
            cut_off.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
            manifest = enclave_manifest(tmp_path / "enclave.toml", ca, env)
            token = cut_off.console(
                "deployment", "create", "d", "--model", "digits", "--manifest", str(manifest)
            )["join_token"]
            cut_off.console("grant", "d", "1000")
            enclave.start([cut_off, other], ca, "d", token)
            end_user = tmp_path / "end-user.toml"
            other.console("deployment", "manifest", "d", "--out", str(end_user))
            image = (DIGITS_SAMPLES / "digit-3.png").read_bytes()

            proxy.cut()
            code, out, err = _custodian(env, "--data", str(tmp_path / "a"), "usage", "--json")
            assert code == 1
            assert "ledger is unavailable" in out + err
            assert postgres.password not in out + err
            with connect(enclave.address, end_user) as conn:
                for _ in range(30):
                    conn.infer_image(image)
                poll(lambda: enclave.metric("custos_enclave_custodian_failovers_total") >= 1)
                poll(lambda: other.usage("d")["used"] == 30)
            other.console("grant", "d", "5")
            assert other.usage("d")["granted_total"] == 1005
        assert "ledger is unavailable" in cut_off.log.read_text()
    finally:
        proxy.close()


def test_the_database_restarted_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    cluster = start_postgres()  # its own: it is stopped and started again
    try:
        url = cluster.new_database()
        env = isolated_env(tmp_path)
        first, second = _replica(tmp_path, "a", env, url), _replica(tmp_path, "b", env, url)
        enclave = Enclave(tmp_path / "enclave", env)
        with running(first, second, enclave):
            first.start()
            (tmp_path / "b").mkdir(mode=0o700)
            shutil.copy(tmp_path / "a" / "master.key", tmp_path / "b" / "master.key")
            second.start()
            ca = first.ca_file()
            first.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
            manifest = enclave_manifest(tmp_path / "enclave.toml", ca, env)
            created = first.console(
                "deployment", "create", "d", "--model", "digits", "--manifest", str(manifest),
                "--lease-size", "200",
            )  # fmt: skip
            first.console("grant", "d", "100000")
            enclave.start([first, second], ca, "d", created["join_token"])
            end_user = tmp_path / "end-user.toml"
            first.console("deployment", "manifest", "d", "--out", str(end_user))
            image = (DIGITS_SAMPLES / "digit-3.png").read_bytes()
            served = 0
            with connect(enclave.address, end_user) as conn:
                for i in range(90):
                    if i == 30:
                        cluster.stop_server()
                    if i == 60:
                        cluster.start_server()
                    conn.infer_image(image)  # served from the lease while the database is away
                    served += 1
            # Every inference served is counted once the replicas are back: nothing was lost.
            poll(lambda: first.usage("d")["used"] == served, deadline=60)
            enclave.stop()
            usage = second.usage("d")
            assert (usage["used"], usage["unreported"]) == (served, 0)
        export = tmp_path / "audit.jsonl"
        code, _, err = _custodian(env, "audit", "export", "--database", url, "--out", str(export))
        assert code == 0, err
        code, out, err = _custodian(env, "audit", "verify", str(export))
        assert code == 0, err + out
    finally:
        cluster.close()


def test_reports_grants_and_revokes_on_both_replicas_at_once_keep_the_books_exact(
    tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.new_database()
    env = isolated_env(tmp_path)
    first, second = _replica(tmp_path, "a", env, url), _replica(tmp_path, "b", env, url)
    enclaves = [Enclave(tmp_path / "enclave-a", env), Enclave(tmp_path / "enclave-b", env)]
    with running(first, second, *enclaves):
        first.start()
        (tmp_path / "b").mkdir(mode=0o700)
        shutil.copy(tmp_path / "a" / "master.key", tmp_path / "b" / "master.key")
        second.start()
        ca = first.ca_file()
        first.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        manifest = enclave_manifest(tmp_path / "enclave.toml", ca, env)
        token = first.console(
            "deployment",
            "create",
            "d",
            "--model",
            "digits",
            "--manifest",
            str(manifest),
            "--lease-size",
            "10",
        )["join_token"]
        first.console("grant", "d", "150")
        # One enclave on each replica, reporting (and topping up) there.
        for enclave, replica in zip(enclaves, (first, second), strict=True):
            enclave.start(replica, ca, "d", token)
        end_user = tmp_path / "end-user.toml"
        first.console("deployment", "manifest", "d", "--out", str(end_user))
        image = (DIGITS_SAMPLES / "digit-3.png").read_bytes()

        def burst(enclave: Enclave) -> int:
            served = 0
            with connect(enclave.address, end_user) as conn:
                for _ in range(60):
                    try:
                        conn.infer_image(image)
                        served += 1
                    except QuotaExhaustedError:
                        pass
            return served

        def admin(i: int) -> None:
            if i % 2:
                second.console("revoke", "d", "5")
            else:
                first.console("grant", "d", "20")

        with ThreadPoolExecutor(6) as pool:
            bursts = [pool.submit(burst, e) for e in enclaves]
            list(pool.map(admin, range(12)))
            served = sum(b.result() for b in bursts)
        for enclave in enclaves:
            enclave.stop()  # final reports: every lease closed
        usage = second.usage("d")
        assert usage["used"] == served
        assert usage["leased"] == usage["unreported"] == 0
        assert usage["granted_total"] == 150 + 6 * 20
        assert (
            usage["granted_total"] + usage["overdrawn"] == usage["balance"] + usage["used"] + usage["revoked"]
        )
