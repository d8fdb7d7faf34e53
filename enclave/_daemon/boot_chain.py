"""``enclave manifest --event-log``: check the boot PCRs a manifest pins against the machine's event log.

The firmware and boot loaders log every measurement they extend
(``/sys/kernel/security/tpm0/binary_bios_measurements``). Replaying that log
must give exactly the PCR values the manifest pins, read from the TPM or given
by the operator; then each pinned PCR can be shown with the components it
holds, so the operator sees what the manifest approves (which kernel, which
command line, which Secure Boot keys) before sending it to the custodian.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from enclave._daemon.errors import ConfigError
from enclave.attestation.event_log import MAX_EVENT_LOG_BYTES, EventLog, parse_event_log, pcr_components
from enclave.attestation.register_layout import pcr_register
from enclave.errors import EventLogError


def read_event_log(path: Path) -> EventLog:
    """The event log at ``path``, read within :data:`MAX_EVENT_LOG_BYTES`."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_EVENT_LOG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"--event-log: cannot read {path}: {exc.strerror}") from None
    try:
        return parse_event_log(data)
    except EventLogError as exc:
        raise ConfigError(f"--event-log {path}: {exc}") from None


def pinned_components(log: EventLog, registers: Mapping[str, str]) -> dict[str, list[str]]:
    """Check every pinned PCR against the log's replay; return, per pinned register, what it holds.

    Raises ``ConfigError`` naming each PCR whose pinned value the log does not replay to.
    """
    by_bank: dict[str, dict[int, bytes]] = {}
    for name, value in registers.items():
        pcr = pcr_register(name)
        if pcr is not None:
            by_bank.setdefault(pcr[0], {})[pcr[1]] = bytes.fromhex(value)
    if not by_bank:
        raise ConfigError("--event-log needs pinned boot PCRs (--tpm with --tpm-quote-pcrs, or --pcr-value)")
    components: dict[str, list[str]] = {}
    for bank, values in sorted(by_bank.items()):
        try:
            log.check_against(bank, values)
        except EventLogError as exc:
            raise ConfigError(f"--event-log: {exc}") from None
        for index, events in pcr_components(log, sorted(values)).items():
            components[f"pcr.{bank}.{index}"] = events or [
                "(nothing measured: the PCR is at its reset value)"
            ]
    return components


def components_text(components: Mapping[str, list[str]]) -> str:
    lines = ["boot chain (each pinned PCR, replayed from the event log, and what it holds):"]
    for register, events in components.items():
        lines.append(f"  {register}")
        lines += [f"    {event}" for event in events]
    return "\n".join(lines)
