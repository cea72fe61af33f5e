"""Reading a request body in an ASGI middleware up to a limit, and handing it on to the app as if unread."""

from __future__ import annotations


class BodyTooLarge(Exception):
    """The body grew past the limit while it was read."""


async def read_capped(receive, limit: int) -> bytes | None:
    """The whole body, read in chunks; None when the client disconnected first.

    Raises:
        BodyTooLarge: past ``limit`` bytes (what was read so far is dropped).
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` whole first, then whatever ``receive`` gives (a disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
