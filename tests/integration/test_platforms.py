"""The hardware platforms as real processes: a TPM (swtpm) end to end, and a replayed TDX quote refused.

The TPM tests skip where swtpm or tpm2-pytss is missing, unless ``CUSTOS_REQUIRE_TPM=1``.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import connect
from enclave.attestation import ReferenceValues
from testkit.processes import DIGITS_SAMPLES, ROOT, enclave_manifest, run, script
from tests import boot_support, tpm_support

from ._loopback import Loopback

pytestmark = pytest.mark.integration
start_swtpm = tpm_support.swtpm_fixture()
TDX_QUOTE = ROOT.parent / "shared" / "vectors" / "tdx" / "dcapqvl_tdx_quote.bin"


class Platforms(Loopback):
    """One custodian with the demo model and the web console; enclaves on the platform a test picks."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, custodian_args=["--console", "127.0.0.1:0"])

    def console_json(self, path: str) -> dict[str, Any]:
        """A console page's JSON twin, in a session opened with a one-time login URL."""
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        url = self.custodian.console("console", "login")["url"]
        browser.open(url, timeout=10).close()
        base = url.split("/login/")[0]
        with browser.open(f"{base}{path}?format=json", timeout=10) as response:
            doc: dict[str, Any] = json.loads(response.read())
        return doc

    def manifest(self, name: str, *args: str, platform: str) -> Path:
        return enclave_manifest(
            self.tmp / f"{name}.toml", self.ca, self.env, platform=platform, extra_args=args
        )

    def deployment(self, name: str, manifest: Path) -> str:
        created = self.custodian.console(
            "deployment", "create", name, "--model", "digits", "--manifest", str(manifest)
        )
        self.custodian.console("grant", name, "3")
        return str(created["join_token"])

    def enrolled(self, name: str) -> list[dict[str, object]]:
        doc = self.custodian.console("enclaves")
        rows = doc["enclaves"] if isinstance(doc, dict) else doc
        return [row for row in rows if row["deployment"] == name]


@pytest.fixture
def platforms(tmp_path: Path) -> Iterator[Platforms]:
    with Platforms(tmp_path) as system:
        yield system


def test_tpm_enclave_serves_a_verified_query(
    platforms: Platforms, start_swtpm: tpm_support.StartSwtpm
) -> None:
    tpm_support.require_tpm2_pytss()
    tpm = start_swtpm()
    ek_roots = platforms.tmp / "ek-roots.pem"
    ek_roots.write_bytes(start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem)
    event_log = platforms.tmp / "binary_bios_measurements"
    event_log.write_bytes(boot_support.measure_boot(tpm.tcti, boot_support.classic_boot()))
    manifest = platforms.manifest(
        "tpm",
        "--tpm",
        tpm.tcti,
        "--event-log",
        str(event_log),
        "--tpm-ek-roots",
        str(ek_roots),
        platform="tpm",
    )
    reference = ReferenceValues.from_toml(manifest.read_text())
    assert not reference.allow_simulation
    assert not reference.allow_unmeasured_os
    assert sorted(reference.registers) == sorted(f"pcr.sha384.{i}" for i in (*range(10), 11))
    token = platforms.deployment("tpm", manifest)
    enclave = platforms.enclave("tpm", token, platform="tpm", extra_args=("--tpm", tpm.tcti))
    end_user = platforms.end_user_manifest("tpm")
    # The custodian certified the AK after its credential activation, and end users trust that.
    assert ReferenceValues.from_toml(end_user.read_text()).tpm_ak_roots
    with connect(enclave.address, end_user) as conn:
        result = conn.infer_image((DIGITS_SAMPLES / "digit-3.png").read_bytes())
    assert result.top[0].label == "three"
    (enrolled,) = platforms.enrolled("tpm")
    assert enrolled["platform"] == "tpm"
    # Admitted at its credential's activation, with the evidence its enrolment was appraised on.
    shown = platforms.console_json(f"/enclaves/{enrolled['instance_id']}")["evidence"]
    assert shown is not None, "the console kept no evidence of the tpm enclave"
    assert (shown["platform"], shown["simulated"]) == ("tpm", False)
    assert set(reference.registers) <= set(shown["registers"])  # the quoted PCRs the manifest fixes
    assert shown["log_register"] in shown["registers"]


