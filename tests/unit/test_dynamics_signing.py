"""RequestSigner: Standard Webhooks headers that any Standard Webhooks library verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from certsync.dynamics.signing import RequestSigner

KEY = b"certsync-unit-test-signing-key!!"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
BODY = b'{"contract_version":1,"event_id":"6f1c2a34-0b1d-4c5e-9f00-1234567890ab"}'
MESSAGE_ID = "6f1c2a34-0b1d-4c5e-9f00-1234567890ab"


def test_headers_verify_with_the_standard_webhooks_library() -> None:
    # The library checks the timestamp against the real wall clock, so sign "now".
    headers = RequestSigner(SECRET).headers(MESSAGE_ID, BODY, datetime.now(UTC))

    assert Webhook(SECRET).verify(BODY, headers, json_parse=False) is None


def test_a_body_changed_after_signing_fails_verification() -> None:
    headers = RequestSigner(SECRET).headers(MESSAGE_ID, BODY, datetime.now(UTC))

    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY.replace(b"1", b"2", 1), headers)


def test_signature_is_hmac_sha256_over_id_timestamp_and_body_as_the_spec_defines() -> None:
    at = datetime(2026, 11, 29, 10, 0, 0, 900_000, tzinfo=UTC)

    headers = RequestSigner(SECRET).headers(MESSAGE_ID, BODY, at)

    digest = hmac.new(KEY, f"{MESSAGE_ID}.1795946400.".encode() + BODY, hashlib.sha256).digest()
    assert headers == {
        "webhook-id": MESSAGE_ID,
        "webhook-timestamp": "1795946400",
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def test_a_secret_that_is_not_standard_webhooks_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="whsec_") as raised:
        RequestSigner("whsec_!!!")

    assert "!!!" not in str(raised.value)


def test_a_naive_signing_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        RequestSigner(SECRET).headers(MESSAGE_ID, BODY, datetime(2026, 11, 29, 10, 0))


def test_the_signers_repr_does_not_reveal_the_secret() -> None:
    assert SECRET.removeprefix("whsec_") not in repr(RequestSigner(SECRET))
