"""Per-client state on the host: one memory-mapped file per leaf, rows [K, ...], so device memory grows with the
cohort and not with the number of clients K.

A round gathers its cohort's rows (``gather``), the jitted round updates them on the device, and ``scatter``
writes them back. Rows never written are *fresh*: ``gather`` says which, and the round gives those clients the
algorithm's ``init_client`` state. Files are created sparse, so disk use grows with the clients that trained.

Crash safety (resume stays bit-identical): before ``scatter`` overwrites rows at round r it saves their old
contents in ``undo/r.npz``. Once the checkpoint of round r is saved, ``commit(r)`` drops the logs up to r; a run
resumed from checkpoint r calls ``rollback(r)``, which restores the rows written by any later round, newest first.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import jax
import numpy as np

META = "store.json"


class ClientStore:
    """Rows of per-client state shaped like ``template`` (a pytree of array shapes and dtypes), one per client."""

    def __init__(self, directory: Path, template, num_clients: int):
        self.dir = Path(directory)
        leaves, self.treedef = jax.tree.flatten(template)
        meta = {"num_clients": num_clients,
                "leaves": [[list(x.shape), np.dtype(x.dtype).str] for x in leaves]}
        if (self.dir / META).is_file():
            found = json.loads((self.dir / META).read_text())
            if found != meta:
                raise ValueError(f"the client store in {self.dir} holds other shapes ({found}) than this run ({meta})")
        else:
            (self.dir / "undo").mkdir(parents=True, exist_ok=True)
            (self.dir / META).write_text(json.dumps(meta))
        self.num_clients = num_clients
        self.written = self._open("written", (), np.bool_)
        self.leaves = [self._open(f"leaf{i}", x.shape, x.dtype) for i, x in enumerate(leaves)]

    def _open(self, name: str, shape, dtype) -> np.memmap:
        path = self.dir / f"{name}.bin"
        mode = "r+" if path.is_file() else "w+"  # w+ creates a sparse file of zeros
        array = np.memmap(path, dtype=dtype, mode=mode, shape=(self.num_clients, *shape))
        if hasattr(mmap, "MADV_RANDOM") and array.size:
            array._mmap.madvise(mmap.MADV_RANDOM)  # rows are read a cohort at a time: no readahead
        return array

    @property
    def row_bytes(self) -> int:
        return sum(leaf[0].nbytes for leaf in self.leaves)

    def gather(self, ids) -> tuple:
        """(rows: the template's pytree with leaves [C, ...], fresh [C] bool: never written). Padded cohorts may
        repeat ids. Only written rows are read; fresh ones are zeros (the round replaces them)."""
        ids = np.asarray(ids)
        fresh = ~self.written[ids]
        stored = ids[~fresh]

        def read(leaf):
            rows = np.zeros((len(ids), *leaf.shape[1:]), leaf.dtype)
            rows[~fresh] = leaf[stored]
            return rows

        return jax.tree.unflatten(self.treedef, [read(leaf) for leaf in self.leaves]), fresh

    def scatter(self, round_: int, ids, rows, mask) -> None:
        """Write ``rows`` [C, ...] to clients ``ids`` where ``mask`` is True, after logging what they held (only the
        rows that were written before: a fresh row is restored by its flag alone)."""
        mask = np.asarray(mask, bool)
        ids = np.asarray(ids)[mask]
        was = self.written[ids]
        old = {f"leaf{i}": leaf[ids[was]] for i, leaf in enumerate(self.leaves)}
        self._write_log(round_, ids=ids, written=was, **old)
        self.written[ids] = True
        for target, new in zip(self.leaves, jax.tree.leaves(rows)):
            target[ids] = np.asarray(new)[mask]

    def _write_log(self, round_: int, **arrays) -> None:
        tmp = self.dir / "undo" / f"{round_}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self._log(round_))

    def _log(self, round_: int) -> Path:
        return self.dir / "undo" / f"{round_}.npz"

    def _logged_rounds(self) -> list[int]:
        return sorted(int(p.name.split(".")[0]) for p in (self.dir / "undo").glob("*.npz") if ".tmp" not in p.name)

    def commit(self, round_: int) -> None:
        """The checkpoint of ``round_`` is saved: flush the rows and drop the undo logs up to it."""
        self.flush()
        for r in self._logged_rounds():
            if r <= round_:
                self._log(r).unlink()

    def rollback(self, round_: int) -> None:
        """Restore the rows as they were at the end of round ``round_`` (the checkpoint a run resumes from)."""
        for r in reversed(self._logged_rounds()):
            if r > round_:
                log = np.load(self._log(r))
                ids, was = log["ids"], log["written"]
                self.written[ids] = was
                for i, leaf in enumerate(self.leaves):
                    leaf[ids[was]] = log[f"leaf{i}"]
                self.flush()
                self._log(r).unlink()
        self.commit(round_)

    def flush(self) -> None:
        self.written.flush()
        for leaf in self.leaves:
            leaf.flush()
