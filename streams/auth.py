"""Bearer-token authentication of the worker's HTTP API (query, status, dashboard data)."""

from __future__ import annotations

import hmac

from faust.web import Request

from tally.config import Settings

UNAUTHORIZED = {"error": "missing or wrong bearer token: send 'Authorization: Bearer <TALLY_API_TOKEN>'"}


def authorized(request: Request, settings: Settings) -> bool:
    """Whether the request may use the API: no token configured (loopback only), or `Authorization: Bearer <it>`.

    The comparison takes the same time whatever the token sent; the token is never logged or echoed.
    """
    if not settings.api_token:
        return True
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), settings.api_token.encode())
