"""Challenges keyed from the replicas' shared secret: any replica checks what another issued."""

from __future__ import annotations

import datetime
import os

import pytest

from custodian.challenges import Challenges, _derive
from custodian.errors import RefusedError

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)


def test_replicas_sharing_the_secret_check_each_others_nonces_and_credential_challenges() -> None:
    secret = os.urandom(32)
    first, second = Challenges.shared(secret, ttl_seconds=60), Challenges.shared(secret, ttl_seconds=60)
    nonce = first.nonce("d", NOW)
    assert second.check_nonce(nonce, "d", NOW) == NOW + datetime.timedelta(seconds=60)
    sealed = first.seal_credential("d", b"s" * 32, b"key", b"ak", NOW)
    pending = second.open_credential(sealed, NOW)
    assert (pending.deployment, pending.secret, pending.public_key, pending.ak_public) == (
        "d",
        b"s" * 32,
        b"key",
        b"ak",
    )


def test_another_secret_or_a_process_of_its_own_refuses_them() -> None:
    issuer = Challenges.shared(os.urandom(32), ttl_seconds=60)
    nonce, sealed = issuer.nonce("d", NOW), issuer.seal_credential("d", b"s", b"k", b"a", NOW)
    for other in (Challenges.shared(os.urandom(32), ttl_seconds=60), Challenges(ttl_seconds=60)):
        with pytest.raises(RefusedError, match="unknown"):
            other.check_nonce(nonce, "d", NOW)
        with pytest.raises(RefusedError, match="unknown"):
            other.open_credential(sealed, NOW)


def test_the_secret_itself_is_neither_key() -> None:
    """The keys are derived, one label each: a challenge key found says nothing of the model KEK."""
    secret = os.urandom(32)
    derived = Challenges.shared(secret, ttl_seconds=60)
    with pytest.raises(RefusedError):
        Challenges(ttl_seconds=60, mac_key=secret).check_nonce(derived.nonce("d", NOW), "d", NOW)
    with pytest.raises(RefusedError):
        Challenges(ttl_seconds=60, seal_key=secret).open_credential(
            derived.seal_credential("d", b"s", b"k", b"a", NOW), NOW
        )


def test_each_key_has_a_label_of_its_own() -> None:
    secret = os.urandom(32)
    assert _derive(secret, b"nonce") != _derive(secret, b"credential")
    assert _derive(secret, b"nonce") == _derive(secret, b"nonce")
