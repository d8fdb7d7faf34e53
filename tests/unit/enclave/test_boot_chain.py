"""``enclave manifest --event-log``: the log must replay to the pinned PCRs; it shows what each holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from enclave._daemon.boot_chain import components_text, pinned_components, read_event_log
from enclave._daemon.cli import main
from enclave._daemon.errors import ConfigError
from enclave.attestation.event_log import MAX_EVENT_LOG_BYTES
from tests import boot_support
from tests.unit.enclave.fake_custodian import CertAuthority


def _pins(events: list[boot_support.BootEvent], bank: str = "sha256") -> dict[str, str]:
    """What a TPM that measured ``events`` holds in PCRs 0-9."""
    size = hashlib.new(bank).digest_size
    values = {pcr: bytes(size) for pcr in range(10)}
    for event in events:
        values[event.pcr] = hashlib.new(
            bank, values[event.pcr] + hashlib.new(bank, event.data).digest()
        ).digest()
    return {f"pcr.{bank}.{pcr}": value.hex() for pcr, value in values.items()}


def _log_file(tmp_path: Path, events: list[boot_support.BootEvent]) -> Path:
    path = tmp_path / "binary_bios_measurements"
    path.write_bytes(boot_support.event_log(events))
    return path


def test_each_pinned_pcr_is_shown_with_what_it_holds(tmp_path: Path) -> None:
    boot = boot_support.classic_boot()
    components = pinned_components(read_event_log(_log_file(tmp_path, boot)), _pins(boot))
    assert components["pcr.sha256.9"] == ["EV_IPL: vmlinuz 6.8 genuine", "EV_IPL: /initrd.img"]
    assert components["pcr.sha256.8"] == ["EV_IPL: kernel_cmdline: /vmlinuz ro lockdown=confidentiality"]
    assert "pcr.sha256.9\n    EV_IPL: vmlinuz 6.8 genuine" in components_text(components)


def test_a_log_of_another_boot_than_the_pinned_pcrs_is_refused(tmp_path: Path) -> None:
    pinned = _pins(boot_support.classic_boot(kernel=b"the approved kernel"))
    log = read_event_log(_log_file(tmp_path, boot_support.classic_boot()))
    with pytest.raises(ConfigError, match="PCR 9 is"):
        pinned_components(log, pinned)


def test_an_oversized_or_malformed_log_file_is_one_config_error(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"\1" * (MAX_EVENT_LOG_BYTES + 1))
    with pytest.raises(ConfigError, match="limit"):
        read_event_log(big)
    with pytest.raises(ConfigError, match="cannot read"):
        read_event_log(tmp_path / "missing")


def test_the_manifest_command_refuses_a_log_that_does_not_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENCLAVE_TPM", raising=False)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CertAuthority("custodian test CA").pem)
    pinned = _pins(boot_support.classic_boot(kernel=b"the approved kernel"))
    argv = ["manifest", "--platform", "tpm", "--out", str(tmp_path / "m.toml"), "--custodian-ca", str(ca)]
    argv += [arg for name, value in pinned.items() for arg in ("--pcr-value", f"{name}={value}")]
    argv += ["--event-log", str(_log_file(tmp_path, boot_support.classic_boot()))]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("enclave: error: --event-log: the event log does not match")
    assert not (tmp_path / "m.toml").exists()
