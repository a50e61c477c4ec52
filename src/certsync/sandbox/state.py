"""The sandbox portal's memory: its configuration, stored certifications, issued tokens and request log.

Everything lives in one ``Sandbox`` object, mutated from the server's event loop. A lock guards each
method so that a test thread may also read a snapshot (``SandboxServer.sandbox``) while it serves.
"""

from __future__ import annotations

import bisect
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from certsync.dynamics.contract import CONTRACT_VERSION
from certsync.resilience.clock import Clock, Sleep, SystemClock, real_sleep
from certsync.sandbox.faults import FaultDecision, FaultEngine, FaultScript

DEFAULT_TOKEN = "sandbox-token"  # noqa: S105  (a well-known local default, documented in docs/sandbox.md)
DEFAULT_CLIENT_ID = "certsync"
DEFAULT_CLIENT_SECRET = "sandbox-secret"  # noqa: S105  (idem)


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """How the sandbox starts (``POST /_sandbox/reset`` returns to exactly this).

    ``static_tokens`` are always-valid bearer tokens; ``client_id``/``client_secret`` are what
    ``POST /oauth2/token`` accepts; ``signing_secret`` (``whsec_…``), when set, makes the Standard
    Webhooks signature mandatory on every PUT. ``monotonic`` drives token expiry and rate-limit
    windows, ``clock`` stamps the request log, ``sleep`` waits out injected latency.
    """

    static_tokens: tuple[str, ...] = field(default=(DEFAULT_TOKEN,), repr=False)
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = field(default=DEFAULT_CLIENT_SECRET, repr=False)
    token_ttl_seconds: int = 3599
    signing_secret: str | None = field(default=None, repr=False)
    contract_versions: tuple[int, ...] = (CONTRACT_VERSION,)
    faults: FaultScript = field(default_factory=FaultScript)
    request_log_size: int = 100_000
    monotonic: Callable[[], float] = time.monotonic
    clock: Clock = field(default_factory=SystemClock)
    sleep: Sleep = real_sleep

    def __post_init__(self) -> None:
        if not self.contract_versions or any(version < 1 for version in self.contract_versions):
            raise ValueError("contract_versions must name at least one version, each 1 or more")
        if self.token_ttl_seconds < 1:
            raise ValueError("token_ttl_seconds must be at least 1")
        if self.signing_secret is not None:
            try:
                Webhook(self.signing_secret)
            except (ValueError, EmptyWebhookSecretError) as exc:
                raise ValueError(
                    f"signing_secret is not a Standard Webhooks secret (whsec_…): {exc}"
                ) from None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One portal request as received and answered. Never carries the token or the body.

    ``status`` is ``None`` when the connection was dropped; ``fault`` names what was injected
    (``status:503``, ``drop``, ``rate_limit:window``, ``rate_limit:concurrency``); ``outcome`` is what
    the portal made of it (``stored``, ``ignored_not_newer``, ``invalid_token``, ``invalid_body``, …).
    """

    seq: int
    at: datetime
    method: str
    path: str
    idempotency_key: str | None
    webhook_id: str | None
    has_authorization: bool
    status: int | None
    fault: str | None
    outcome: str | None
    delay_ms: float

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


@dataclass(frozen=True, slots=True)
class UpsertOutcome:
    """What a valid PUT did: ``applied`` when its version was newer than the one held."""

    applied: bool
    certification_id: str
    version: int
    current_version: int


@dataclass(frozen=True, slots=True)
class IgnoredUpsert:
    """A PUT acknowledged but not applied because the portal already held this or a newer version."""

    certification_id: str
    event_id: str
    version: int
    held_version: int


class Tokens:
    """Bearer tokens a sandbox accepts: its static ones, and those its ``/oauth2/token`` issued.

    Shared by the contract-v1 sandbox and the Dataverse emulator; thread-safe on its own.
    """

    def __init__(
        self,
        *,
        static_tokens: tuple[str, ...],
        client_id: str,
        client_secret: str,
        ttl_seconds: int,
        monotonic: Callable[[], float],
    ) -> None:
        self._static = static_tokens
        self._client_id, self._client_secret = client_id, client_secret
        self.ttl_seconds = ttl_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._issued: dict[str, float] = {}

    def credentials_match(self, client_id: str, client_secret: str) -> bool:
        id_ok = hmac.compare_digest(client_id.encode(), self._client_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), self._client_secret.encode())
        return id_ok and secret_ok

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._issued[token] = self._monotonic() + self.ttl_seconds
        return token

    def is_valid(self, token: str) -> bool:
        if any(hmac.compare_digest(token.encode(), known.encode()) for known in self._static):
            return True
        with self._lock:
            expires_at = self._issued.get(token)
            return expires_at is not None and self._monotonic() < expires_at

    def expire_all(self) -> int:
        """Forget every issued token (static tokens stay valid); returns how many there were."""
        with self._lock:
            count = len(self._issued)
            self._issued.clear()
            return count


class Sandbox:
    """The portal's whole mutable state, built from a ``SandboxConfig``."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        self.faults = FaultEngine(config.faults, config.monotonic)
        self.tokens = Tokens(
            static_tokens=config.static_tokens,
            client_id=config.client_id,
            client_secret=config.client_secret,
            ttl_seconds=config.token_ttl_seconds,
            monotonic=config.monotonic,
        )
        self.reset()

    def reset(self) -> None:
        """Forget everything received and return to the start configuration."""
        with self._lock:
            self._certifications: dict[str, dict[str, Any]] = {}
            self._ordered_ids: list[str] = []  # the keys of _certifications, sorted: paged reads
            self._deleted: list[str] = []
            self._history: dict[str, list[int]] = {}
            self._ignored: list[IgnoredUpsert] = []
            self.tokens.expire_all()
            self._contract_versions = self.config.contract_versions
            self._requests: deque[RecordedRequest] = deque(maxlen=self.config.request_log_size)
            self._seq = 0
            self.faults.load(self.config.faults)

    # contract versions -------------------------------------------------------------------------------

    @property
    def contract_versions(self) -> tuple[int, ...]:
        return self._contract_versions

    def set_contract_versions(self, versions: tuple[int, ...]) -> None:
        """Switch what the portal accepts at run time (the contract changed after implementation)."""
        with self._lock:
            self._contract_versions = versions

    # tokens ------------------------------------------------------------------------------------------

    def credentials_match(self, client_id: str, client_secret: str) -> bool:
        return self.tokens.credentials_match(client_id, client_secret)

    def issue_token(self) -> str:
        return self.tokens.issue()

    def token_is_valid(self, token: str) -> bool:
        return self.tokens.is_valid(token)

    def expire_tokens(self) -> int:
        """Expire every token this sandbox issued (static tokens stay valid); returns how many."""
        return self.tokens.expire_all()

    # certifications ----------------------------------------------------------------------------------

    def upsert(self, body: dict[str, Any]) -> UpsertOutcome:
        """Keep the body unless the portal holds a newer version (an equal one replaces it: a resend
        is harmless); an older one is acknowledged and recorded as ignored."""
        certification = body["certification"]
        cert_id = str(certification["id"]).lower()
        version = int(certification["version"])
        with self._lock:
            held = self._certifications.get(cert_id)
            held_version = int(held["certification"]["version"]) if held is not None else 0
            if version < held_version:
                self._ignored.append(IgnoredUpsert(cert_id, str(body["event_id"]), version, held_version))
                return UpsertOutcome(False, cert_id, version, held_version)
            if held is None:
                bisect.insort(self._ordered_ids, cert_id)
            self._certifications[cert_id] = body
            self._history.setdefault(cert_id, []).append(version)
            return UpsertOutcome(True, cert_id, version, version)

    def delete(self, certification_id: str) -> bool:
        """Forget one certification; False when it was not held (the route answers 404)."""
        cert_id = certification_id.lower()
        with self._lock:
            if self._certifications.pop(cert_id, None) is None:
                return False
            del self._ordered_ids[bisect.bisect_left(self._ordered_ids, cert_id)]
            self._deleted.append(cert_id)
            return True

    def page(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` held certifications with ids above ``after``, by id, and the next cursor."""
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._ordered_ids, after.lower())
            ids = self._ordered_ids[start : start + limit]
            rows = [
                {
                    "id": cert_id,
                    "version": int(self._certifications[cert_id]["certification"]["version"]),
                    "status": self._certifications[cert_id]["certification"]["status"],
                    "publicly_listed": self._certifications[cert_id]["publicly_listed"],
                }
                for cert_id in ids
            ]
            more = start + limit < len(self._ordered_ids)
            return rows, (ids[-1] if ids and more else None)

    def plant(self, body: dict[str, Any]) -> None:
        """Hold ``body`` as it is, whatever it holds now (tests and benchmarks plant drift with it)."""
        cert_id = str(body["certification"]["id"]).lower()
        with self._lock:
            if cert_id not in self._certifications:
                bisect.insort(self._ordered_ids, cert_id)
            self._certifications[cert_id] = body

    def public_listing(self) -> list[str]:
        """Mentors with at least one certification whose latest state is publicly listed, sorted."""
        with self._lock:
            return sorted(
                {
                    str(body["certification"]["peer_mentor_id"]).lower()
                    for body in self._certifications.values()
                    if body["publicly_listed"] is True
                }
            )

    def snapshot(self) -> dict[str, Any]:
        """The stored state as JSON: latest bodies, accepted version history, ignored upserts."""
        with self._lock:
            return {
                "contract_versions": list(self._contract_versions),
                "certifications": dict(self._certifications),
                "history": {cert_id: list(versions) for cert_id, versions in self._history.items()},
                "ignored": [asdict(ignored) for ignored in self._ignored],
                "deleted": list(self._deleted),
                "public_listing": self.public_listing(),
            }

    # request log -------------------------------------------------------------------------------------

    def decide(self, method: str, path: str) -> FaultDecision:
        with self._lock:
            return self.faults.decide(method, path)

    def finish(self, decision: FaultDecision) -> None:
        with self._lock:
            self.faults.finish(decision)

    def load_faults(self, script: FaultScript) -> None:
        with self._lock:
            self.faults.load(script)

    def record(
        self,
        *,
        method: str,
        path: str,
        headers: dict[str, str],
        status: int | None,
        decision: FaultDecision,
        outcome: str | None,
    ) -> RecordedRequest:
        """Append one request to the bounded log (the oldest fall off past ``request_log_size``)."""
        with self._lock:
            self._seq += 1
            entry = RecordedRequest(
                seq=self._seq,
                at=self.config.clock.now(),
                method=method,
                path=path,
                idempotency_key=headers.get("idempotency-key"),
                webhook_id=headers.get("webhook-id"),
                has_authorization=bool(headers.get("authorization", "").strip()),
                status=status,
                fault=decision.fault,
                outcome=outcome,
                delay_ms=round(decision.delay * 1000, 3),
            )
            self._requests.append(entry)
            return entry

    def requests(self, since: int = 0) -> list[RecordedRequest]:
        """Recorded requests with ``seq`` greater than ``since``, oldest first."""
        with self._lock:
            return [entry for entry in self._requests if entry.seq > since]
