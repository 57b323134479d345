"""Crash recovery for the session actor: a per-session journal in `session_actor.state_dir`.

Each session has `<id>.json` (metadata, rewritten atomically on every change; small), `<id>.rec` (result
records appended one per window, each a length-prefixed journal_codec archive), so the cost of persisting a
window does not grow with the stream, `<id>.state` (the worker's snapshot, without the items it carries
incrementally: those are `<id>.items/<hex of the key>.bin`, each written once) and `<id>.pending/<index>.npz`
(accepted frames not yet in a committed window, deleted when one commits them). A restarted actor reloads every
session and clients resume with `resume_from`.

No pickle anywhere (serve_app/sessions/journal_codec.py): a file planted in the state directory builds no object. The
point budget trims records in memory; the `.rec` file is rewritten from memory (compacted) once it holds more
than twice what is live, so it stays within about twice the session's point budget and a restart reloads that
much, not every point the session ever made. Files of the older pickle format are not read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from serve_app.config import SessionParams
from serve_app.recon import corrections
from serve_app.sessions import journal_codec, stream_state
from serve_app.sessions.session_store import CorrectionRecord, ResultRecord, Session

_LEN = struct.Struct("<Q")

META_FIELDS = ("session_id", "owner", "created_at", "updated_at", "state", "frames_received", "frames_processed",
               "frames_failed", "windows", "last_seq", "points_total", "error", "finished_at", "worker_epoch")


def meta_dict(s: Session) -> dict:
    """The session's small, JSON-able metadata (no records, frames or snapshot)."""
    meta = {k: getattr(s, k) for k in META_FIELDS}
    meta["params"] = s.params.model_dump()
    meta["stream_state"] = None  # opaque worker state is stored apart
    return meta


def session_from_meta(meta: dict) -> Session:
    """A Session from meta_dict's output; raises on a torn or foreign one."""
    s = Session(session_id=meta["session_id"], owner=meta["owner"],
                params=SessionParams.model_validate(meta["params"]),
                created_at=meta["created_at"], updated_at=meta["updated_at"])
    for k in META_FIELDS[2:]:
        if k in meta:
            setattr(s, k, meta[k])
    return s


def corrections_json(s: Session) -> str:
    """The session's (compacted) correction messages as stored: JSON, bounded by one row per window."""
    return corrections_json_of(corrections_rows(s))


def corrections_rows(s: Session) -> list[tuple[dict, int | None]]:
    """(message, epoch) of each stored correction: taken at once, encoded later (messages are never changed
    in place: compaction makes new ones)."""
    return [(c.message, c.epoch) for c in s.corrections]


def corrections_json_of(rows: list[tuple[dict, int | None]]) -> str:
    return json.dumps([{"message": m, "epoch": e} for m, e in rows], separators=(",", ":"))


def apply_corrections(s: Session, text: str | bytes) -> None:
    """Correction records (as corrections_json wrote them) and the per-window state they build, into `s`. A
    correction written just before a crash that kept the metadata from saving its seq is kept (its row set
    already dropped rows it supersedes). Torn or foreign text is ignored."""
    try:
        stored = json.loads(text)
        recs = [CorrectionRecord(seq=int(c["message"]["seq"]), message=c["message"], epoch=c.get("epoch"))
                for c in stored]
        state: dict = {}
        for c in recs:
            state = corrections.merge(state, corrections.from_message(c.message))
    except (ValueError, KeyError, TypeError):
        return  # torn or foreign: the map is served uncorrected until the next optimisation
    s.corrections, s.transforms = recs, state
    if recs:
        s.last_seq = max(s.last_seq, recs[-1].seq)
        s.correction_version = max(s.correction_version, int(recs[-1].message.get("version", 0)))


