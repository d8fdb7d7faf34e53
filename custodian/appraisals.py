"""Appraisals waiting for their instance: a tpm enclave's, from its evidence to its credential.

A tpm enclave's evidence is appraised at enrolment, but the enclave is admitted
(and given its instance id) only when it activates the credential challenge
(``custodian.enrolment``). What the ``on_admitted`` hook is told of, the
evidence, its claims and the appraisal, waits here until then, under the
challenge's spent key (the same in every spelling of the challenge id). Only a
caller that showed the deployment's join token and whose evidence passed gets
an entry, and the entries are bounded: at most ``MAX_PENDING``, the oldest
dropped first, each gone when its challenge expires or is used. Memory only:
an activation that reaches another replica admits the enclave without it.
"""

from __future__ import annotations

import collections
import datetime
from dataclasses import dataclass

from enclave.attestation.appraisal import Appraisal

MAX_PENDING = 256


@dataclass(frozen=True)
class Appraised:
    evidence: bytes
    claims: bytes
    appraisal: Appraisal
    expires_at: datetime.datetime


class PendingAppraisals:
    def __init__(self, limit: int = MAX_PENDING) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._pending: collections.OrderedDict[bytes, Appraised] = collections.OrderedDict()

    def keep(self, key: bytes, appraised: Appraised, now: datetime.datetime) -> None:
        self._forget_expired(now)
        self._pending[key] = appraised
        while len(self._pending) > self._limit:
            self._pending.popitem(last=False)

    def take(self, key: bytes, now: datetime.datetime) -> Appraised | None:
        """The appraisal kept under ``key`` (once: it is forgotten), or None if none or expired."""
        appraised = self._pending.pop(key, None)
        if appraised is None or now > appraised.expires_at:
            return None
        return appraised

    def __len__(self) -> int:
        return len(self._pending)

    def _forget_expired(self, now: datetime.datetime) -> None:
        # Kept in order of arrival with one lifetime, so they expire oldest first.
        while self._pending and now > next(iter(self._pending.values())).expires_at:
            self._pending.popitem(last=False)
