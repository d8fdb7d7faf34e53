"""The TPM 2.0 attester: quotes over an application PCR, and credential activation for enrolment.

It reaches the TPM through a :class:`~enclave._daemon.tpm_connection.TpmConnection`
(tpm2-pytss, imported when a :class:`TpmAttester` is opened, and the handle
hygiene that needs no resource manager); these two modules are the only ones
that talk to a TPM.

What it does with the TPM:

* EK: ``TPM2_CreatePrimary`` in the endorsement hierarchy with the TCG EK
  Credential Profile low-range template (L-1 RSA-2048 by default, L-2 ECC
  P-256), or the template the TPM keeps in NV; its certificate is read from
  NV (``0x01c00002`` RSA, ``0x01c0000a`` ECC) where the manufacturer put one.
* AK: a primary restricted signing key in the endorsement hierarchy
  (RSASSA-SHA256 RSA-2048 or ECDSA-SHA256 P-256, nameAlg SHA-256). A primary
  is derived from the endorsement seed and its template, so the same TPM
  yields the same AK after a restart.
* ``extend``: the measurement-log event goes into the application PCR (15 by
  default) in every allocated bank the event has a digest for. The log bank is
  SHA-384 where it is allocated for that PCR, else SHA-256. The first extend
  requires the PCR to be unextended since the TPM's last reset, because the
  verifier replays the log from zero; or, after ``continue_log`` (a new
  instance after zeroizing, in the same TPM boot), to hold exactly the
  earlier instances' log, which the new log then goes on from.
* ``collect``: ``TPM2_Quote`` of the log bank over the application PCR and the
  configured extra PCRs (the boot chain, 0-9 and 11 by default), qualifyingData = SHA-256 of the
  64-byte report data (a TPM takes no more than its largest digest), then
  the PCR values; the attester checks the result with the verifier before
  returning it (and quotes again if a PCR moved in between).
* ``activate_credential``: ``TPM2_ActivateCredential`` with the EK authorised
  by ``PolicySecret(TPM_RH_ENDORSEMENT)``.

Calls are serialised by a lock.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave._daemon.errors import TpmDeviceError
from enclave._daemon.tpm_connection import TpmConnection
from enclave.attestation.claims import canonical_json
from enclave.attestation.interface import REPORT_DATA_SIZE, Attester, Evidence
from enclave.attestation.tpm import DEFAULT_APP_PCR, PLATFORM, qualifying_data, verify_quote
from enclave.attestation.tpm_ak import load_ak, load_certificates
from enclave.attestation.tpm_credential import object_name
from enclave.attestation.tpm_structures import DIGEST_SIZES, HASH_IDS
from enclave.errors import EvidenceError

logger = logging.getLogger(__name__)

KEY_TYPES = ("rsa", "ecc")
# Where the log goes, best first; the verifier prefers the same order.
LOG_BANKS = ("sha384", "sha256")
MAX_PCR = 23
# Resettable at locality 0 (TCG PC Client Platform TPM Profile): anyone could reset them and
# extend a log of their choosing, so the measurement log must not live there.
RESETTABLE_PCRS = (16, 23)

_EK_TEMPLATES = {"rsa": "EK-RSA2048", "ecc": "EK-ECC256"}
_AK_TEMPLATES = {"rsa": "rsa2048:rsassa-sha256:null", "ecc": "ecc256:ecdsa-sha256:null"}
_EXTEND_BANKS = ("sha1", "sha256", "sha384", "sha512")
_QUOTE_ATTEMPTS = 3
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_pcr_list(text: str) -> tuple[int, ...]:
    """PCR indices from a flag value such as ``"0-7"`` or ``"0,2,4-7"``; empty for ``""``."""
    pcrs: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _RANGE.match(part)
        if match is None:
            raise ValueError(f"PCR list item {part!r} is not a number or a range like 0-7")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last or last > MAX_PCR:
            raise ValueError(f"PCR range {part!r} is not within 0-{MAX_PCR}")
        pcrs.update(range(first, last + 1))
    return tuple(sorted(pcrs))


class TpmAttester(Attester):
    """Evidence from a TPM 2.0: a quote by a TPM-resident AK over the application PCR.

    ``tcti`` is a TCTI string as tpm2-tools take it. ``quote_pcrs`` are quoted
    besides ``app_pcr``, in the same bank. ``key_type`` picks RSA-2048 or ECC
    P-256 for both the EK and the AK. ``endorsement_auth`` is the endorsement
    hierarchy's authorisation value, empty on most machines.
    """

    platform = PLATFORM
    simulated = False
    register_outlives_attester = True

    def __init__(
        self,
        tcti: str,
        *,
        app_pcr: int = DEFAULT_APP_PCR,
        quote_pcrs: Sequence[int] = (),
        key_type: str = "rsa",
        endorsement_auth: bytes = b"",
    ) -> None:
        if key_type not in KEY_TYPES:
            raise ValueError(f"TPM key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
        if not 0 <= app_pcr <= MAX_PCR or app_pcr in RESETTABLE_PCRS:
            raise ValueError(
                f"application PCR {app_pcr} must be within 0-{MAX_PCR} and not resettable "
                f"({', '.join(map(str, RESETTABLE_PCRS))})"
            )
        if any(not 0 <= pcr <= MAX_PCR for pcr in quote_pcrs):
            raise ValueError(f"quoted PCRs must be within 0-{MAX_PCR}")
        self.app_pcr = app_pcr
        self.quote_pcrs = tuple(sorted({app_pcr, *quote_pcrs}))
        self.key_type = key_type
        self._lock = threading.Lock()
        self._log_started = False
        self._log_start: bytes | None = None  # the PCR's value before this attester's first extend
        self._ak_certificate: dict[str, bytes] = {}
        self._tpm = tpm = TpmConnection(tcti)
        try:
            tpm.esys.startup(tpm.tss.TPM2_SU.CLEAR)  # ESAPI reports "already started" as success
            if endorsement_auth:
                tpm.esys.tr_set_auth(tpm.tss.ESYS_TR.ENDORSEMENT, endorsement_auth)
            self._banks = self._allocated_banks()
            self.log_bank = self._pick_log_bank()
            self.ek_certificate, ek_template = self._ek_template()
            self._ek = tpm.create_primary("EK", ek_template)
            self._ak = tpm.create_primary("AK", self._ak_template())
        except tpm.tss.TSS2_Exception as exc:
            tpm.close()
            raise TpmDeviceError(f"setting up the TPM over {tcti!r} failed: {exc}") from exc
        except BaseException:
            tpm.close()
            raise
        logger.info(
            "TPM ready: %s EK and AK, log in PCR %d (%s bank), quoting PCRs %s",
            key_type,
            app_pcr,
            self.log_bank,
            ",".join(map(str, self.quote_pcrs)),
        )

    # --- public API ---

    @property
    def ek_public(self) -> bytes:
        """The EK's ``TPMT_PUBLIC``."""
        return self._ek.public

    @property
    def ak_public(self) -> bytes:
        """The AK's ``TPMT_PUBLIC`` (the evidence's ``ak`` part)."""
        return self._ak.public

    @property
    def ak_name(self) -> bytes:
        """The AK's Name, what ``make_credential`` binds a credential to."""
        return object_name(self._ak.public)

    def use_ak_certificate(self, certificate: bytes, chain: bytes = b"") -> None:
        """Add an AK certificate (DER or PEM) and its intermediates (PEM) to all evidence from now on.

        Whoever vouched for the AK (e.g. the custodian after a credential
        activation) issues it; ``TpmVerifier`` checks it against its AK roots.
        """
        certificates = load_certificates(certificate, "AK certificate")
        if len(certificates) != 1:
            raise ValueError(f"expected one AK certificate, got {len(certificates)}")
        if chain:
            load_certificates(chain, "AK certificate chain")
        certified = certificates[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if certified != load_ak(self._ak.public).spki():
            raise ValueError("the AK certificate is for another key than this TPM's AK")
        parts = {"ak_cert": bytes(certificate)}
        if chain:
            parts["ak_chain"] = bytes(chain)
        with self._lock:
            self._ak_certificate = parts

    def continue_log(self, register_values: Mapping[str, bytes]) -> None:
        value = register_values.get(self.log_bank)
        if value is None or len(value) != DIGEST_SIZES[self.log_bank]:
            raise ValueError(f"no {self.log_bank} value to continue the log from")
        with self._lock:
            if self._log_started:
                raise ValueError("this attester has extended its log already")
            self._log_start = bytes(value)

    def extend(self, event_digests: Mapping[str, bytes]) -> None:
        if self.log_bank not in event_digests:
            raise ValueError(f"the event has no {self.log_bank} digest for the TPM's log bank")
        tss = self._tpm.tss
        values = []
        for bank in self._banks:
            digest = event_digests.get(bank)
            if digest is None:
                continue
            if len(digest) != DIGEST_SIZES[bank]:
                raise ValueError(f"{bank} digest is {len(digest)} bytes, expected {DIGEST_SIZES[bank]}")
            values.append(tss.TPMT_HA(hashAlg=HASH_IDS[bank], digest=tss.TPMU_HA(**{bank: digest})))
        with self._lock:
            if not self._log_started:
                self._check_log_pcr_unextended()
            with self._tpm.command(f"extending PCR {self.app_pcr}"):
                self._tpm.esys.pcr_extend(self._pcr_handle(self.app_pcr), tss.TPML_DIGEST_VALUES(values))
            self._log_started = True

    def collect(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes")
        nonce = qualifying_data(report_data)
        with self._lock:
            failure: EvidenceError | None = None
            for _ in range(_QUOTE_ATTEMPTS):
                quote, signature = self._quote(nonce)
                pcrs = {self.log_bank: self._tpm.read_pcrs(self.log_bank, self.quote_pcrs)}
                try:
                    verify_quote(quote, signature, self._ak.public, pcrs, nonce=nonce)
                except EvidenceError as exc:  # a PCR was extended between the quote and the read
                    logger.info("TPM quote does not match the PCRs read after it (%s); quoting again", exc)
                    failure = exc
                    continue
                return Evidence(
                    platform=PLATFORM,
                    parts={
                        "quote": quote,
                        "signature": signature,
                        "ak": self._ak.public,
                        "pcrs": _pcr_json(pcrs),
                        **self._ak_certificate,
                    },
                )
        raise TpmDeviceError(
            f"the TPM's quote did not check out {_QUOTE_ATTEMPTS} times in a row "
            f"(are other processes extending the quoted PCRs?): {failure}"
        )

    def read_pcrs(self, indices: Sequence[int] | None = None, *, bank: str | None = None) -> dict[int, bytes]:
        """Current PCR values of one bank (the log bank by default); all quoted PCRs by default."""
        chosen = bank or self.log_bank
        if chosen not in self._banks:
            raise ValueError(f"PCR bank {chosen} is not allocated on this TPM")
        with self._lock:
            return self._tpm.read_pcrs(chosen, tuple(sorted(set(indices or self.quote_pcrs))))

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """``TPM2_ActivateCredential``: the secret of a credential made for this TPM's EK and AK.

        The arguments are the marshalled ``TPM2B_ID_OBJECT`` and
        ``TPM2B_ENCRYPTED_SECRET`` that
        :func:`enclave.attestation.tpm_credential.make_credential` returns.
        """
        tpm = self._tpm
        tss = tpm.tss
        blob = tpm.unmarshal(tss.TPM2B_ID_OBJECT, credential_blob, "credential blob")
        secret = tpm.unmarshal(tss.TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret")
        with (
            self._lock,
            tpm.loaded(self._ak) as ak,
            tpm.loaded(self._ek) as ek,
            tpm.ek_session(self._ek) as session,
        ):
            try:
                cert_info = tpm.esys.activate_credential(
                    ak, ek, blob, secret, session1=tss.ESYS_TR.PASSWORD, session2=session
                )
            except tss.TSS2_Exception as exc:
                raise TpmDeviceError(
                    f"TPM2_ActivateCredential refused the credential ({exc}): "
                    "it was not made for this TPM's EK and AK"
                ) from exc
        return bytes(cert_info)

    def close(self) -> None:
        with self._lock:
            self._tpm.close()

    def __enter__(self) -> TpmAttester:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- setup ---

    def _allocated_banks(self) -> tuple[str, ...]:
        """The banks (of those the verifier knows) in which the application PCR is allocated."""
        _, capabilities = self._tpm.esys.get_capability(self._tpm.tss.TPM2_CAP.PCRS, 0, 1)
        allocated = []
        for selection in capabilities.data.assignedPCR:
            bitmap = bytes(selection.pcrSelect)[: selection.sizeofSelect]
            bank = next((b for b in _EXTEND_BANKS if HASH_IDS[b] == int(selection.hash)), None)
            if (
                bank
                and self.app_pcr // 8 < len(bitmap)
                and bitmap[self.app_pcr // 8] >> (self.app_pcr % 8) & 1
            ):
                allocated.append(bank)
        return tuple(allocated)

    def _pick_log_bank(self) -> str:
        for bank in LOG_BANKS:
            if bank in self._banks:
                return bank
        raise TpmDeviceError(
            f"PCR {self.app_pcr} is allocated in neither the SHA-384 nor the SHA-256 bank "
            f"(allocated: {', '.join(self._banks) or 'none'})"
        )

    def _ek_template(self) -> tuple[bytes | None, Any]:
        """The EK certificate (if any) and the EK template, per the TCG EK Credential Profile."""
        certificate, template = self._tpm.utils.create_ek_template(
            _EK_TEMPLATES[self.key_type], self._tpm.nv_reader()
        )
        return (bytes(certificate) if certificate else None), template

    def _ak_template(self) -> Any:
        tss = self._tpm.tss
        attributes = (
            tss.TPMA_OBJECT.FIXEDTPM
            | tss.TPMA_OBJECT.FIXEDPARENT
            | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
            | tss.TPMA_OBJECT.USERWITHAUTH
            | tss.TPMA_OBJECT.RESTRICTED
            | tss.TPMA_OBJECT.SIGN_ENCRYPT
        )
        return tss.TPM2B_PUBLIC.parse(
            _AK_TEMPLATES[self.key_type], objectAttributes=attributes, nameAlg="sha256"
        )

    # --- PCRs and quotes ---

    def _pcr_handle(self, index: int) -> Any:
        return getattr(self._tpm.tss.ESYS_TR, f"PCR{index}")

    def _check_log_pcr_unextended(self) -> None:
        """The application PCR holds nothing but the log so far (none, or the earlier instances')."""
        value = self._tpm.read_pcrs(self.log_bank, (self.app_pcr,))[self.app_pcr]
        if self._log_start is None and value != bytes(len(value)):
            raise TpmDeviceError(
                f"PCR {self.app_pcr} ({self.log_bank}) was already extended since the TPM last reset, so the "
                "measurement log would not replay; reboot, or choose an unused application PCR"
            )
        if self._log_start is not None and value != self._log_start:
            raise TpmDeviceError(
                f"PCR {self.app_pcr} ({self.log_bank}) holds more than the earlier instances' log: something "
                "else extended it, so the log would not replay; reboot"
            )

    def _quote(self, qualifying: bytes) -> tuple[bytes, bytes]:
        tpm = self._tpm
        with tpm.loaded(self._ak) as ak:
            try:
                quote, signature = tpm.esys.quote(
                    ak, tpm.pcr_selection(self.log_bank, self.quote_pcrs), qualifying
                )
            except tpm.tss.TSS2_Exception as exc:
                raise TpmDeviceError(f"TPM2_Quote failed: {exc}") from exc
        return bytes(quote), bytes(signature.marshal())


def _pcr_json(pcrs: Mapping[str, Mapping[int, bytes]]) -> bytes:
    """The evidence's ``pcrs`` part, as :func:`enclave.attestation.tpm.parse_pcr_values` reads it."""
    return canonical_json(
        {bank: {str(i): v.hex() for i, v in values.items()} for bank, values in pcrs.items()}
    )
