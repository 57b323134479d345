"""The Python client names every close code the server sends (a missing one surfaced as INTERNAL_ERROR)."""

from da3_client.errors import CLOSE_CODES, CLOSE_SESSION_DELETED

from serve_app.errors import WS_CLOSE, WS_CLOSE_SESSION_DELETED


def test_client_knows_every_server_close_code():
    server = {code: err.value for err, code in WS_CLOSE.items()}
    assert {c: CLOSE_CODES.get(c) for c in server} == server
    assert CLOSE_CODES[WS_CLOSE_SESSION_DELETED] == "SESSION_DELETED" and CLOSE_SESSION_DELETED == WS_CLOSE_SESSION_DELETED
