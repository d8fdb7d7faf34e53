"""A quote-generating stand-in for TDX (configfs-tsm) and SGX (Gramine) hardware, for end-to-end tests.

It serves the files ``enclave serve`` reads in a directory: for ``tdx`` a
configfs-tsm report entry (``--tsm-entry DIR``: ``inblob``, ``outblob``,
``generation``, ``provider``), for ``sgx`` Gramine's attestation interface
(``--gramine-root DIR``: ``user_report_data``, ``quote``). The file a reader
takes the quote from is a named pipe: reading it blocks until this double has
read the report data just written and answered with a genuine DCAP quote over
it, signed by a synthetic PCK chain (:mod:`testkit.dcap`). Only a test that
also installs that chain's root as the trust anchor accepts these quotes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from testkit.dcap import Pki, Spec, build_quote

# The registers of the double's quotes (testkit.dcap.build_quote), for manifests.
TDX_REGISTERS = {
    "mrtd": "22" * 48,
    "rtmr0": "30" * 48,
    "rtmr1": "31" * 48,
    "rtmr2": "32" * 48,
}
SGX_REGISTERS = {"mrenclave": "44" * 32, "mrsigner": "33" * 32}


class QuoteDouble:
    def __init__(self, pki: Pki, directory: Path, platform: str) -> None:
        if platform not in ("tdx", "sgx"):
            raise ValueError(f"the quote double is tdx or sgx, not {platform!r}")
        self.pki = pki
        self.directory = directory
        self.platform = platform
        self.quotes = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"quote-double-{platform}")
        directory.mkdir(parents=True, exist_ok=True)
        if platform == "tdx":
            self._input, self._output = directory / "inblob", directory / "outblob"
            (directory / "generation").write_text("0\n")
            (directory / "provider").write_text("tdx_guest\n")
        else:
            self._input, self._output = directory / "user_report_data", directory / "quote"
        self._input.write_bytes(b"")
        os.mkfifo(self._output)

    def _spec(self, report_data: bytes) -> Spec:
        if self.platform == "tdx":
            return Spec(version=4, body_type=2, report_data=report_data, rtmr3=bytes(48))
        return Spec(version=3, body_type=1, report_data=report_data)

    def _serve(self) -> None:
        answered = b""
        while not self._stopping.is_set():
            with self._output.open("wb") as out:  # blocks until a reader opens the pipe
                if self._stopping.is_set():
                    return
                report_data = self._input.read_bytes()
                # Opening succeeds at once while the last reader still reads to its end: answer
                # only report data that is whole and new, and close, which gives that reader EOF.
                if len(report_data) != 64 or report_data == answered:
                    out.close()
                    self._stopping.wait(0.005)
                    continue
                quote = build_quote(self.pki, self._spec(report_data))
                if self.platform == "tdx":
                    generation = int((self.directory / "generation").read_text())
                    (self.directory / "generation").write_text(f"{generation + 1}\n")
                self.quotes += 1
                answered = report_data
                out.write(quote)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        # Unblock a writer waiting for a reader, then let it see the flag.
        with contextlib.suppress(OSError):
            fd = os.open(self._output, os.O_RDONLY | os.O_NONBLOCK)
            self._thread.join(timeout=10)
            os.close(fd)
        assert stat.S_ISFIFO(self._output.stat().st_mode)


@contextlib.contextmanager
def quote_double(pki: Pki, directory: Path, platform: str) -> Iterator[QuoteDouble]:
    double = QuoteDouble(pki, directory, platform)
    double.start()
    try:
        yield double
    finally:
        double.stop()
