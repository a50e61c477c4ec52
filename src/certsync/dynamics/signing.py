"""Standard Webhooks signatures on requests to the portal, so it can verify them with any such library.

The portal checks ``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}"))
over the exact body bytes it received, and rejects timestamps more than a few minutes off its clock.
``webhook-id`` is the event id, the same value as ``Idempotency-Key``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

__all__ = ["RequestSigner"]


class RequestSigner:
    """Signs request bodies with a ``whsec_…`` secret (``CERTSYNC_DYNAMICS_SIGNING_SECRET``)."""

    __slots__ = ("_webhook",)

    def __init__(self, secret: str) -> None:
        try:
            self._webhook = Webhook(secret)
        except (ValueError, EmptyWebhookSecretError):
            # Never echo the secret: the message names the expected shape only.
            raise ValueError("signing secret must be whsec_ followed by base64") from None

    def __repr__(self) -> str:
        return "RequestSigner(secret=***)"

    def headers(self, message_id: str, body: bytes, at: datetime) -> dict[str, str]:
        """The three Standard Webhooks headers for ``body`` sent at ``at`` (timezone-aware)."""
        if at.tzinfo is None:
            raise ValueError("signing time must be timezone-aware")
        # The header carries whole seconds; sign that same second so the portal recomputes our HMAC.
        seconds = math.floor(at.timestamp())
        signature = self._webhook.sign(
            msg_id=message_id,
            timestamp=datetime.fromtimestamp(seconds, UTC),
            data=body.decode("utf-8"),
        )
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": signature,
        }
