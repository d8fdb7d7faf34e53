"""The admin API over TCP: mutual TLS, admin CA certificates only, each action audited by name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodian.authority import CUSTODIAN_TLS_NAME
from custodian.config import Address
from enclave.identity import private_key_pem
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc
from tests.integration.custodian.harness import running

pytestmark = pytest.mark.integration


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_admin_over_mutual_tls_is_audited_with_the_certificate_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, admin_listen=Address("127.0.0.1", 0)) as r:
            endpoints = r.server.endpoints
            assert endpoints is not None
            assert endpoints.admin is not None
            address = str(endpoints.admin)
            token = await r.lend("d", units=5)
            key = ec.generate_private_key(ec.SECP256R1())
            issued = await r.admin.IssueAdminCertificate(
                pb.AdminCertificateRequest(name="alice", csr=_csr(key, "ignored"), validity_days=2)
            )
            assert x509.load_pem_x509_certificate(issued.certificate).subject.rfc4514_string() == "CN=alice"

            def channel(private: bytes | None, chain: bytes | None) -> grpc.aio.Channel:
                credentials = grpc.ssl_channel_credentials(issued.custodian_ca, private, chain)
                option = [("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME)]
                made = grpc.aio.secure_channel(address, credentials, options=option)
                r.channels.append(made)
                return made

            remote = pb_grpc.AdminStub(channel(private_key_pem(key), issued.certificate))
            changed = await remote.Grant(pb.GrantRequest(deployment="d", units=3))
            assert changed.usage.balance == 8
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await remote.IssueAdminCertificate(
                    pb.AdminCertificateRequest(name="mallory", csr=_csr(key, "m"))
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # An enrolled enclave's certificate is from another CA: no admin access with it.
            enrolled, enclave, _ = await r.enrol("d", token)
            for private, chain in ((enclave.key_pem, enrolled.certificate), (None, None)):
                stranger = pb_grpc.AdminStub(channel(private, chain))
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stranger.Usage(pb.UsageRequest(), timeout=5)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

            ledger = r.server._ledger
            assert ledger is not None
            async with ledger.transaction() as tx:
                entries = await tx.audit_entries()
            grants = [e.detail["origin"] for e in entries if e.action == "quota.grant"]
            assert grants[0].startswith("unix:")
            assert grants[1].startswith("ipv4:127.0.0.1:")
            assert "certificate CN=alice" in str(grants[1])
            [issue] = [e for e in entries if e.action == "admin.certificate"]
            assert (issue.subject, str(issue.detail["origin"])[:5]) == ("alice", "unix:")

    asyncio.run(scenario())
