"""Token buckets for rate limits (sessions created per key, frames and bytes per session). Pure, clock injected."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # bucket size
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, amount: float, now: float) -> float:
        """Take `amount` tokens; returns 0 on success, else the seconds to wait (nothing is taken)."""
        self._refill(now)
        if amount <= self.tokens:
            self.tokens -= amount
            return 0.0
        if self.rate <= 0:
            return float("inf")
        return (amount - self.tokens) / self.rate


class FrameRateLimiter:
    """Per-session upload limits: frames per second and bytes per second, each with a 2x burst. A frame is taken
    or refused as a whole (a refusal by the byte bucket gives its frame token back)."""

    def __init__(self, frames_per_s: float, bytes_per_s: float, now: float):
        self.frames_per_s, self.bytes_per_s = frames_per_s, bytes_per_s
        self.frames = TokenBucket(frames_per_s, 2 * frames_per_s, stamp=now)
        self.bytes = TokenBucket(bytes_per_s, 2 * bytes_per_s, stamp=now)

    def check(self, nbytes: int, now: float) -> None:
        """Take one frame of `nbytes`, or raise FRAME_RATE_LIMITED / BYTE_RATE_LIMITED (not fatal) with
        `retry_after_s`."""
        from serve_app.errors import ErrorCode, ServiceError

        wait = self.frames.take(1, now)
        if wait:
            raise ServiceError(ErrorCode.FRAME_RATE_LIMITED,
                               f"session over {self.frames_per_s:g} frames/s; retry in {wait:.2f}s",
                               details={"retry_after_s": round(wait, 3)})
        wait = self.bytes.take(nbytes, now)
        if wait:
            self.frames.tokens += 1
            raise ServiceError(ErrorCode.BYTE_RATE_LIMITED,
                               f"session over {self.bytes_per_s / 1e6:g} MB/s; retry in {wait:.2f}s",
                               details={"retry_after_s": round(wait, 3)})
