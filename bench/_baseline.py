"""The plain gRPC baseline: what a user would deploy without Custos, as its own process.

    python -m bench._baseline --cert server.pem --key server.key --ready-file ready.json \\
        [--model model.onnx] [--stream-file blob] [--client-ca client-ca.pem]

One ``grpc.aio`` server over TLS, with the same message limits as the enclave,
serving the Custos wire messages (``protos/custos.proto``) without any DRM:

- ``Inference.Infer``: onnxruntime on the model (``bench._plain_model``), in a
  thread pool of the enclave's size, one executor hop per call; no quota, no
  receipts, no metrics, no attestation.
- ``EnclaveGateway.FetchModel``: the bytes of ``--stream-file`` in 1 MiB
  messages, read from disk as the custodian reads its sealed file.
- ``EnclaveGateway.GetChallenge`` / ``Enrol``: answers of the real sizes with
  no checks (the enrolment round-trip floor).
- ``EnclaveGateway.AcquireLease`` / ``ReportUsage`` / ``ReportStream`` on a second, mutual-TLS
  port (``--client-ca``): a lease echoed from the request, no ledger.

It writes ``--ready-file`` (JSON: ``tls``, ``mtls`` addresses) once it serves
and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench._plain_model import INFERENCE_WORKERS, PlainInputError, PlainModel
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 20 << 20  # the enclave daemon's DaemonConfig.max_message_bytes
STREAM_CHUNK = 1 << 20  # the custodian's model chunk size
ENROL_CERTIFICATE_BYTES = 700  # about the size of the client certificate the custodian issues

Context = grpc.aio.ServicerContext[Any, Any]


class PlainInference(pb_grpc.InferenceServicer):
    def __init__(self, model: PlainModel, executor: ThreadPoolExecutor) -> None:
        self._model = model
        self._executor = executor

    async def Infer(self, request: pb.InferRequest, context: Context) -> pb.InferResponse:  # noqa: N802
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._model.infer, request)
        except PlainInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("abort returned") from None

    async def Attest(self, request: pb.AttestRequest, context: Context) -> pb.AttestResponse:  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no attestation without Custos")
        raise AssertionError("abort returned")

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateChunk]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the baseline serves classifiers only")
        yield pb.GenerateChunk()  # never reached: makes this an async generator, as gRPC streams it

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:  # noqa: N802
        return pb.StatusResponse(model_loaded=True, model_sha384=self._model.sha384)


class PlainGateway(pb_grpc.EnclaveGatewayServicer):
    def __init__(self, stream_file: Path | None) -> None:
        self._stream_file = stream_file

    async def GetChallenge(self, request: pb.ChallengeRequest, context: Context) -> pb.Challenge:  # noqa: N802
        return pb.Challenge(nonce=os.urandom(32), expires_in_seconds=60)

    async def Enrol(self, request: pb.EnrolRequest, context: Context) -> pb.Enrolment:  # noqa: N802
        return pb.Enrolment(
            instance_id=uuid.uuid4().hex,
            certificate=bytes(ENROL_CERTIFICATE_BYTES),
            enclave_ca=bytes(ENROL_CERTIFICATE_BYTES),
            offline_grace_seconds=30,
            lease_size=100,
            mtls_port=1,
        )

    async def ActivateCredential(  # noqa: N802
        self, request: pb.ActivateCredentialRequest, context: Context
    ) -> pb.Enrolment:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the plain baseline enrols without a TPM")

    async def FetchModel(  # noqa: N802
        self, request: pb.FetchModelRequest, context: Context
    ) -> AsyncIterator[pb.ModelPart]:
        if self._stream_file is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no --stream-file")
            return
        size = self._stream_file.stat().st_size
        count = max(1, -(-size // STREAM_CHUNK))
        yield pb.ModelPart(header=pb.ModelHeader(name="plain", plaintext_size=size, chunk_count=count))
        with self._stream_file.open("rb") as handle:
            for index in range(count):
                data = handle.read(STREAM_CHUNK)
                yield pb.ModelPart(
                    chunk=pb.ModelChunk(index=index, final=index == count - 1, ciphertext=data)
                )

    async def AcquireLease(self, request: pb.LeaseRequest, context: Context) -> pb.Lease:  # noqa: N802
        return _lease(request.lease_id or uuid.uuid4().hex, 0)

    async def ReportUsage(self, request: pb.UsageReport, context: Context) -> pb.Lease:  # noqa: N802
        return _lease(request.lease_id, request.used)

    async def ReportStream(  # noqa: N802
        self, requests: AsyncIterator[pb.UsageReport], context: Context
    ) -> AsyncIterator[pb.ReportReply]:
        async for request in requests:
            yield pb.ReportReply(lease=_lease(request.lease_id, request.used))

    async def Watch(  # noqa: N802
        self, request: pb.WatchRequest, context: Context
    ) -> AsyncIterator[pb.ControlEvent]:
        yield pb.ControlEvent(heartbeat=pb.Heartbeat(valid_for_seconds=30))


def _lease(lease_id: str, used: int) -> pb.Lease:
    return pb.Lease(lease_id=lease_id, limit=used + 1_000_000, valid_for_seconds=30, deployment_balance=10**9)


async def serve(args: argparse.Namespace) -> None:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    executor = ThreadPoolExecutor(INFERENCE_WORKERS, thread_name_prefix="inference")
    server = grpc.aio.server(options=options)
    if args.model is not None:
        model = PlainModel(args.model.read_bytes())
        pb_grpc.add_InferenceServicer_to_server(PlainInference(model, executor), server)
    pb_grpc.add_EnclaveGatewayServicer_to_server(PlainGateway(args.stream_file), server)
    pair = [(args.key.read_bytes(), args.cert.read_bytes())]
    tls_port = server.add_secure_port(args.listen, grpc.ssl_server_credentials(pair))
    host = args.listen.rpartition(":")[0]
    ready: dict[str, str | None] = {"tls": f"{host}:{tls_port}", "mtls": None}
    if args.client_ca is not None:
        mtls = grpc.ssl_server_credentials(
            pair, root_certificates=args.client_ca.read_bytes(), require_client_auth=True
        )
        ready["mtls"] = f"{host}:{server.add_secure_port(f'{host}:0', mtls)}"
    await server.start()
    partial = args.ready_file.with_suffix(".partial")
    partial.write_text(json.dumps(ready))
    partial.replace(args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    executor.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--client-ca", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--stream-file", type=Path)
    parser.add_argument("--ready-file", type=Path, required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
