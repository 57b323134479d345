"""One-shot upload bodies: a byte limit counted as the body arrives (chunked or not), and what each part is.

Starlette's multipart parser spools files over 1 MiB to disk; with `limited_request` in front it stops reading
(and the route answers MESSAGE_TOO_LARGE) as soon as the body passes the limit, whatever Content-Length said
or whether there was one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Message, Receive

from serve_app.errors import ErrorCode, ServiceError
from serve_app.media.video import ACCEPTED, is_video, sniff_container


def too_large(limit: int) -> ServiceError:
    return ServiceError(ErrorCode.MESSAGE_TOO_LARGE, f"upload exceeds {limit} bytes")


class BodyLimit:
    """An ASGI `receive` that counts request body bytes and raises MESSAGE_TOO_LARGE past `limit`."""

    def __init__(self, receive: Receive, limit: int):
        self.receive, self.limit, self.received = receive, limit, 0

    async def __call__(self) -> Message:
        msg = await self.receive()
        if msg["type"] == "http.request":
            self.received += len(msg.get("body", b""))
            if self.received > self.limit:
                raise too_large(self.limit)
        return msg


def limited_request(request: Request, limit: int) -> Request:
    """The same request, its body read through a `BodyLimit`; a declared Content-Length over it fails at once."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            raise ServiceError(ErrorCode.INVALID_MESSAGE, "invalid Content-Length") from None
    return Request(request.scope, receive=BodyLimit(request.receive, limit))


def classify_upload(head: bytes, filename: str | None, content_type: str | None) -> str | None:
    """The video demuxer for this part if its bytes are a supported container, None for an image (the image
    decoder checks those bytes). A part the client calls a video that is no supported container is refused
    here: it never reaches FFmpeg."""
    demuxer = sniff_container(head)
    if demuxer is None and is_video(filename, content_type):
        raise ServiceError(ErrorCode.UNSUPPORTED_FORMAT, f"not a supported video container ({ACCEPTED})")
    return demuxer
