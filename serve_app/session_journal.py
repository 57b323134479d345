"""Crash recovery for the session actor: a per-session journal in `session_actor.state_dir`.

Each session has `<id>.json` (metadata, rewritten atomically on every change; small), `<id>.rec` (result
records appended as pickles, one per window), so the cost of persisting a window does not grow with the stream,
and `<id>.pending/<index>.pkl` (accepted frames not yet in a committed window, deleted when one commits them).
A restarted actor reloads every session and clients resume with `resume_from`.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from serve_app import corrections
from serve_app.config import SessionParams
from serve_app.session_store import CorrectionRecord, ResultRecord, Session

META_FIELDS = ("session_id", "owner", "created_at", "updated_at", "state", "frames_received", "frames_processed",
               "frames_failed", "windows", "last_seq", "points_total", "error", "finished_at", "worker_epoch")


class SessionJournal:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def save_meta(self, s: Session) -> None:
        meta = {k: getattr(s, k) for k in META_FIELDS}
        meta["params"] = s.params.model_dump()
        meta["stream_state"] = None  # opaque worker state lives in the .state file
        tmp = self.dir / f"{s.session_id}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.dir / f"{s.session_id}.json")  # atomic: a crash leaves the old or the new file

    def append_record(self, s: Session, rec: ResultRecord) -> None:
        with open(self.dir / f"{s.session_id}.rec", "ab") as f:
            pickle.dump(rec, f, protocol=pickle.HIGHEST_PROTOCOL)
        self.save_meta(s)

    def save_corrections(self, s: Session) -> None:
        """`<id>.corr` (JSON): the session's (compacted) correction messages, rewritten atomically; JSON, and
        bounded by one row per window."""
        tmp = self.dir / f"{s.session_id}.corr.tmp"
        tmp.write_text(json.dumps([{"message": c.message, "epoch": c.epoch} for c in s.corrections],
                                  separators=(",", ":")))
        os.replace(tmp, self.dir / f"{s.session_id}.corr")

    def load_corrections(self, s: Session) -> None:
        """Correction records and the per-window state they build. A correction written just before a crash
        that kept the metadata from saving its seq is kept (its file already dropped rows it supersedes)."""
        path = self.dir / f"{s.session_id}.corr"
        if not path.exists():
            return
        try:
            stored = json.loads(path.read_text())
            recs = [CorrectionRecord(seq=int(c["message"]["seq"]), message=c["message"], epoch=c.get("epoch"))
                    for c in stored]
            state: dict = {}
            for c in recs:
                state = corrections.merge(state, corrections.from_message(c.message))
        except (OSError, ValueError, KeyError, TypeError):
            return  # torn or foreign: the map is served uncorrected until the next optimisation
        s.corrections, s.transforms = recs, state
        if recs:
            s.last_seq = max(s.last_seq, recs[-1].seq)
            s.correction_version = max(s.correction_version, int(recs[-1].message.get("version", 0)))

    def save_stream_state(self, s: Session) -> None:
        tmp = self.dir / f"{s.session_id}.state.tmp"
        tmp.write_bytes(pickle.dumps(s.stream_state, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, self.dir / f"{s.session_id}.state")

    def _pending_dir(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.pending"

    def save_pending(self, s: Session, index: int) -> None:
        d = self._pending_dir(s.session_id)
        d.mkdir(exist_ok=True)
        tmp = d / f"{index}.tmp"
        tmp.write_bytes(pickle.dumps(s.pending[index], protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, d / f"{index}.pkl")

    def drop_pending(self, session_id: str, indices) -> None:
        d = self._pending_dir(session_id)
        for i in indices:
            (d / f"{i}.pkl").unlink(missing_ok=True)

    def delete(self, session_id: str) -> None:
        for suffix in (".json", ".rec", ".state", ".json.tmp", ".state.tmp", ".corr", ".corr.tmp"):
            (self.dir / f"{session_id}{suffix}").unlink(missing_ok=True)
        d = self._pending_dir(session_id)
        if d.is_dir():
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()

    def load_all(self) -> list[Session]:
        out = []
        for meta_path in sorted(self.dir.glob("*.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue  # a torn or foreign file: skip it, the session reports SESSION_LOST
            s = Session(session_id=meta["session_id"], owner=meta["owner"],
                        params=SessionParams.model_validate(meta["params"]),
                        created_at=meta["created_at"], updated_at=meta["updated_at"])
            for k in META_FIELDS[2:]:
                if k in meta:
                    setattr(s, k, meta[k])
            rec_path = meta_path.with_suffix(".rec")
            if rec_path.exists():
                with open(rec_path, "rb") as f:
                    while True:
                        try:
                            rec = pickle.load(f)
                        except EOFError:
                            break
                        except Exception:  # noqa: BLE001 - a torn last record from a crash mid-write
                            break
                        if rec.seq <= s.last_seq:
                            s.records.append(rec)
                            s.frames.extend(rec.frames)
            committed = {f.get("index") for f in s.frames}
            pending_dir = self._pending_dir(s.session_id)
            for p in sorted(pending_dir.glob("*.pkl")) if pending_dir.is_dir() else []:
                index = int(p.stem)
                if index in committed or index >= s.frames_received:
                    continue  # committed before the crash, or written for a frame whose acceptance was not saved
                try:
                    s.pending[index] = pickle.loads(p.read_bytes())
                except Exception:  # noqa: BLE001 - torn write: that frame was never acknowledged
                    continue
            self.load_corrections(s)
            state_path = meta_path.with_suffix(".state")
            if state_path.exists():
                try:
                    s.stream_state = pickle.loads(state_path.read_bytes())
                except Exception:  # noqa: BLE001
                    s.stream_state = None
            out.append(s)
        return out
