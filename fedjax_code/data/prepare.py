"""``fedjax-code data prepare``: corpus -> tokenizer -> flat token array, cached by config hash.

A prepared directory holds::

    dataset/       HF Dataset [text, group, path, prompt, completion, n_tokens, topic]
    tokenizer/     HF fast tokenizer (AutoTokenizer.from_pretrained loads it)
    tokens.bin     every document as [BOS] ids [EOS] (``document_prefix = "tokenizer"``: what the tokenizer puts
                   before any text, a pretrained model's own convention, instead of [BOS]), concatenated
                   (uint16 if the vocab fits)
    loss_mask.bin  with ``loss_on = "completion"`` only: uint8, aligned with tokens.bin, 1 where a token is
                   part of a completion (``tokenizer.encode_documents``)
    doc_offsets.npy  int64 [N+1]: document i is tokens[doc_offsets[i]:doc_offsets[i+1]]
    stats.json     counts, tokens_sha256 (the token stream's content hash), the topic classes
                   (topics, topic_histogram, topic_terms: see :mod:`topics`), unigram_entropy (nats, over
                   tokens.bin), throughput, the config and its cache key (written last)

It is built in a sibling temp directory and renamed into place, so a crash
never leaves a half-written directory that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

from fedjax_code.cache import cache_root, file_sha256
from fedjax_code.config import DataConfig, config_hash
from fedjax_code.data import corpus, topics
from fedjax_code.data.tokenizer import encode_documents, load_tokenizer, token_dtype, tokenizer_sha256, train_tokenizer
from fedjax_code.errors import UserError


def default_cache() -> Path:
    """Where prepared data goes without ``--out``: $FEDJAX_CODE_CACHE/data or ~/.cache/fedjax-code/data."""
    return cache_root() / "data"


def source_fingerprint(cfg: DataConfig, roots: list[Path] | None = None) -> dict:
    """Facts about the source that change when its content does (without reading it). For the Python
    sources: the interpreter's version and the listing (relative path, size) of the files the source reads."""
    if cfg.source in (corpus.STDLIB, corpus.LOCAL_PYTHON):
        roots = roots or corpus.python_roots(cfg.source)
        listing = [[(str(Path(c.path).relative_to(r)), c.size) for c in corpus.python_files(r)] for r in roots]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        return {"python": ".".join(map(str, sys.version_info[:3])), "listing": digest}
    path = Path(cfg.source)
    if path.exists():
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}
    return {"hub": cfg.source}


def data_key(cfg: DataConfig, roots: list[Path] | None = None) -> str:
    """The cache key of a data configuration: its fields plus the source fingerprint."""
    tok = {"tokenizer_sha256": tokenizer_sha256(load_tokenizer(cfg.tokenizer))} if cfg.tokenizer else {}
    return config_hash(cfg, {**source_fingerprint(cfg, roots), **tok, "topic_method": topics.METHOD})


def tokens_sha256(out: Path) -> str:
    """A short content hash of a prepared directory's token stream, computed from its bytes."""
    return file_sha256(Path(out) / "tokens.bin")[:16]


def is_prepared(out: Path) -> bool:
    return (out / "stats.json").is_file()


def read_stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def prepare(cfg: DataConfig, out: Path | None = None, roots: list[Path] | None = None,
            force: bool = False, progress: bool = True) -> Path:
    """Prepare the data for ``cfg`` in ``out`` (default: the cache), reusing a matching result."""
    key = data_key(cfg, roots)
    out = Path(out) if out is not None else default_cache() / key
    if is_prepared(out) and not force:
        if read_stats(out)["key"] == key:
            return out
        raise UserError(f"{out} holds data prepared with another configuration; pass --force or choose another --out")
    if out.exists() and any(out.iterdir()) and not is_prepared(out) and not force:
        raise UserError(f"{out} exists and is not a prepared data directory; choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _build(cfg, key, tmp, roots, progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(cfg: DataConfig, key: str, tmp: Path, roots: list[Path] | None, progress: bool) -> None:
    datasets.disable_progress_bars()  # our own bar covers the corpus; saving is quick
    start = time.perf_counter()
    records, counts = corpus.build_records(cfg, roots, progress)
    texts = [r["text"] for r in records]
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(texts, cfg.vocab_size)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    prompts = [r["prompt"] for r in records] if cfg.loss_on == "completion" else None
    prefix = tokenizer.encode("") if cfg.document_prefix == "tokenizer" else None
    docs, masks = encode_documents(tokenizer, texts, prompts, prefix)
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    flat = _write_stream(tmp / "tokens.bin", docs, offsets, token_dtype(len(tokenizer)))
    if masks is not None:
        _write_stream(tmp / "loss_mask.bin", masks, offsets, np.uint8)
    np.save(tmp / "doc_offsets.npy", offsets)
    columns = {k: [r[k] for r in records] for k in ("text", "group", "path", "prompt", "completion")}
    columns["n_tokens"] = np.diff(offsets).tolist()
    doc_counts = topics.doc_token_counts(flat, offsets, len(tokenizer))
    labels = topics.assign_topics(doc_counts, cfg.topics)
    columns["topic"] = labels.tolist()
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / "dataset"))
    seconds = time.perf_counter() - start
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    stats = {
        "key": key,
        "files": len({r["path"].split("::")[0] for r in records}),
        "records": len(records),
        "bytes": total_bytes,
        "tokens": int(offsets[-1]),
        "tokens_sha256": tokens_sha256(tmp),
        "groups": len(set(columns["group"])),
        "topics": int(labels.max()) + 1,
        "topic_histogram": np.bincount(labels).tolist(),
        "topic_terms": topics.topic_terms(doc_counts, labels, tokenizer),
        "unigram_entropy": round(topics.unigram_entropy(np.asarray(doc_counts.sum(0)).ravel()), 6),
        "vocab_size": len(tokenizer),
        "token_dtype": str(flat.dtype),
        "duplicates_removed": counts["duplicates_removed"],
        "decontaminated": counts["decontaminated"],
        "unreadable": counts["unreadable"],
        "skipped_size": counts["skipped_size"],
        "decontam_ngram": cfg.decontam_ngram if cfg.decontaminate else None,
        "seconds": round(seconds, 3),
        "mb_per_s": round(total_bytes / 1e6 / seconds, 3),
        "tokens_per_s": round(int(offsets[-1]) / seconds),
        "config": dataclasses.asdict(cfg),
    }
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _write_stream(path: Path, docs: list[np.ndarray], offsets: np.ndarray, dtype) -> np.memmap:
    flat = np.memmap(path, dtype=dtype, mode="w+", shape=(int(offsets[-1]),))
    for doc, begin in zip(docs, offsets[:-1]):
        flat[begin : begin + len(doc)] = doc
    flat.flush()
    return flat


def load_loss_mask(out: Path) -> np.ndarray | None:
    """The prepared data's loss mask (``loss_on = "completion"``), aligned with its tokens, or None."""
    path = Path(out) / "loss_mask.bin"
    return np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None


def load_prepared(out: Path):
    """(dataset, tokenizer, tokens memmap, doc_offsets) of a prepared directory."""
    out = Path(out)
    if not is_prepared(out):
        raise UserError(f"{out} is not a prepared data directory (run `fedjax-code data prepare --out {out}`)")
    stats = read_stats(out)
    tokens = np.memmap(out / "tokens.bin", dtype=np.dtype(stats["token_dtype"]), mode="r")
    return datasets.load_from_disk(str(out / "dataset")), load_tokenizer(out / "tokenizer"), tokens, np.load(out / "doc_offsets.npy")
