"""A real custodian server on loopback (port 0) in a temp data dir, and the clients that talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from custodian.authority import CUSTODIAN_TLS_NAME
from custodian.config import Address, CustodianConfig
from custodian.server import CustodianServer
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc
from tests.unit.custodian.fake_enclave import FakeEnclave, sim_manifest

_NAME = [("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME)]
_FEATURES = 16


def onnx_model(size: int, seed: int = 0) -> bytes:
    """A valid classifier of about ``size`` bytes (one dense layer, random weights): the server
    checks at `model add` that onnxruntime loads what it is given."""
    classes = max(1, size // (_FEATURES * 4))
    weights = np.random.default_rng(seed).random((_FEATURES, classes), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["scores"])],
        "dense",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, _FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(weights, "weight")],
    )
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    made.ir_version = 8
    return bytes(made.SerializeToString())


@dataclass
class Running:
    server: CustodianServer
    admin: Any  # AdminAsyncStub
    channels: list[grpc.aio.Channel]

    @property
    def ca_pem(self) -> bytes:
        return self.server.custodian_ca_pem

    def _channel(self, port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=_NAME)
        self.channels.append(channel)
        return channel

    def enrolment(self) -> Any:
        """A gateway stub over plain TLS on the enrolment port, pinning the custodian CA."""
        assert self.server.endpoints is not None
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        return pb_grpc.EnclaveGatewayStub(self._channel(self.server.endpoints.enrolment.port, credentials))

    def gateway(self, key_pem: bytes, certificate_pem: bytes, *, port: int | None = None) -> Any:
        """A gateway stub over mutual TLS with an enrolled instance's key and certificate."""
        assert self.server.endpoints is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=key_pem, certificate_chain=certificate_pem
        )
        return pb_grpc.EnclaveGatewayStub(
            self._channel(port or self.server.endpoints.gateway.port, credentials)
        )

    async def lend(
        self, name: str = "d", *, model: bytes | None = None, units: int = 0, **options: Any
    ) -> str:
        async def upload() -> AsyncIterator[pb.ModelUpload]:
            yield pb.ModelUpload(name=f"{name}-model")
            data = model if model is not None else onnx_model(5000)
            for i in range(0, len(data), 4096):
                yield pb.ModelUpload(data=data[i : i + 4096])

        await self.admin.AddModel(upload())
        created = await self.admin.CreateDeployment(
            pb.CreateDeploymentRequest(
                name=name, model=f"{name}-model", manifest=sim_manifest(self.ca_pem), **options
            )
        )
        if units:
            await self.admin.Grant(pb.GrantRequest(deployment=name, units=units))
        return str(created.join_token)

    async def enrol(self, deployment: str, token: str) -> tuple[pb.Enrolment, FakeEnclave, Any]:
        """Enrol a fresh fake enclave; returns the enrolment, the enclave and its mutual-TLS gateway stub."""
        stub = self.enrolment()
        enclave = FakeEnclave(self.ca_pem, deployment)
        challenge = await stub.GetChallenge(pb.ChallengeRequest(deployment=deployment))
        enrolled = await stub.Enrol(enclave.enrol_request(challenge.nonce, token))
        return enrolled, enclave, self.gateway(enclave.key_pem, enrolled.certificate, port=enrolled.mtls_port)


@asynccontextmanager
async def running(
    tmp_path: Path, *, now: Callable[[], datetime] | None = None, **config: Any
) -> AsyncIterator[Running]:
    """The server on loopback, with its clock ``now`` where given."""
    server = await CustodianServer.start(
        CustodianConfig(data_dir=tmp_path / "data", listen=Address("127.0.0.1", 0), **config),
        **({"now": now} if now is not None else {}),
    )
    assert server.endpoints is not None
    admin_channel = grpc.aio.insecure_channel(f"unix:{server.endpoints.admin_socket}")
    handle = Running(server, pb_grpc.AdminStub(admin_channel), [admin_channel])
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await server.stop(grace=0)
