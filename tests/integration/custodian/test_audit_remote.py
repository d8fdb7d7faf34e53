"""Issue 13 item 15: `custodian audit` and `audit export` over --admin read the custodian's log.

They used to read the local ledger file silently, whatever --admin said.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodian.audit_file import verify_file
from custodian.cli import main
from custodian.config import Address
from enclave.identity import private_key_pem
from protos import custos_pb2 as pb
from tests.integration.custodian.harness import running

pytestmark = pytest.mark.integration


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auditor")])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_audit_and_export_over_admin_check_the_custodians_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    elsewhere = tmp_path / "elsewhere"  # a --data with no ledger: nothing may be read from it
    elsewhere.mkdir()

    async def scenario() -> None:
        async with running(tmp_path / "data", admin_listen=Address("127.0.0.1", 0)) as r:
            assert r.server.endpoints is not None
            assert r.server.endpoints.admin is not None
            token = await r.lend("d", units=5)
            await r.enrol("d", token)
            key = ec.generate_private_key(ec.SECP256R1())
            issued = await r.admin.IssueAdminCertificate(
                pb.AdminCertificateRequest(name="auditor", csr=_csr(key), validity_days=1)
            )
            (creds / "k.pem").write_bytes(private_key_pem(key))
            (creds / "c.pem").write_bytes(issued.certificate)
            (creds / "ca.pem").write_bytes(issued.custodian_ca)
            remote = [
                "--data",
                str(elsewhere),
                "--admin",
                str(r.server.endpoints.admin),
                "--admin-key",
                str(creds / "k.pem"),
                "--admin-cert",
                str(creds / "c.pem"),
                "--custodian-ca",
                str(creds / "ca.pem"),
            ]
            ledger = r.server._ledger
            assert ledger is not None
            async with ledger.transaction() as tx:
                length = len(await tx.audit_entries())

            assert await asyncio.to_thread(main, [*remote, "--json", "audit", "--last", "2"]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert (shown["intact"], shown["entries"], len(shown["last"])) == (True, length, 2)
            assert [e["action"] for e in shown["last"]] == ["enrol", "admin.certificate"]

            out = tmp_path / "audit.jsonl"
            assert await asyncio.to_thread(main, [*remote, "audit", "export", "--out", str(out)]) == 0
            verified = verify_file(out)
            assert verified.entries == length
            assert verified.anchored_instances == 0

            # Without a valid admin certificate: one line, exit 1, and no local fallback.
            (creds / "c.pem").write_bytes(issued.custodian_ca)
            capsys.readouterr()
            assert await asyncio.to_thread(main, [*remote, "audit"]) == 1
            assert len(capsys.readouterr().err.strip().splitlines()) == 1

    asyncio.run(scenario())
