"""docs/SECURITY.md and the suite mirror each other (fast, no Ray).

Every table in the document has the header `| threat | limit | code | test |`; in each row:
- limit: `—`, or a config field in backticks: a bare name that some model in serve_app/config.py has
  (`operator_keys`), or a dotted path from AppArgs (`auth.operator_keys`);
- code: `—` where nothing reaches the server (the protection is in the client), an ErrorCode name from
  serve_app/errors.py in backticks where the server answers with an error, or else a bare number: the HTTP status
  (100-599) or WebSocket close code (1000-4999) of an answer that is not an error;
- test: tests/<file>.py::<test_function>, a top-level test function of that file (backticks allowed).
And every test in tests/test_hostile_*.py is named by some row.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from serve_app import config
from serve_app.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "SECURITY.md"
HEADER = ["threat", "limit", "code", "test"]
SECTIONS = ("Browser, auth and operators",)  # sections this suite requires; others' sections are checked alike
NONE = "—"


def _cells(line: str) -> list[str]:
    body = line.strip()
    assert body.startswith("|") and body.endswith("|"), f"not a table row: {line!r}"
    return [c.strip() for c in re.split(r"(?<!\\)\|", body[1:-1])]


def parse(text: str) -> list[dict]:
    """Every data row of every table, with its section; raises AssertionError on a malformed table."""
    rows, section, in_table = [], None, False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.strip().startswith("|"):
            in_table = False
            continue
        if not in_table:  # a header, then its separator
            assert _cells(line) == HEADER, f"line {i + 1}: table header must be | threat | limit | code | test |"
            assert i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|){4}", lines[i + 1].strip()), \
                f"line {i + 2}: separator row expected"
            in_table = True
            continue
        if re.fullmatch(r"\|(\s*:?-+:?\s*\|){4}", line.strip()):
            continue
        cells = _cells(line)
        assert len(cells) == 4, f"line {i + 1}: 4 cells expected, got {len(cells)}"
        rows.append({"line": i + 1, "section": section, **dict(zip(HEADER, cells, strict=True))})
    return rows


def _config_fields() -> set[str]:
    return {name for _, cls in inspect.getmembers(config, inspect.isclass)
            if issubclass(cls, BaseModel) and cls.__module__ == config.__name__ for name in cls.model_fields}


def _dotted_field(path: str) -> bool:
    model = config.AppArgs
    for part in path.split("."):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return False
        ann = field.annotation
        model = ann if inspect.isclass(ann) and issubclass(ann, BaseModel) else None
    return True


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name.startswith("test")}


def row_problems(row: dict) -> list[str]:
    """What is wrong with one row ([] if nothing)."""
    bad = []
    if not row["threat"]:
        bad.append("threat is empty")
    limit = row["limit"]
    if limit != NONE:
        m = re.fullmatch(r"`([a-z_][a-z0-9_.]*)`", limit)
        if not m:
            bad.append(f"limit {limit!r}: a config field in backticks or {NONE}")
        elif "." in m.group(1) and not _dotted_field(m.group(1)):
            bad.append(f"limit {limit!r}: no such field under AppArgs")
        elif "." not in m.group(1) and m.group(1) not in _config_fields():
            bad.append(f"limit {limit!r}: no config model in serve_app/config.py has this field")
    code = row["code"]
    if code != NONE:
        m = re.fullmatch(r"`([A-Z_]+)`|(\d{3,4})", code)
        if not m:
            bad.append(f"code {code!r}: an error code in backticks, an HTTP status / close code, or {NONE}")
        elif m.group(1) and m.group(1) not in ErrorCode.__members__:
            bad.append(f"code {code!r}: not in serve_app/errors.py")
        elif m.group(2) and not (100 <= int(m.group(2)) <= 599 or 1000 <= int(m.group(2)) <= 4999):
            bad.append(f"code {code!r}: neither an HTTP status nor a WebSocket close code")
    m = re.fullmatch(r"`?(tests/[\w/]+\.py)::(\w+)`?", row["test"])
    if not m:
        bad.append(f"test {row['test']!r}: tests/<file>.py::<test_name> expected")
    elif not (ROOT / m.group(1)).is_file():
        bad.append(f"test {row['test']!r}: no such file")
    elif m.group(2) not in _test_functions(ROOT / m.group(1)):
        bad.append(f"test {row['test']!r}: no such test function in {m.group(1)}")
    return bad


@pytest.mark.slow
def test_every_row_names_a_real_limit_code_and_test():
    rows = parse(DOC.read_text())
    problems = [f"docs/SECURITY.md:{r['line']}: {p}" for r in rows for p in row_problems(r)]
    assert not problems, "\n".join(problems)
    for section in SECTIONS:
        assert any(r["section"] == section for r in rows), f"section '## {section}' has no rows"


def test_every_hostile_test_is_in_the_table():
    named = {r["test"].strip("`") for r in parse(DOC.read_text())}
    missing = [f"{f.relative_to(ROOT)}::{name}" for f in sorted((ROOT / "tests").rglob("test_hostile_*.py"))
               for name in sorted(_test_functions(f)) if f"{f.relative_to(ROOT)}::{name}" not in named]
    assert not missing, f"hostile tests without a row in docs/SECURITY.md: {missing}"


@pytest.mark.parametrize("row, expect", [
    ({"threat": "x", "limit": "`no_such_field`", "code": "`FORBIDDEN`",
      "test": "tests/ingress/test_auth.py::test_operator_role"}, "limit"),
    ({"threat": "x", "limit": "`auth.no_such_field`", "code": "`FORBIDDEN`",
      "test": "tests/ingress/test_auth.py::test_operator_role"}, "limit"),
    ({"threat": "x", "limit": "`operator_keys`", "code": "`NO_SUCH_CODE`",
      "test": "tests/ingress/test_auth.py::test_operator_role"}, "code"),
    ({"threat": "x", "limit": "`operator_keys`", "code": "99",
      "test": "tests/ingress/test_auth.py::test_operator_role"}, "code"),
    ({"threat": "x", "limit": "`operator_keys`", "code": "`FORBIDDEN`",
      "test": "tests/ingress/test_auth.py::test_no_such_test"}, "test"),
    ({"threat": "x", "limit": "`operator_keys`", "code": "`FORBIDDEN`",
      "test": "tests/test_no_such_file.py::test_x"}, "test"),
])
def test_checker_rejects_bad_rows(row, expect):
    problems = row_problems(row)
    assert problems and all(p.startswith(expect) for p in problems), problems
    good = {"threat": "x", "limit": "`auth.operator_keys`", "code": "`FORBIDDEN`",
            "test": "tests/ingress/test_auth.py::test_operator_role"}
    assert row_problems(good) == [] and row_problems({**good, "limit": NONE, "code": "101"}) == []


def test_parser_rejects_a_table_in_another_format():
    with pytest.raises(AssertionError, match="header"):
        parse("## S\n\n| threat | code | test |\n|---|---|---|\n| a | b | c |\n")
    with pytest.raises(AssertionError, match="4 cells"):
        parse("## S\n\n| threat | limit | code | test |\n|---|---|---|---|\n| a | b | c |\n")