class SessionJournal:
    def __init__(self, directory: str | Path, compact_slack_bytes: int = 1 << 20):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.compact_slack_bytes = compact_slack_bytes  # below this a .rec file is never rewritten
        self.compactions = 0
        self.items_written = 0  # snapshot items written (each once: see write_stream_state)
        self._items: dict[str, set[str]] = {}  # per session, the snapshot items on disk (by field)

    def save_meta(self, s: Session) -> None:
        self.write_meta(s.session_id, meta_dict(s))

    def write_meta(self, session_id: str, meta: dict) -> None:
        tmp = self.dir / f"{session_id}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.dir / f"{session_id}.json")  # atomic: a crash leaves the old or the new file

    @staticmethod
    def _frame(rec: ResultRecord) -> bytes:
        blob = journal_codec.dumps(ResultRecord(rec.seq, rec.window, rec.frames, rec.points, rec.colors, rec.epoch))
        return _LEN.pack(len(blob)) + blob

    def append_record(self, s: Session, rec: ResultRecord) -> None:
        path = self.dir / f"{s.session_id}.rec"
        with open(path, "ab") as f:
            f.write(self._frame(rec))
        self.save_meta(s)
        self.maybe_compact(s)

    @staticmethod
    def live_bytes(s: Session) -> int:
        """About what the session's records take in the journal now (arrays plus per-record overhead)."""
        return sum(r.points.nbytes + r.colors.nbytes + 2048 for r in s.records)

    # Writes from values taken beforehand (the state backend takes them on the actor's loop and writes them
    # in a thread, while the loop goes on changing the session).
    def write_record(self, session_id: str, rec: ResultRecord) -> int:
        """Append one record to `<id>.rec`; returns the file's size after it."""
        with open(self.dir / f"{session_id}.rec", "ab") as f:
            f.write(self._frame(rec))
            f.flush()
            return os.fstat(f.fileno()).st_size

    def rewrite_records(self, session_id: str, records: list[ResultRecord]) -> None:
        """`<id>.rec` from `records` alone (compaction), atomically."""
        tmp = self.dir / f"{session_id}.rec.tmp"
        with open(tmp, "wb") as f:
            f.writelines(self._frame(rec) for rec in records)
        os.replace(tmp, self.dir / f"{session_id}.rec")
        self.compactions += 1

    def _items_dir(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.items"

    def _items_on_disk(self, session_id: str) -> dict[str, Path]:
        d = self._items_dir(session_id)
        out = {}
        for p in d.glob("*.bin") if d.is_dir() else []:
            try:
                out[bytes.fromhex(p.stem).decode()] = p
            except ValueError:
                continue
        return out

    def write_stream_state(self, session_id: str, state) -> None:
        """The snapshot without its incremental items in `<id>.state`, each item in `<id>.items/` written once
        (before the state that names it) and removed once no state names it."""
        base, kept = stream_state.split(state)
        have = self._items.get(session_id)
        if have is None:
            have = self._items[session_id] = set(self._items_on_disk(session_id))
        want = {stream_state.item_field(k): v for k, v in kept.items()}
        d = self._items_dir(session_id)
        for f in want.keys() - have:
            d.mkdir(exist_ok=True)
            tmp = d / f"{f.encode().hex()}.tmp"
            tmp.write_bytes(journal_codec.dumps(want[f]))
            os.replace(tmp, d / f"{f.encode().hex()}.bin")
            have.add(f)
            self.items_written += 1
        tmp = self.dir / f"{session_id}.state.tmp"
        tmp.write_bytes(journal_codec.dumps(base))
        os.replace(tmp, self.dir / f"{session_id}.state")
        for f in have - want.keys():
            (d / f"{f.encode().hex()}.bin").unlink(missing_ok=True)
            have.discard(f)

    def write_pending(self, session_id: str, index: int, payload) -> None:
        d = self._pending_dir(session_id)
        d.mkdir(exist_ok=True)
        tmp = d / f"{index}.tmp"
        tmp.write_bytes(journal_codec.dumps(payload))
        os.replace(tmp, d / f"{index}.npz")

    def write_corrections(self, session_id: str, text: str) -> None:
        tmp = self.dir / f"{session_id}.corr.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / f"{session_id}.corr")

    def maybe_compact(self, s: Session) -> bool:
        """Rewrite `<id>.rec` from the records in memory (trimmed by the point budget) once the file is more than
        twice their size: each point is written at most about twice, and the file stays bounded."""
        path = self.dir / f"{s.session_id}.rec"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size <= 2 * self.live_bytes(s) + self.compact_slack_bytes:
            return False
        tmp = self.dir / f"{s.session_id}.rec.tmp"
        with open(tmp, "wb") as f:
            f.writelines(self._frame(rec) for rec in s.records)
        os.replace(tmp, path)  # atomic: a crash leaves the old file or the compacted one
        self.compactions += 1
        return True

    def save_corrections(self, s: Session) -> None:
        """`<id>.corr` (JSON): the session's (compacted) correction messages, rewritten atomically; JSON, and
        bounded by one row per window."""
        tmp = self.dir / f"{s.session_id}.corr.tmp"
        tmp.write_text(corrections_json(s))
        os.replace(tmp, self.dir / f"{s.session_id}.corr")

    def load_corrections(self, s: Session) -> None:
        """Correction records and the per-window state they build. A correction written just before a crash
        that kept the metadata from saving its seq is kept (its file already dropped rows it supersedes)."""
        path = self.dir / f"{s.session_id}.corr"
        try:
            text = path.read_text()
        except OSError:
            return
        apply_corrections(s, text)

    def save_stream_state(self, s: Session) -> None:
        self.write_stream_state(s.session_id, s.stream_state)

    def _pending_dir(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.pending"

    def save_pending(self, s: Session, index: int) -> None:
        d = self._pending_dir(s.session_id)
        d.mkdir(exist_ok=True)
        tmp = d / f"{index}.tmp"
        tmp.write_bytes(journal_codec.dumps(s.pending[index]))
        os.replace(tmp, d / f"{index}.npz")

    def drop_pending(self, session_id: str, indices) -> None:
        d = self._pending_dir(session_id)
        for i in indices:
            (d / f"{i}.npz").unlink(missing_ok=True)

    def delete(self, session_id: str) -> None:
        for suffix in (".json", ".rec", ".state", ".json.tmp", ".state.tmp", ".rec.tmp", ".corr", ".corr.tmp"):
            (self.dir / f"{session_id}{suffix}").unlink(missing_ok=True)
        self._items.pop(session_id, None)
        for d in (self._pending_dir(session_id), self._items_dir(session_id)):
            if d.is_dir():
                for f in d.iterdir():
                    f.unlink(missing_ok=True)
                d.rmdir()

    def _read_items(self, session_id: str) -> dict:
        out = {}
        for f, p in self._items_on_disk(session_id).items():
            try:
                out[stream_state.item_key(f)] = journal_codec.loads(p.read_bytes())
            except (journal_codec.CodecError, ValueError, OSError):  # torn: that item is missing
                continue
        return out

    @staticmethod
    def read_records(path: Path) -> list[ResultRecord]:
        """The records of a `.rec` file, up to the first torn or foreign one (a crash mid-write)."""
        out: list[ResultRecord] = []
        with open(path, "rb") as f:
            while True:
                head = f.read(_LEN.size)
                if len(head) < _LEN.size:
                    break
                (n,) = _LEN.unpack(head)
                blob = f.read(n) if n <= 1 << 34 else b""
                if len(blob) != n or not n:
                    break
                try:
                    rec = journal_codec.loads(blob)
                except journal_codec.CodecError:
                    break
                if not isinstance(rec, ResultRecord):
                    break
                out.append(rec)
        return out

    def load_all(self) -> list[Session]:
        out = []
        for meta_path in sorted(self.dir.glob("*.json")):
            try:
                s = session_from_meta(json.loads(meta_path.read_text()))
            except Exception:  # noqa: BLE001, S112 - a torn or foreign file: skipped, its session is SESSION_LOST
                continue
            rec_path = meta_path.with_suffix(".rec")
            if rec_path.exists():
                for rec in self.read_records(rec_path):
                    if rec.seq <= s.last_seq:
                        s.records.append(rec)
                        s.frames.extend(rec.frames)
            committed = {f.get("index") for f in s.frames}
            pending_dir = self._pending_dir(s.session_id)
            for p in sorted(pending_dir.glob("*.npz")) if pending_dir.is_dir() else []:
                try:
                    index = int(p.stem)
                except ValueError:
                    continue
                if index in committed or index >= s.frames_received:
                    continue  # committed before the crash, or written for a frame whose acceptance was not saved
                try:
                    s.pending[index] = journal_codec.loads(p.read_bytes())
                except journal_codec.CodecError:  # torn write: that frame was never acknowledged
                    continue
            self.load_corrections(s)
            state_path = meta_path.with_suffix(".state")
            if state_path.exists():
                try:
                    s.stream_state = stream_state.join(journal_codec.loads(state_path.read_bytes()),
                                                       self._read_items(s.session_id))
                except journal_codec.CodecError:
                    s.stream_state = None
            out.append(s)
        return out
