"""Two replicas on one PostgreSQL database, in process: enrolment may begin on one and end on the other
(a load balancer between them), and a nonce is still good for one enrolment only, on any replica."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from protos import custos_pb2 as pb
from tests.integration.custodian.harness import running
from tests.postgres_support import Postgres
from tests.unit.custodian.fake_enclave import FakeEnclave

pytestmark = pytest.mark.integration


def test_a_challenge_from_one_replica_enrols_at_the_other_once(tmp_path: Path, postgres: Postgres) -> None:
    url = postgres.new_database()

    async def run() -> None:
        async with running(tmp_path / "a", database=url) as first:
            (tmp_path / "b").mkdir(mode=0o700)
            shutil.copy(tmp_path / "a" / "data" / "master.key", tmp_path / "b" / "master.key")
            (tmp_path / "b" / "master.key").chmod(0o600)
            async with running(
                tmp_path / "b", database=url, master_key=tmp_path / "b" / "master.key"
            ) as second:
                assert first.ca_pem == second.ca_pem
                token = await first.lend("d", units=5)
                enclave = FakeEnclave(first.ca_pem, "d")
                challenge = await first.enrolment().GetChallenge(pb.ChallengeRequest(deployment="d"))
                request = enclave.enrol_request(challenge.nonce, token)
                enrolled = await second.enrolment().Enrol(request)
                assert enrolled.instance_id
                # Spent on the second replica, the nonce is spent on the first too.
                again = FakeEnclave(first.ca_pem, "d")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await first.enrolment().Enrol(again.enrol_request(challenge.nonce, token))
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "nonce" in str(refused.value.details())

    asyncio.run(run())
