"""What the session-store actor answers (typed: no string-keyed dicts or sentinel seq values between the actor,
the ingress and the session workers). Plain dataclasses: Ray pickles them like any argument."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class CommitStatus(enum.Enum):
    STORED = "stored"
    GONE = "gone"  # the session was deleted or expired while the window was in flight
    FENCED = "fenced"  # the caller is a stale worker: another one owns the session now


@dataclass(frozen=True)
class CommitReply:
    """A window's or a correction's commit: the record's seq once stored; `kept` = the window's points kept by
    the session's point budget, `version` = the correction's version as stored."""

    status: CommitStatus
    seq: int = 0
    kept: int = 0
    version: int = 0

    @property
    def stored(self) -> bool:
        return self.status is CommitStatus.STORED


@dataclass(frozen=True)
class Takeover:
    """What a new worker needs (take_worker fences any earlier one): its epoch, the snapshot taken after the last
    committed window, the session info, the accepted frames no window has committed yet (by index)."""

    epoch: int
    stream_state: Any
    info: dict
    pending: list = field(default_factory=list)


@dataclass(frozen=True)
class Attachment:
    info: dict
    displaced: str | None = None  # the connection this stream displaced, if any


@dataclass(frozen=True)
class RecordsReply:
    """A long-poll's answer: records after the caller's seq with the session info, or a status change: the
    session is gone (`gone` = the error code saying why) or another stream displaced this one."""

    records: list = field(default_factory=list)
    info: dict | None = None
    gone: str | None = None
    displaced: bool = False
