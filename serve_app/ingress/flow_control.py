"""Server -> client flow control and protocol-error accounting for one WebSocket. Plain Python, no FastAPI/Ray.

Serve queues whatever a replica sends without limit, so every message the server sends (result records, acks,
errors, pongs, progress) is counted until the client acknowledges it with `{"type":"received","seq":S}`:
- a result record (seq S) is acknowledged by any `received` with seq >= S;
- any other message is acknowledged by a `received` for a record sent *after* it (the client has read past it),
  so a client cannot acknowledge replies it has not read by repeating an old seq.
`received` beyond the last record sent is a protocol error. Result records pause while the unacknowledged bytes
are at `max_unacked_bytes` (one record always goes out); other messages are never held back, but a client
that leaves more than `max_unacked_bytes` of them unacknowledged (it provokes replies and reads nothing) is
closed with SLOW_CONSUMER. Malformed messages count
towards `max_protocol_errors`; at that many the stream is closed with TOO_MANY_ERRORS.
See docs/WEBSOCKET_API.md 3.7.
"""

from __future__ import annotations

from collections import deque

from serve_app.errors import ErrorCode, ServiceError

# Client mistakes that count as protocol errors: malformed messages and unusable frames. Rate and queue refusals
# (QUEUE_FULL, FRAME_RATE_LIMITED, ...) do not: well-behaved clients meet them and retry.
PROTOCOL_ERROR_CODES = frozenset({
    ErrorCode.INVALID_MESSAGE, ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.INVALID_PRIOR, ErrorCode.INVALID_IMAGE,
    ErrorCode.UNSUPPORTED_FORMAT, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.TOO_MANY_PIXELS})


class FlowControl:
    def __init__(self, max_unacked_bytes: int, max_protocol_errors: int, acked_seq: int = 0):
        self.max_unacked_bytes = max_unacked_bytes
        self.hard_limit = max_unacked_bytes  # for messages other than records
        self.max_protocol_errors = max_protocol_errors
        self.acked_seq = acked_seq
        self.last_sent_seq = acked_seq  # records up to resume_from are the client's already
        self._unacked: deque[tuple[int, int, bool]] = deque()  # (seq it waits for, bytes, is a record)
        self.unacked_bytes = 0
        self.unacked_records = 0
        self.unacked_other_bytes = 0
        self.protocol_errors = 0

    def resume(self, seq: int) -> None:
        """A (re)connect with resume_from=seq: the client has every record up to seq."""
        self.acked_seq = self.last_sent_seq = max(0, seq)

    def sent(self, nbytes: int, seq: int | None = None) -> bool:
        """Count a message sent: a record's (seq given) or any other (seq None). False once the unacknowledged
        other messages are past the hard limit: the caller closes the stream with SLOW_CONSUMER."""
        if seq is not None:
            self.last_sent_seq = max(self.last_sent_seq, seq)
            self._unacked.append((seq, nbytes, True))
            self.unacked_records += 1
        else:  # acknowledged only by a record sent after it
            self._unacked.append((self.last_sent_seq + 1, nbytes, False))
            self.unacked_other_bytes += nbytes
        self.unacked_bytes += nbytes
        return not self.over_hard_limit

    def received(self, seq: int) -> None:
        """The client's `received`; raises INVALID_MESSAGE (not fatal) for a seq beyond the last record sent."""
        if seq > self.last_sent_seq:
            raise ServiceError(ErrorCode.INVALID_MESSAGE, f"received seq {seq} is beyond the last result record "
                               f"sent ({self.last_sent_seq})", details={"last_sent_seq": self.last_sent_seq})
        self.acked_seq = max(self.acked_seq, seq)
        while self._unacked and self._unacked[0][0] <= self.acked_seq:
            _, nbytes, record = self._unacked.popleft()
            self.unacked_bytes -= nbytes
            if record:
                self.unacked_records -= 1
            else:
                self.unacked_other_bytes -= nbytes

    @property
    def must_pause(self) -> bool:
        """Hold the next result record: records are unacknowledged and the budget is used up."""
        return self.unacked_records > 0 and self.unacked_bytes >= self.max_unacked_bytes

    @property
    def over_hard_limit(self) -> bool:
        return self.unacked_other_bytes > self.hard_limit

    def protocol_error(self, code: ErrorCode) -> bool:
        """Count an error answered to the client; True when it was one protocol error too many."""
        if code in PROTOCOL_ERROR_CODES:
            self.protocol_errors += 1
        return self.protocol_errors >= self.max_protocol_errors
