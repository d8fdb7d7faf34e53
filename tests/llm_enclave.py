"""A real enclave daemon serving the echo TEST DOUBLE (``tests.llm_double``), for the client's and
the proxy's tests: attested TLS on a loopback port, metered by a fake custodian, on an event
loop of its own in a thread (the client API is blocking)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave._daemon.daemon import Daemon, Ready
from enclave.attestation import ReferenceValues
from enclave.attestation.sim import SimAttester
from tests.llm_double import EchoModel, loader, payload
from tests.unit.enclave.fake_custodian import CertAuthority, FakeCustodian, FakeGateway
from tests.unit.enclave.test_daemon_link import make_config


@dataclass
class ServedModel:
    address: str
    manifest: ReferenceValues
    manifest_file: Path
    daemon: Daemon
    model: EchoModel
    gateway: FakeGateway


@contextlib.contextmanager
def serving_llm(
    tmp_path: Path,
    *,
    model: EchoModel | None = None,
    balance: int = 10_000,
    lease_size: int = 1000,
    context_length: int = 64,
    custodian_ca: CertAuthority | None = None,
    **overrides: Any,
) -> Iterator[ServedModel]:
    """``custodian_ca``: the CA the enclave pins (a new one by default: then the manifest differs)."""
    model = model or EchoModel()
    gateway = FakeGateway(model=payload(context_length), balance=balance, lease_size=lease_size)
    if custodian_ca is not None:
        gateway = FakeGateway(
            model=payload(context_length), balance=balance, lease_size=lease_size, custodian_ca=custodian_ca
        )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[Daemon, Ready, asyncio.Future[None]]:
        gateway.bind_loop()
        custodian = FakeCustodian(gateway)
        await custodian.__aenter__()
        ready: asyncio.Future[Ready] = loop.create_future()
        daemon = Daemon(
            make_config(gateway, custodian.address, **overrides),
            SimAttester(),
            on_ready=ready.set_result,
            text_models=loader(model),
        )
        task = asyncio.ensure_future(daemon.run())
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()

        async def run_until_stopped() -> None:
            await task
            await custodian.stop()

        return daemon, ready.result(), asyncio.ensure_future(run_until_stopped())

    daemon, ready, finished = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    manifest = gateway.reference.with_models(gateway.sha384.hex())
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest_file = tmp_path / "end-user.toml"
    manifest_file.write_text(manifest.to_toml())
    try:
        yield ServedModel(ready.inference, manifest, manifest_file, daemon, model, gateway)
    finally:
        loop.call_soon_threadsafe(daemon.request_stop)
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(_wrap(finished), 30), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _wrap(future: asyncio.Future[None]) -> None:
    await future
