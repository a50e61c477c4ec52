"""Who may use the console: operator credentials from settings, signed session cookies, CSRF tokens and
the sign-in throttle.

A session is a small JSON object (operator, CSRF token, expiry and, once signed in, the id of its row in
``console_sessions``) signed with HMAC-SHA256. Console processes sharing ``CERTSYNC_CONSOLE_SESSION_SECRET``
and the database accept each other's cookies; a signed-in cookie holds only while its row exists, so
signing out or revoking every session ends it everywhere. Every comparison of a secret uses
``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from certsync.errors import ConfigurationError
from certsync.resilience.clock import Clock
from certsync.settings import Settings

SESSION_COOKIE = "certsync_console"
MIN_TOKEN_LENGTH = 24
MIN_PASSWORD_LENGTH = 12
MIN_SESSION_SECRET_LENGTH = 32


class ConsoleConfigurationError(ConfigurationError):
    """The console cannot accept anyone with these settings; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Session:
    """A browser's session: ``operator`` is None until sign-in. ``csrf`` goes in every form it posts;
    ``record`` is the id of the signed-in session's row in ``console_sessions``."""

    operator: str | None
    csrf: str
    expires_at: float
    record: str | None = None

    @classmethod
    def anonymous(cls, expires_at: float) -> Session:
        return cls(operator=None, csrf=secrets.token_urlsafe(32), expires_at=expires_at)

    def signed_in(self, operator: str, expires_at: float, record: str) -> Session:
        # A fresh CSRF token at sign-in: one planted before sign-in is worth nothing after it.
        return replace(
            self, operator=operator, csrf=secrets.token_urlsafe(32), expires_at=expires_at, record=record
        )

    def accepts_csrf(self, submitted: str | None) -> bool:
        return submitted is not None and _same(submitted, self.csrf)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Signs sessions into cookie values and reads them back; a tampered or expired cookie is None."""

    def __init__(self, secret: bytes, lifetime: timedelta, clock: Clock) -> None:
        self._key = hashlib.sha256(b"certsync-console-session\x00" + secret).digest()
        self._lifetime = lifetime
        self._clock = clock

    @property
    def lifetime(self) -> timedelta:
        return self._lifetime

    def expiry(self) -> float:
        return (self._clock.now() + self._lifetime).timestamp()

    def new_anonymous(self) -> Session:
        return Session.anonymous(self.expiry())

    def encode(self, session: Session) -> str:
        body = json.dumps(
            {"op": session.operator, "csrf": session.csrf, "exp": session.expires_at, "rec": session.record},
            separators=(",", ":"),
        ).encode("utf-8")
        payload = _b64(body)
        return f"{payload}.{self._sign(payload)}"

    def decode(self, value: str | None) -> Session | None:
        if not value or value.count(".") != 1:
            return None
        payload, signature = value.split(".")
        if not _same(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(
                operator=data["op"], csrf=str(data["csrf"]), expires_at=float(data["exp"]), record=data["rec"]
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        well_formed = all(v is None or isinstance(v, str) for v in (session.operator, session.record))
        if not well_formed or session.expires_at <= self._clock.now().timestamp():
            return None
        return session

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())


@dataclass(frozen=True, slots=True)
class OperatorCredentials:
    """The configured ways in: a bearer token (acting as ``token_operator``) and/or a username+password."""

    token: str | None
    token_operator: str
    username: str | None
    password: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> OperatorCredentials:
        token = settings.console_operator_token
        password = settings.console_password
        credentials = cls(
            token=token.get_secret_value() if token is not None else None,
            token_operator=settings.console_operator_name,
            username=settings.console_username,
            password=password.get_secret_value() if password is not None else None,
        )
        credentials.check()
        return credentials

    def check(self) -> None:
        if self.token is None and (self.username is None or self.password is None):
            raise ConsoleConfigurationError(
                "CERTSYNC_CONSOLE_OPERATOR_TOKEN or CERTSYNC_CONSOLE_USERNAME with"
                " CERTSYNC_CONSOLE_PASSWORD must be set: nobody could sign in"
            )
        if (self.username is None) != (self.password is None):
            raise ConsoleConfigurationError(
                "CERTSYNC_CONSOLE_USERNAME and CERTSYNC_CONSOLE_PASSWORD are set together"
            )
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ConsoleConfigurationError(
                f"CERTSYNC_CONSOLE_OPERATOR_TOKEN must be at least {MIN_TOKEN_LENGTH} characters"
            )
        if self.password is not None and len(self.password) < MIN_PASSWORD_LENGTH:
            raise ConsoleConfigurationError(
                f"CERTSYNC_CONSOLE_PASSWORD must be at least {MIN_PASSWORD_LENGTH} characters"
            )

    def operator_for_token(self, token: str | None) -> str | None:
        if self.token is None or not token:
            return None
        return self.token_operator if _same(token, self.token) else None

    def operator_for_password(self, username: str | None, password: str | None) -> str | None:
        if self.username is None or self.password is None or not username or not password:
            return None
        # Both compared whatever the first says, so timing does not tell which one was wrong.
        user_ok = _same(username, self.username)
        password_ok = _same(password, self.password)
        return self.username if user_ok and password_ok else None


def session_secret(settings: Settings) -> bytes:
    """The configured secret, or a random one: sessions then end when the process does."""
    if settings.console_session_secret is not None:
        secret = settings.console_session_secret.get_secret_value()
        if len(secret) < MIN_SESSION_SECRET_LENGTH:
            raise ConsoleConfigurationError(
                f"CERTSYNC_CONSOLE_SESSION_SECRET must be at least {MIN_SESSION_SECRET_LENGTH} characters"
            )
        return secret.encode("utf-8")
    return secrets.token_bytes(32)


def listens_beyond_loopback(host: str) -> bool:
    """Whether a console listening on ``host`` can be reached from another machine (its cookie is then
    ``Secure``): anything but a loopback address or ``localhost``, including every-interface binds."""
    if host.lower().rstrip(".") == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True  # a name: it resolves to whatever the network says


class SignInThrottle:
    """At most ``attempts`` failed sign-ins per username in any ``window``; past that, every attempt for
    it (the right password too) is refused until the oldest of those failures leaves the window.

    Kept in this process's memory: with one console process that is every attempt (docs/console.md).
    ``max_usernames`` bounds the memory a stream of made-up usernames can take: the longest-idle go first.
    """

    def __init__(
        self,
        clock: Clock,
        attempts: int = 5,
        window: timedelta = timedelta(minutes=5),
        max_usernames: int = 10_000,
    ) -> None:
        self._clock = clock
        self._attempts = attempts
        self._window = window
        self._max_usernames = max_usernames
        self._failures: dict[str, deque[datetime]] = {}

    def retry_after(self, username: str) -> int | None:
        """Whole seconds until ``username`` may try again; None while it may."""
        failures = self._failures.get(username)
        if failures is None or len(failures) < self._attempts:
            return None
        wait = (failures[0] + self._window - self._clock.now()).total_seconds()
        return math.ceil(wait) if wait > 0 else None

    def failed(self, username: str) -> None:
        failures = self._failures.pop(username, None) or deque(maxlen=self._attempts)
        failures.append(self._clock.now())
        self._failures[username] = failures  # re-inserted: the dict's order is least recently failed first
        while len(self._failures) > self._max_usernames:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, username: str) -> None:
        self._failures.pop(username, None)
