"""Which registers each platform's evidence reports, how long each is, and which TPM PCRs measure the OS.

A manifest can only pin what the platform's verifier reports, at the length it
reports it; anything else can never pass, so :class:`~enclave.attestation.manifest.ReferenceValues`
refuses it. The names and lengths are those of the verifiers (``sim``,
``dcap_quote``, ``sev_snp``, ``tpm``).

TPM boot chain (TCG PC Client Platform Firmware Profile, section 3.3.4, and the
boot loaders' own conventions). A TPM quote protects a model only if the PCRs
it pins cover everything that ran from the firmware up to the OS the daemon
runs in; PCRs 0-7 stop at the boot loader. The accepted sets:

* ``classic`` (UEFI or BIOS, shim and GRUB): PCRs 0-9. 0 firmware code
  (SRTM, UEFI drivers in ROM), 1 firmware configuration (UEFI variables,
  SMBIOS), 2 option ROMs and UEFI drivers from devices, 3 their configuration,
  4 boot manager and boot loaders (``EV_EFI_BOOT_SERVICES_APPLICATION``: shim,
  GRUB, and a kernel started through the firmware's LoadImage), 5 boot manager
  configuration and the GPT, 6 platform manufacturer, 7 Secure Boot policy
  (PK, KEK, db, dbx and the authorities used), 8 GRUB's commands and the kernel
  command line, 9 the files GRUB loads: kernel and initrd.
* ``uki`` (a unified kernel image started by systemd-stub): PCRs 0-7 and 11.
  4 holds the UKI itself (kernel, initrd and command line inside one signed PE
  file), 11 its sections as systemd-stub measures them, then the boot phases
  systemd-pcrphase extends (so the value to pin is the one after ``ready``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from enclave.attestation.tpm_structures import DIGEST_SIZES

TPM_PLATFORM = "tpm"
MAX_TPM_PCR = 23
# Resettable at locality 0 (TCG PC Client Platform TPM Profile): never a place for a log.
RESETTABLE_PCRS = (16, 23)

OS_PCR_SETS: Mapping[str, tuple[int, ...]] = {
    "classic": tuple(range(10)),
    "uki": (*range(8), 11),
}
BOOT_CHAIN_PCRS = tuple(sorted({pcr for pcrs in OS_PCR_SETS.values() for pcr in pcrs}))

_TDX = {
    "tee_tcb_svn": 16,
    "mrseam": 48,
    "mrsignerseam": 48,
    "seam_attributes": 8,
    "td_attributes": 8,
    "xfam": 8,
    "mrtd": 48,
    "mrconfigid": 48,
    "mrowner": 48,
    "mrownerconfig": 48,
    "rtmr0": 48,
    "rtmr1": 48,
    "rtmr2": 48,
    "rtmr3": 48,
    "tee_tcb_svn2": 16,
    "mrservicetd": 48,
}
_SGX = {
    "mrenclave": 32,
    "mrsigner": 32,
    "attributes": 16,
    "miscselect": 4,
    "isvprodid": 2,
    "isvsvn": 2,
    "config_id": 64,
    "config_svn": 2,
    "isv_ext_prod_id": 16,
    "isv_family_id": 16,
    "cpusvn": 16,
}
_SEV_SNP = {
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "family_id": 16,
    "image_id": 16,
    "report_data": 64,
}
_SIM = {"sim.boot": 48, "sim.app": 48}
# AWS Nitro attestation documents: SHA-384 PCRs, 0-31 from the Nitro Secure Module, 0-23 from NitroTPM.
_NITRO_ENCLAVE = {f"pcr{i}": 48 for i in range(32)}
_NITRO_TPM = {f"pcr{i}": 48 for i in range(24)}

REGISTER_SIZES: Mapping[str, Mapping[str, int]] = {
    "sim": _SIM,
    "tdx": _TDX,
    "sgx": _SGX,
    "sev-snp": _SEV_SNP,
    "nitro-enclave": _NITRO_ENCLAVE,
    "nitro-tpm": _NITRO_TPM,
}
PLATFORMS = tuple(sorted((*REGISTER_SIZES, TPM_PLATFORM)))

_PCR_REGISTER = re.compile(r"^pcr\.([a-z0-9]+)\.(\d{1,2})$")


def pcr_register(name: str) -> tuple[str, int] | None:
    """``("sha256", 7)`` for ``"pcr.sha256.7"``; ``None`` for a name that is not a TPM PCR of 0-23."""
    match = _PCR_REGISTER.match(name)
    if match is None or match[1] not in DIGEST_SIZES or int(match[2]) > MAX_TPM_PCR:
        return None
    if match[2] != str(int(match[2])):
        return None
    return match[1], int(match[2])


def register_size(platform: str, name: str) -> int | None:
    """The length in bytes of register ``name`` in ``platform`` evidence; ``None`` if it never has one."""
    if platform == TPM_PLATFORM:
        pcr = pcr_register(name)
        return None if pcr is None else DIGEST_SIZES[pcr[0]]
    return REGISTER_SIZES.get(platform, {}).get(name)


def pinned_pcrs(registers: Mapping[str, str]) -> set[int]:
    """The PCR indices a tpm manifest pins in a SHA-2 bank (a SHA-1 pin measures nothing today)."""
    return {pcr[1] for name in registers if (pcr := pcr_register(name)) is not None and pcr[0] != "sha1"}


def os_pcr_set(registers: Mapping[str, str]) -> str | None:
    """The name of an accepted boot-chain PCR set that ``registers`` pin entirely, or ``None``."""
    pinned = pinned_pcrs(registers)
    return next((name for name, pcrs in OS_PCR_SETS.items() if pinned.issuperset(pcrs)), None)
