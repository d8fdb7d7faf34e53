"""Flags of the ``enclave`` command that default from their ``ENCLAVE_*`` environment variable."""

from __future__ import annotations

import argparse
import os

_ENV = {
    "custodian": "ENCLAVE_CUSTODIAN",
    "custodian_ca": "ENCLAVE_CUSTODIAN_CA",
    "deployment": "ENCLAVE_DEPLOYMENT",
    "token": "ENCLAVE_TOKEN",
    "listen": "ENCLAVE_LISTEN",
    "platform": "ENCLAVE_PLATFORM",
    "metrics": "ENCLAVE_METRICS",
    "ready_file": "ENCLAVE_READY_FILE",
    "tpm": "ENCLAVE_TPM",
    "pccs": "ENCLAVE_PCCS",
    "generation_streams": "ENCLAVE_GENERATION_STREAMS",
    "generation_queue": "ENCLAVE_GENERATION_QUEUE",
}


def env_flag(parser: argparse._ActionsContainer, flag: str, *, required: bool, **kwargs: object) -> None:
    """A flag that defaults from its environment variable, required only when that is unset too."""
    dest = flag.lstrip("-").replace("-", "_")
    env = _ENV[dest]
    fallback = kwargs.pop("default", None)  # popped first: an env value must not leave it in kwargs
    default = os.environ.get(env) or fallback
    help_text = f"{kwargs.pop('help')} (env {env})"
    parser.add_argument(
        flag,
        default=default,
        required=required and default is None,
        help=help_text,
        **kwargs,  # type: ignore[arg-type]
    )
