"""Frozen, validated configuration dataclasses, one per concern."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from fedjax_code.errors import UserError

UNITS = ("file", "function")
SCHEMES = ("iid", "dirichlet", "pathological", "natural", "size")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def config_hash(cfg, extra: dict | None = None) -> str:
    """A short stable hash of a config dataclass (plus optional extra facts)."""
    blob = json.dumps({"config": dataclasses.asdict(cfg), "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DataConfig:
    """What goes into the corpus and the tokenizer (``fedjax-code data prepare``)."""

    source: str = "local-python"
    split: str = "train"
    text_column: str = "text"
    group_column: str | None = None
    unit: str = "file"
    max_bytes: int = 20_000_000
    min_file_bytes: int = 200
    max_file_bytes: int = 200_000
    decontaminate: bool = True
    decontam_ngram: int = 13
    vocab_size: int = 8192
    tokenizer: str | None = None

    def __post_init__(self):
        _require(self.unit in UNITS, f"unit must be one of {', '.join(UNITS)}, not {self.unit!r}")
        _require(self.max_bytes > 0, f"max_bytes must be positive, not {self.max_bytes}")
        _require(0 <= self.min_file_bytes <= self.max_file_bytes, "min_file_bytes must be between 0 and max_file_bytes")
        _require(self.decontam_ngram >= 1, "decontam_ngram must be at least 1")
        _require(self.vocab_size >= 300, f"vocab_size must be at least 300 (256 bytes + specials), not {self.vocab_size}")


@dataclass(frozen=True)
class PartitionConfig:
    """How examples are split across clients (``fedjax-code data partition``)."""

    scheme: str = "iid"
    clients: int = 16
    alpha: float = 0.5
    groups_per_client: int = 2
    min_client_examples: int = 2
    seed: int = 0

    def __post_init__(self):
        _require(self.scheme in SCHEMES, f"unknown partition scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}")
        _require(self.clients >= 1, f"the number of clients must be at least 1, not {self.clients}")
        _require(self.alpha > 0, f"alpha must be > 0 (a Dirichlet concentration), not {self.alpha}")
        _require(self.groups_per_client >= 1, f"groups per client must be at least 1, not {self.groups_per_client}")
        _require(self.min_client_examples >= 1, "min_client_examples must be at least 1")
