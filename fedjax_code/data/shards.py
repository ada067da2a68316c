"""Client shards: one flat token array on disk, regrouped by client, with per-client offsets.

Layout of a shards directory::

    tokens.bin   client 0's documents, then client 1's, ... (same dtype as the prepared data)
    loss_mask.bin  the prepared data's loss mask in the same order, when it has one (uint8)
    bounds.npy   int64 [K, 3]: (start, split, end) of each client's stream;
                 train = tokens[start:split], held-out = tokens[split:end]
    meta.json    dtype, vocab size, held-out fraction, partition hash

Memory is the memmap plus 24 bytes per client, so 10,000 clients cost 240 kB.
The held-out split is at the document boundary nearest to ``1 - heldout_frac`` of
the client's tokens; a client with a single document is split inside it.

Sampling is deterministic: client ``c``'s windows in round ``r`` come from
``numpy.random.default_rng([seed, r, c])``, so they do not depend on which other
clients were sampled. Windows start uniformly in the client's train stream, which
samples with replacement; a stream shorter than a window wraps around.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedjax_code.errors import UserError


def split_point(doc_lengths: np.ndarray, heldout_frac: float) -> int:
    """Tokens of the client's stream that go to train (at a document boundary when possible)."""
    total = int(doc_lengths.sum())
    target = (1.0 - heldout_frac) * total
    bounds = np.cumsum(doc_lengths)[:-1]
    if len(bounds) == 0:
        return min(max(int(round(target)), 1), total - 1) if total > 1 else total
    return int(bounds[np.argmin(np.abs(bounds - target))])


def build_shards(tokens: np.ndarray, doc_offsets: np.ndarray, example_client: np.ndarray,
                 out: Path, heldout_frac: float = 0.1, meta: dict | None = None, loss_mask: np.ndarray | None = None
                 ) -> Path:
    """Write the client-ordered token array (and loss mask, if given) and bounds; examples with client -1 are
    left out."""
    if not 0.0 <= heldout_frac < 1.0:
        raise UserError(f"the held-out fraction must be in [0, 1), not {heldout_frac}")
    example_client = np.asarray(example_client)
    k = int(example_client.max()) + 1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.diff(doc_offsets)
    order = np.argsort(example_client, kind="stable")
    order = order[example_client[order] >= 0]
    total = int(lengths[order].sum())
    streams = {"tokens": tokens} if loss_mask is None else {"tokens": tokens, "loss_mask": loss_mask}
    flats = {name: np.memmap(out / f"{name}.bin.partial", dtype=src.dtype, mode="w+", shape=(total,))
             for name, src in streams.items()}
    bounds = np.zeros((k, 3), np.int64)
    pos = 0
    for c, docs in enumerate(np.split(order, np.searchsorted(example_client[order], np.arange(1, k)))):
        bounds[c, 0] = pos
        for d in docs:
            for name, flat in flats.items():
                flat[pos : pos + lengths[d]] = streams[name][doc_offsets[d] : doc_offsets[d + 1]]
            pos += lengths[d]
        bounds[c, 1] = bounds[c, 0] + split_point(lengths[docs], heldout_frac)
        bounds[c, 2] = pos
    for flat in flats.values():
        flat.flush()
    del flats, flat
    np.save(out / "bounds.npy", bounds)
    meta = {"dtype": str(tokens.dtype), "heldout_frac": heldout_frac, "num_clients": k, **(meta or {})}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if loss_mask is not None:
        (out / "loss_mask.bin.partial").replace(out / "loss_mask.bin")
    (out / "tokens.bin.partial").replace(out / "tokens.bin")  # last: its presence marks the shards complete
    return out


class ClientShards:
    """Per-client train/held-out token streams over one memmapped array."""

    def __init__(self, tokens: np.ndarray, bounds: np.ndarray, seed: int = 0, loss_mask: np.ndarray | None = None):
        self.tokens, self.bounds, self.seed, self.loss_mask = tokens, np.asarray(bounds, np.int64), seed, loss_mask

    @classmethod
    def open(cls, path: Path, seed: int = 0) -> "ClientShards":
        path = Path(path)
        if not (path / "tokens.bin").is_file():
            raise UserError(f"{path} holds no client shards (build them with `fedjax-code data shards`)")
        meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        mask = np.memmap(path / "loss_mask.bin", dtype=np.uint8, mode="r") if (path / "loss_mask.bin").is_file() else None
        return cls(tokens, np.load(path / "bounds.npy"), seed, mask)

    @property
    def num_clients(self) -> int:
        return len(self.bounds)

    def train_tokens(self) -> np.ndarray:
        """int64 [K]: tokens in each client's train stream."""
        return self.bounds[:, 1] - self.bounds[:, 0]

    def _windows(self, start: int, length: int, offsets: np.ndarray, width: int, stream=None) -> np.ndarray:
        if length <= 0:
            raise UserError("a client has no tokens in this split; use a smaller held-out fraction or fewer clients")
        idx = start + (offsets[:, None] + np.arange(width)) % length
        return np.asarray((self.tokens if stream is None else stream)[idx], np.int32)

    def sample(self, client_ids, round_: int, local_steps: int, batch_size: int, seq_len: int, stream=None
               ) -> np.ndarray:
        """Training windows int32 [C, E, B, T+1] for the cohort ``client_ids`` in round ``round_``, of the tokens or
        of another stream aligned with them (``self.loss_mask``: the same windows' loss mask)."""
        width, per_client = seq_len + 1, local_steps * batch_size
        out = np.empty((len(client_ids), local_steps, batch_size, width), np.int32)
        for i, c in enumerate(np.asarray(client_ids)):
            start, split, _ = self.bounds[c]
            rng = np.random.default_rng([self.seed, int(round_), int(c)])
            starts = rng.integers(0, max(split - start - width, 0) + 1, size=per_client)
            windows = self._windows(start, split - start, starts, width, stream)
            out[i] = windows.reshape(local_steps, batch_size, width)
        return out

    def heldout(self, client_id: int, seq_len: int, windows: int) -> np.ndarray:
        """``windows`` held-out windows int32 [W, T+1] of one client, spread evenly over its held-out stream
        (window i starts at i * length // W), so they sample whole files rather than the license headers and
        docstrings that open them; a stream shorter than W windows gives consecutive windows that wrap
        (every client gives the same shape)."""
        _, split, end = self.bounds[client_id]
        width = seq_len + 1
        stride = max(width, (end - split) // windows)
        return self._windows(split, end - split, np.arange(windows) * stride, width)
