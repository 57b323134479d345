"""The protocol is declared once (serve_app/protocol/framing.py, serve_app/errors.py POLICY): the clients' constants
and the docs' tables are generated from it, and this module fails when a generated file differs or was edited."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
from da3_client import _protocol as generated
from da3_client import errors as client_errors
from da3_client import stream as client_stream
from da3_client import wire as client_wire

from serve_app.errors import HTTP_STATUS, POLICY, WS_CLOSE, ErrorCode, close_table, codes_where
from serve_app.ingress import flow_control
from serve_app.protocol import codegen, framing

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())


def test_generated_files_match_the_declaration():
    diffs = codegen.stale()
    assert not diffs, "run `make protocol`:\n" + "\n".join(diffs.values())


def _copy_targets(tmp_path: Path) -> Path:
    for rel in codegen.expected():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    assert codegen.stale(tmp_path) == {}
    return tmp_path


@pytest.mark.parametrize(("rel", "old", "new"), [
    (codegen.PY_CLIENT, "    4412: 'SESSION_LOST',\n", ""),  # the drift issue 18 found: 4412 unknown to the client
    (codegen.JS_CLIENT, "export const POINTS_ALIGN = 4;", "export const POINTS_ALIGN = 8;"),
    (codegen.DOCS, "| `SESSION_LOST` | 410 | 4412 |", "| `SESSION_LOST` | 404 | 4412 |"),
])
def test_a_hand_edit_of_a_generated_file_is_caught(tmp_path, rel, old, new):
    root = _copy_targets(tmp_path)
    text = (root / rel).read_text()
    assert old in text
    (root / rel).write_text(text.replace(old, new))
    assert list(codegen.stale(root)) == [rel]


def test_check_mode_exits_1_and_names_the_stale_file(tmp_path, monkeypatch, capsys):
    root = _copy_targets(tmp_path)
    monkeypatch.setattr(codegen, "ROOT", root)
    assert codegen.main(["--check"]) == 0
    (root / codegen.PY_CLIENT).write_text((root / codegen.PY_CLIENT).read_text() + "# edited\n")
    assert codegen.main(["--check"]) == 1
    assert codegen.PY_CLIENT in capsys.readouterr().err
    assert codegen.main([]) == 0 and codegen.stale(root) == {}  # regenerating repairs it


def test_docs_without_markers_are_refused():
    with pytest.raises(ValueError, match="error-codes"):
        codegen.render_docs("# no markers here\n")


def test_policy_covers_every_code_once():
    assert set(POLICY) == set(ErrorCode)
    closes = [c.code for c in close_table()]
    assert len(closes) == len(set(closes)), "two meanings for one close code"
    assert all(4000 <= c < 5000 for c in WS_CLOSE.values())
    assert HTTP_STATUS == {c: p.http for c, p in POLICY.items()}
    assert flow_control.PROTOCOL_ERROR_CODES == codes_where("protocol_error")
    for code, p in POLICY.items():
        assert p.fatal in ("yes", "no", "-") or p.close is not None, code  # a sentence only where it can close
        assert not (p.resend and not p.per_frame), code  # only a refused frame can be resent
        assert bool(p.close) == (p.close_meaning != ""), code


def test_the_python_client_takes_every_constant_from_the_generated_module():
    for name in codegen.FRAMING:
        assert getattr(generated, name) == getattr(framing, name), name
    assert client_wire.FRAME_MAGIC is generated.FRAME_MAGIC and client_wire.PROTOCOL_VERSION == 1
    assert client_errors.CLOSE_CODES is generated.CLOSE_CODES
    assert client_errors.RETRYABLE_CLOSES is generated.RETRYABLE_CLOSES
    assert generated.CLOSE_CODES == {c.code: c.name for c in close_table() if c.code >= 4000}
    assert generated.WS_CLOSE == {c.value: n for c, n in WS_CLOSE.items()}
    assert generated.CLOSE_SESSION_LOST == WS_CLOSE[ErrorCode.SESSION_LOST] == 4412
    # The client's frame handling is the policy's (these sets were hand-written before).
    assert client_stream.FRAME_ERRORS is generated.FRAME_ERRORS
    assert client_stream.FRAME_ERRORS == {c.value for c in codes_where("per_frame")} == {
        "QUEUE_FULL", "FRAME_RATE_LIMITED", "BYTE_RATE_LIMITED", "INVALID_IMAGE", "IMAGE_TOO_LARGE",
        "TOO_MANY_PIXELS", "UNSUPPORTED_FORMAT", "FRAME_LIMIT_EXCEEDED", "SESSION_FINALIZED", "INVALID_MESSAGE",
        "MESSAGE_TOO_LARGE", "DECODE_BUDGET_EXCEEDED", "INVALID_PRIOR"}
    assert client_stream.RETRY_LATER == {"QUEUE_FULL", "FRAME_RATE_LIMITED", "BYTE_RATE_LIMITED",
                                         "DECODE_BUDGET_EXCEEDED"}
    assert client_stream.NO_MORE_FRAMES == {"FRAME_LIMIT_EXCEEDED", "SESSION_FINALIZED"}
    assert client_stream.RETRYABLE_CODES == {"CONNECTION_ERROR", "TIMEOUT", "SESSION_BUSY", "INTERNAL_ERROR",
                                             "MODEL_UNAVAILABLE"}
    assert generated.RETRYABLE_CLOSES == {1001, 1005, 1006, 1011, 1012, 1013, 1014}


def test_the_client_package_imports_nothing_of_the_server():
    for path in (ROOT / "clients").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "serve_app" for n in names), path


def test_the_static_js_has_no_hand_written_framing_constants():
    js = (ROOT / "serve_app/static/protocol.js").read_text()
    assert "./protocol_constants.js" in js
    code = "\n".join(line for line in js.splitlines() if not line.lstrip().startswith(("//", "/**", "*")))
    for literal in ("0x44", "'DA3P'", "'DA3F'", "0xffff", "const PREFIX_BYTES", "const PROTOCOL_VERSION"):
        assert literal not in code, literal


def test_docs_tables_name_every_code():
    doc = (ROOT / codegen.DOCS).read_text()
    for code in ErrorCode:
        assert re.search(rf"^\| `{code.value}` \| {POLICY[code].http} \|", doc, re.MULTILINE), code
    for c in close_table():
        assert re.search(rf"^\| {c.code} \| ", doc, re.MULTILINE), c
