"""The per-session voxel occupancy behind the map dedupe: packed int64 voxel keys of everything emitted, at most
`capacity`, the oldest forgotten first (the same order the session store evicts points)."""

from __future__ import annotations

import numpy as np

_KEY_BITS = 21  # per axis in a packed voxel key; coordinates wrap beyond +-2^20 voxels (rare false merges)


def voxel_keys(points: np.ndarray, voxel: float) -> np.ndarray:
    """(M, 3) finite points -> (M,) int64 keys of their voxels (21 bits per axis, wrapping far away)."""
    q = np.clip(np.floor(np.asarray(points, np.float64) / voxel), -(2 ** 40), 2 ** 40).astype(np.int64)
    q = (q + (1 << (_KEY_BITS - 1))) & ((1 << _KEY_BITS) - 1)
    return (q[:, 0] << (2 * _KEY_BITS)) | (q[:, 1] << _KEY_BITS) | q[:, 2]


class VoxelOccupancy:
    """A set of voxel keys remembering insertion order; at most `capacity`, oldest out first.

    Two sorted (key, insertion counter) levels, so a window's insert costs O(window + recent), not O(map): new
    keys go into the small `recent` level, which compact() merges into `main` (the session worker calls it after
    a window is delivered, off the latency path; add_sorted itself only once recent outgrows a hard bound).
    Forgetting is by counter: a key whose counter is not among the newest `capacity` is absent, and is dropped
    from the arrays at the next compaction (recent drops its own at every insert, so no level holds a key twice).
    """

    RECENT_MIN = 1 << 16  # recent is due for compaction at max(this, len(main) // 8) keys...
    HARD_FACTOR = 4  # ...and add_sorted compacts by itself at this many times that

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        empty = np.zeros(0, np.int64)
        self.main_keys, self.main_order = empty, empty
        self.recent_keys, self.recent_order = empty, empty
        self.inserted = 0

    def __len__(self) -> int:
        return min(self.inserted, self.capacity)  # every counter value belongs to one key while it is kept

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.main_keys, self.main_order, self.recent_keys, self.recent_order)))

    @property
    def _oldest_kept(self) -> int:
        return self.inserted - self.capacity

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, np.int64)
        out = np.zeros(len(keys), bool)
        for lk, lo in ((self.main_keys, self.main_order), (self.recent_keys, self.recent_order)):
            if len(lk):
                pos = np.minimum(np.searchsorted(lk, keys), len(lk) - 1)
                out |= (lk[pos] == keys) & (lo[pos] >= self._oldest_kept)
        return out

    def add(self, keys: np.ndarray) -> None:
        """Insert new keys (unique, not present), in the order given."""
        keys = np.asarray(keys, np.int64)
        s = np.argsort(keys, kind="stable")
        self.add_sorted(keys[s], s)

    def add_sorted(self, keys: np.ndarray, rank: np.ndarray) -> None:
        """add() for keys already sorted; rank[i] = position of keys[i] in the insertion order."""
        order = self.inserted + np.asarray(rank, np.int64)
        self.inserted += len(keys)
        rk, ro = self.recent_keys, self.recent_order
        alive = ro >= self._oldest_kept
        if not alive.all():
            rk, ro = rk[alive], ro[alive]
        pos = np.searchsorted(rk, keys)
        self.recent_keys, self.recent_order = np.insert(rk, pos, keys), np.insert(ro, pos, order)
        if len(self.recent_keys) >= self.HARD_FACTOR * self._recent_limit:
            self.compact()

    @property
    def _recent_limit(self) -> int:
        return max(self.RECENT_MIN, len(self.main_keys) // 8)

    @property
    def compaction_due(self) -> bool:
        return len(self.recent_keys) >= self._recent_limit

    def compact(self) -> None:
        """Merge recent into main, dropping forgotten keys: O(map), so callers run it off the latency path."""
        mk, mo = self.main_keys, self.main_order
        alive = mo >= self._oldest_kept
        if not alive.all():
            mk, mo = mk[alive], mo[alive]
        rk, ro = self.recent_keys, self.recent_order
        alive = ro >= self._oldest_kept
        rk, ro = rk[alive], ro[alive]
        pos = np.searchsorted(mk, rk)
        self.main_keys, self.main_order = np.insert(mk, pos, rk), np.insert(mo, pos, ro)
        self.recent_keys, self.recent_order = rk[:0], ro[:0]

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, insertion counters) of the keys held, in key order (merges the levels first)."""
        self.compact()
        return self.main_keys, self.main_order


def voxel_centres(keys: np.ndarray, voxel: float) -> np.ndarray:
    """voxel_keys' inverse up to the wrap: (M,) keys -> (M, 3) voxel centres."""
    keys = np.asarray(keys, np.int64)
    mask = (1 << _KEY_BITS) - 1
    q = np.stack([(keys >> (2 * _KEY_BITS)) & mask, (keys >> _KEY_BITS) & mask, keys & mask], 1)
    return (q - (1 << (_KEY_BITS - 1)) + 0.5) * voxel
