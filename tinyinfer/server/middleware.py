"""The checks every request passes before a route sees it: its API key, then its body's size.

Both are plain ASGI middleware (a callable that wraps the app), so they run before FastAPI
reads or parses anything: a client without the key cannot make the server read a megabyte,
and an oversized body is refused before it is held in memory.
"""

import hmac

from tinyinfer.server.errors import error_response


class APIKeyCheck:
    """Requests to the API (/v1/...) must carry `Authorization: Bearer KEY`; 401 otherwise.

    The key is compared with hmac.compare_digest, whose time does not depend on where the
    first wrong character is, so the key cannot be guessed one character at a time by timing
    the answers. /health, /metrics and the chat page stay open, as in vLLM: a load balancer and
    a metrics scraper have no key, and the page asks its user for it."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = bearer_token(scope)
            if given is None or not hmac.compare_digest(given, self.api_key):
                message = ("no API key: send it in an Authorization header, `Authorization: Bearer KEY`"
                           if given is None else "wrong API key")
                response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bearer_token(scope) -> bytes | None:
    """The KEY of an `Authorization: Bearer KEY` header, or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class BodySizeLimit:
    """Refuse a request body over max_body_bytes with 413, whether its Content-Length says so
    (refused before a byte is read) or it streams in without one (refused as soon as it
    passes the limit). The body read is then handed to the app as if it came from the client."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(scope, receive, send, f"{int(length)} bytes")
            return
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before it finished sending
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send, f"more than {self.max_body_bytes} bytes")
                return
        await self.app(scope, replay(b"".join(body), receive), send)

    async def _too_large(self, scope, receive, send, size: str):
        message = f"the request body is {size}; this server takes at most {self.max_body_bytes} bytes"
        await error_response(413, message, code="request_too_large")(scope, receive, send)


def replay(body: bytes, receive):
    """A receive() that gives the body already read, then what the client sends next (its
    disconnect, which the handlers watch for)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