def test_tpm_enrolment_refused_when_the_ek_certificate_is_not_trusted(
    platforms: Platforms, start_swtpm: tpm_support.StartSwtpm
) -> None:
    tpm_support.require_tpm2_pytss()
    tpm = start_swtpm()
    # Roots that did not issue the swtpm's EK certificate: the custodian's own CA.
    manifest = platforms.manifest(
        "untrusted", "--tpm", tpm.tcti, "--tpm-ek-roots", str(platforms.ca), platform="tpm"
    )
    token = platforms.deployment("untrusted", manifest)
    log = platforms.refused(
        platforms.enclave("untrusted", token, wait=False, platform="tpm", extra_args=("--tpm", tpm.tcti))
    )
    assert "EK certificate is not trusted" in log
    assert "EK certificate is not trusted" in json.dumps(platforms.custodian.console("audit", "--last", "20"))
    assert not platforms.enrolled("untrusted")


def test_a_tpm_manifest_allowing_an_unmeasured_os_is_said_out_loud_by_every_tool(
    platforms: Platforms, start_swtpm: tpm_support.StartSwtpm
) -> None:
    tpm_support.require_tpm2_pytss()
    tpm = start_swtpm()
    ek_roots = platforms.tmp / "ek-roots.pem"
    ek_roots.write_bytes(start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem)
    manifest = platforms.tmp / "unmeasured.toml"
    written = run(
        [
            script("enclave"), "manifest", "--platform", "tpm", "--tpm", tpm.tcti, "--tpm-quote-pcrs", "",
            "--allow-unmeasured-os", "--tpm-ek-roots", str(ek_roots),
            "--custodian-ca", str(platforms.ca), "--out", str(manifest),
        ],
        platforms.env,
    )  # fmt: skip
    assert "UNMEASURED OS allowed" in written.stderr
    created = run(
        [
            script("custodian"), "--data", str(platforms.custodian.data), "deployment", "create", "bare",
            "--model", "digits", "--manifest", str(manifest),
        ],
        platforms.env,
    )  # fmt: skip
    assert "UNMEASURED OS allowed" in created.stderr
    token = created.stdout.strip().splitlines()[-1]
    platforms.custodian.console("grant", "bare", "3")
    enclave = platforms.enclave("bare", token, platform="tpm", extra_args=("--tpm", tpm.tcti))
    end_user = platforms.end_user_manifest("bare")
    queried = run(
        [script("custos-query"), "--enclave", enclave.address, "--manifest", str(end_user),
         str(DIGITS_SAMPLES / "digit-3.png")],
        platforms.env,
    )  # fmt: skip
    assert "!!! UNMEASURED OS allowed" in queried.stdout


def test_tpm_manifest_pins_operator_pcrs_and_never_the_application_pcr(platforms: Platforms) -> None:
    value = "ab" * 32
    manifest = platforms.manifest(
        "pcrs", "--pcr-value", f"pcr.sha256.0={value}", "--allow-unmeasured-os", platform="tpm"
    )
    reference = ReferenceValues.from_toml(manifest.read_text())
    assert (reference.registers, reference.allow_unmeasured_os) == ({"pcr.sha256.0": value}, True)
    result = run(
        [
            script("enclave"),
            "manifest",
            "--platform",
            "tpm",
            "--pcr-value",
            f"pcr.sha256.15={value}",
            "--custodian-ca",
            str(platforms.ca),
            "--out",
            str(platforms.tmp / "app.toml"),
        ],
        platforms.env,
        check=False,
    )
    assert result.returncode == 1
    assert "application PCR" in result.stderr


def test_replayed_tdx_quote_is_refused_at_enrolment(platforms: Platforms) -> None:
    entry = platforms.tmp / "tsm" / "entry0"
    entry.mkdir(parents=True)
    shutil.copy(TDX_QUOTE, entry / "outblob")
    (entry / "provider").write_text("tdx_guest\n")
    pinned = [
        arg for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2") for arg in ("--register", f"{name}={'00' * 48}")
    ]
    manifest = platforms.manifest("tdx", *pinned, platform="tdx")
    assert not ReferenceValues.from_toml(manifest.read_text()).allow_simulation
    token = platforms.deployment("tdx", manifest)
    log = platforms.refused(
        platforms.enclave("tdx", token, wait=False, platform="tdx", extra_args=("--tsm-entry", str(entry)))
    )
    assert "report data" in log
    assert "report data" in json.dumps(platforms.custodian.console("audit", "--last", "20"))
    assert not platforms.enrolled("tdx")
