"""The flow-control and admission rules as plain classes (the real app's behaviour: tests/ingress/test_hostile_session.py)."""

from __future__ import annotations

import pytest

from serve_app.errors import ErrorCode, ServiceError
from serve_app.ingress.flow_control import FlowControl
from serve_app.sessions.admission import ConcurrencyGate


def test_received_beyond_the_last_record_sent_is_refused():
    fc = FlowControl(1000, 10)
    with pytest.raises(ServiceError) as ei:
        fc.received(2**62)
    assert ei.value.code is ErrorCode.INVALID_MESSAGE and not ei.value.fatal
    fc.received(0)  # nothing sent yet: 0 is the only valid seq
    fc.sent(100, seq=1)
    fc.sent(100, seq=2)
    fc.received(2)
    with pytest.raises(ServiceError):
        fc.received(3)
    assert fc.acked_seq == 2 and fc.unacked_bytes == 0


def test_resume_from_counts_as_sent():
    fc = FlowControl(1000, 10)
    fc.resume(7)
    fc.received(7)
    with pytest.raises(ServiceError):
        fc.received(8)
    fc.sent(50, seq=8)
    fc.received(8)
    assert fc.unacked_records == 0 and fc.unacked_bytes == 0
    neg = FlowControl(1000, 10)
    neg.resume(-5)  # a nonsense resume_from replays everything; `received` 0 stays valid
    neg.received(0)


def test_every_message_counts_and_records_pause_at_the_budget():
    fc = FlowControl(1000, 10)
    for _ in range(6):
        fc.sent(100)  # ready, acks, pongs, errors: counted, never held back
    assert fc.unacked_bytes == 600 and not fc.must_pause  # no record outstanding: one record always goes
    fc.sent(300, seq=1)
    assert fc.unacked_bytes == 900 and not fc.must_pause
    fc.sent(300, seq=2)
    assert fc.must_pause  # 1200 >= 1000 with records unacknowledged
    fc.received(1)  # record 1 and the six replies sent before it
    assert fc.unacked_bytes == 300 and fc.unacked_records == 1 and not fc.must_pause


def test_replies_are_acknowledged_only_by_a_later_record():
    """Repeating an old `received` cannot acknowledge replies the client has not read."""
    fc = FlowControl(1000, 10)
    fc.sent(100, seq=1)
    fc.received(1)
    for _ in range(5):
        fc.sent(50)  # pongs after record 1
        fc.received(1)
    assert fc.unacked_other_bytes == 250
    fc.sent(100, seq=2)
    fc.received(2)
    assert fc.unacked_bytes == fc.unacked_other_bytes == 0


def test_replies_past_the_budget_trip_the_hard_limit():
    fc = FlowControl(1000, 10)
    fc.sent(5000, seq=1)  # one large record is fine (the sender pauses after it)
    assert not fc.over_hard_limit
    ok = [fc.sent(100) for _ in range(11)]
    assert ok == [True] * 10 + [False] and fc.over_hard_limit


def test_protocol_errors_close_after_the_configured_number():
    fc = FlowControl(1000, 3)
    assert not fc.protocol_error(ErrorCode.QUEUE_FULL)  # refusals a well-behaved client meets do not count
    assert not fc.protocol_error(ErrorCode.FRAME_RATE_LIMITED)
    assert not fc.protocol_error(ErrorCode.INVALID_MESSAGE)
    assert not fc.protocol_error(ErrorCode.INVALID_PRIOR)
    assert fc.protocol_error(ErrorCode.INVALID_IMAGE) and fc.protocol_errors == 3


def test_concurrency_gate_refuses_over_the_limit_and_frees_on_error():
    gate = ConcurrencyGate(2, retry_after_s=1.5)
    with gate.slot(), gate.slot():
        with pytest.raises(ServiceError) as ei, gate.slot():
            pass
        assert ei.value.code is ErrorCode.EXPORT_BUSY and ei.value.details["retry_after_s"] == 1.5
        assert ei.value.http_status == 503
    with pytest.raises(RuntimeError), gate.slot():
        raise RuntimeError("export failed")
    assert gate.running == 0 and gate.refused == 1
    with gate.slot():
        assert gate.running == 1
