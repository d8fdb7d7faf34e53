"""One ESAPI connection to a TPM, with the handle hygiene that needs no resource manager.

tpm2-pytss (ESAPI over a TCTI: ``device:/dev/tpmrm0``,
``swtpm:host=127.0.0.1,port=2321``, ``mssim:...``) is imported when a
:class:`TpmConnection` is opened, so the daemon runs without libtss2 unless
``--platform tpm`` is chosen.

No resource manager is assumed: primary keys are context-saved once created,
and each operation loads what it needs and flushes every transient handle (keys
and sessions) in a ``finally``, so at most two object slots are used at a time.
A key whose saved context no longer loads (the TPM was reset) is re-created
from its template and must come out identical. NV indices are listed before
any is read, so an undefined one is never probed. The caller serialises calls.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from enclave._daemon.errors import TpmDeviceError
from enclave.attestation.tpm_structures import parse_public

logger = logging.getLogger(__name__)

_NV_INDEX_FIRST = 0x01000000
_NV_INDEX_LAST = 0x01FFFFFF
_DEFAULT_NV_BUFFER = 512


def _load_tss() -> tuple[ModuleType, ModuleType]:
    """tpm2-pytss and its utils, imported on first use (they need the libtss2 shared libraries)."""
    try:
        return importlib.import_module("tpm2_pytss"), importlib.import_module("tpm2_pytss.utils")
    except ImportError as exc:
        raise TpmDeviceError(
            f"the tpm platform needs tpm2-pytss and the libtss2 libraries (pip install tpm2-pytss): {exc}"
        ) from exc


@dataclass
class PrimaryKey:
    """A primary key in the endorsement hierarchy, re-loaded for each operation."""

    label: str
    template: Any  # TPM2B_PUBLIC
    public: bytes  # TPMT_PUBLIC, as created
    context: Any  # TPMS_CONTEXT from TPM2_ContextSave


class TpmConnection:
    """ESAPI on ``tcti``: ``tss`` is tpm2-pytss, ``utils`` its utils, ``esys`` the open context."""

    def __init__(self, tcti: str) -> None:
        self.tss, self.utils = _load_tss()
        try:
            self.esys: Any = self.tss.ESAPI(tcti)
        except self.tss.TSS2_Exception as exc:
            raise TpmDeviceError(f"cannot open the TPM through TCTI {tcti!r}: {exc}") from exc

    def close(self) -> None:
        self.esys.close()

    @contextmanager
    def command(self, what: str) -> Iterator[None]:
        """TPM errors inside become :class:`TpmDeviceError` naming ``what`` failed."""
        try:
            yield
        except self.tss.TSS2_Exception as exc:
            raise TpmDeviceError(f"{what} failed: {exc}") from exc

    # --- primary keys and sessions ---

    def create_primary(self, label: str, template: Any) -> PrimaryKey:
        """``TPM2_CreatePrimary`` in the endorsement hierarchy, kept as a saved context."""
        handle, public = self._create(label, template)
        try:
            context = self.esys.context_save(handle)
        finally:
            self.flush(handle)
        return PrimaryKey(label=label, template=template, public=public, context=context)

    def _create(self, label: str, template: Any) -> tuple[Any, bytes]:
        with self.command(f"creating the {label} (TPM2_CreatePrimary, endorsement hierarchy)"):
            handle, public, *_ = self.esys.create_primary(None, template, self.tss.ESYS_TR.ENDORSEMENT)
        return handle, bytes(public.publicArea.marshal())

    @contextmanager
    def loaded(self, key: PrimaryKey) -> Iterator[Any]:
        """The key loaded from its saved context (or re-created), flushed afterwards."""
        handle = self._load(key)
        try:
            yield handle
        finally:
            self.flush(handle)

    def _load(self, key: PrimaryKey) -> Any:
        try:
            return self.esys.context_load(key.context)
        except self.tss.TSS2_Exception as exc:
            logger.info("TPM no longer loads the saved %s context (%s); re-creating it", key.label, exc)
        handle, public = self._create(key.label, key.template)
        try:
            if public != key.public:
                raise TpmDeviceError(
                    f"the re-created {key.label} differs from the original: "
                    "the TPM's endorsement seed changed"
                )
            with self.command(f"saving the {key.label} context"):
                key.context = self.esys.context_save(handle)
        except BaseException:
            self.flush(handle)
            raise
        return handle

    def flush(self, handle: Any) -> None:
        try:
            self.esys.flush_context(handle)
        except self.tss.TSS2_Exception as exc:  # never mask the error that brought us here
            logger.warning("could not flush a TPM transient handle: %s", exc)

    @contextmanager
    def ek_session(self, ek: PrimaryKey) -> Iterator[Any]:
        """A policy session satisfying the EK's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT)."""
        tss = self.tss
        name_alg = parse_public(ek.public).name_alg
        with self.command("starting the EK policy session"):
            session = self.esys.start_auth_session(
                tss.ESYS_TR.NONE,
                tss.ESYS_TR.NONE,
                tss.TPM2_SE.POLICY,
                tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
                name_alg,
            )
        try:
            with self.command("authorising the EK (TPM2_PolicySecret, endorsement hierarchy)"):
                self.esys.policy_secret(tss.ESYS_TR.ENDORSEMENT, session)
            yield session
        finally:
            self.flush(session)

    # --- NV ---

    def nv_reader(self) -> Callable[[int], bytes]:
        """An NV read callback for ``create_ek_template`` that never probes undefined indices."""
        defined = self._nv_indices()

        def read(index: int) -> bytes:
            if int(index) not in defined:
                raise self.utils.NoSuchIndex(index)
            return self._nv_read(int(index))

        return read

    def _nv_indices(self) -> set[int]:
        tss = self.tss
        found: set[int] = set()
        start, more = _NV_INDEX_FIRST, True
        while more:
            with self.command("listing NV indices"):
                more, data = self.esys.get_capability(tss.TPM2_CAP.HANDLES, start, 64)
            handles = [int(h) for h in data.data.handles]
            found.update(h for h in handles if h <= _NV_INDEX_LAST)
            if not handles or handles[-1] >= _NV_INDEX_LAST:
                break
            start = handles[-1] + 1
        return found

    def _nv_read(self, index: int) -> bytes:
        tss = self.tss
        with self.command(f"reading NV index {index:#010x}"):
            _, properties = self.esys.get_capability(
                tss.TPM2_CAP.TPM_PROPERTIES, tss.TPM2_PT_NV.BUFFER_MAX, 1
            )
            chunk = next(
                (
                    int(p.value)
                    for p in properties.data.tpmProperties
                    if p.property == tss.TPM2_PT_NV.BUFFER_MAX
                ),
                _DEFAULT_NV_BUFFER,
            )
            handle = self.esys.tr_from_tpmpublic(index)
            try:
                public, _ = self.esys.nv_read_public(handle)
                size = int(public.nvPublic.dataSize)
                data = b""
                while len(data) < size:
                    data += bytes(self.esys.nv_read(handle, min(chunk, size - len(data)), len(data)))
            finally:
                self.esys.tr_close(handle)
        return data

    # --- PCRs and structures ---

    def pcr_selection(self, bank: str, indices: Sequence[int]) -> Any:
        return self.tss.TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, indices))}")

    def read_pcrs(self, bank: str, indices: Sequence[int]) -> dict[int, bytes]:
        """PCR values; TPM2_PCR_Read returns at most eight per call, so ask until all came back."""
        values: dict[int, bytes] = {}
        wanted = [i for i in indices if i not in values]
        while wanted:
            with self.command(f"reading PCRs {bank}:{wanted}"):
                _, selection, digests = self.esys.pcr_read(self.pcr_selection(bank, wanted))
            returned = [
                i
                for sel in selection
                for i in range(8 * int(sel.sizeofSelect))
                if bytes(sel.pcrSelect)[i // 8] >> (i % 8) & 1
            ]
            if not returned:
                raise TpmDeviceError(f"the TPM returned no value for PCRs {bank}:{wanted}")
            for index, digest in zip(returned, digests, strict=True):
                values[index] = bytes(digest)
            wanted = [i for i in indices if i not in values]
        return values

    def unmarshal(self, kind: Any, data: bytes, what: str) -> Any:
        """A TPM structure of type ``kind`` from exactly ``data``; ``what`` names it in the error."""
        try:
            value, consumed = kind.unmarshal(bytes(data))
        except self.tss.TSS2_Exception as exc:
            raise TpmDeviceError(f"{what} does not parse: {exc}") from exc
        if consumed != len(data):
            raise TpmDeviceError(f"{what} has {len(data) - consumed} trailing bytes")
        return value
