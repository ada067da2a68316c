"""Corpus sources and cleaning: records of ``{text, group, path}``.

Sources:
  * ``stdlib`` (default, offline): every ``.py`` file of the running interpreter's
    standard library, without its site-packages, so installing or removing packages
    never changes it: the same bytes on every machine with the same Python build;
    ``group`` is the top-level module or package (``json``, ``email``, ``asyncio``);
  * ``local-python``: the standard library plus site-packages (``numpy``,
    ``transformers``, ...): more code, but it changes with every install;
  * a local ``.json``/``.jsonl``/``.parquet``/``.arrow``/``.csv`` file or a
    directory written by ``Dataset.save_to_disk``;
  * any other string is a Hugging Face hub dataset id, streamed (online only).

Instruction data (``data.prompt_column`` and ``data.completion_column``, for example
``flwrlabs/code-alpaca-20k`` with ``instruction,input`` and ``output``) gives one record per row: the prompt
columns joined by newlines, then the completion, as the ``function`` unit gives a signature and docstring,
then the body.

Selection fills ``max_bytes`` deterministically: candidates are taken
round-robin across groups (sorted), each group's files in path order, so a
small budget still covers many groups. Exact duplicates (by SHA-256) and
HumanEval-contaminated records (see :mod:`decontam`) are dropped and counted;
unreadable files are skipped and counted.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import sys
import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import datasets
from tqdm.auto import tqdm

from fedjax_code.config import DataConfig
from fedjax_code.data.decontam import humaneval_decontaminator
from fedjax_code.errors import UserError

STDLIB, LOCAL_PYTHON = "stdlib", "local-python"
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


@dataclass(frozen=True)
class Candidate:
    """A record not yet read: its group, path, size in bytes and a reader (of a source text, or of an instruction
    row's (prompt, completion))."""

    group: str
    path: str
    size: int
    read: Callable[[], str | tuple[str, str]]


def python_roots(source: str = LOCAL_PYTHON) -> list[Path]:
    """The running interpreter's stdlib directory, and for ``local-python`` its site-packages too."""
    paths = sysconfig.get_paths()
    keys = ("stdlib",) if source == STDLIB else ("stdlib", "purelib", "platlib")
    roots = [Path(paths[k]) for k in keys]
    return sorted({r.resolve() for r in roots if r.is_dir()}, key=roots.index)


def _group_of(rel: Path) -> str | None:
    top = rel.parts[0]
    if top.endswith((".dist-info", ".egg-info")) or top.startswith("__editable__"):
        return None
    return top[:-3] if len(rel.parts) == 1 else top


def python_files(root: Path, counts: Counter | None = None) -> list[Candidate]:
    """The ``.py`` files under ``root`` in path order, skipping packaging metadata and any nested
    site-packages (the stdlib directory holds one); files that cannot be stat'ed are counted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        group = _group_of(rel)
        if group is None or _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            size = path.stat().st_size
        except OSError:
            if counts is not None:
                counts["unreadable"] += 1
            continue
        out.append(Candidate(group, str(path), size, lambda p=path: p.read_bytes().decode("utf-8")))
    return out


def _load_dataset(source: str, split: str):
    path = Path(source)
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.suffix in FILE_FORMATS:
        if not path.exists():
            raise UserError(f"source file {source} does not exist")
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    if path.suffix or source.startswith((".", "/")) or source.count("/") > 1:
        raise UserError(
            f"unknown source {source!r}: use {STDLIB!r}, {LOCAL_PYTHON!r}, a hub dataset id, or a file ending in "
            + ", ".join(sorted(FILE_FORMATS))
        )
    try:
        return datasets.load_dataset(source, split=split, streaming=True)
    except Exception as err:  # the hub raises many types: connection, not found, gated
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load hub dataset {source!r} ({first_line})") from None


def instruction_pair(row: dict, prompt_columns: list[str], completion_column: str) -> tuple[str, str] | None:
    """(prompt, completion) of an instruction row: the non-empty prompt columns joined by newlines, ending in one."""
    parts = [row[c] for c in prompt_columns]
    if not all(isinstance(v, str) for v in [*parts, row[completion_column]]) or not row[completion_column].strip():
        return None
    return "\n".join(p.strip() for p in parts if p.strip()) + "\n", row[completion_column]


def _dataset_candidates(cfg: DataConfig, counts: Counter) -> list[Candidate]:
    ds = _load_dataset(cfg.source, cfg.split)
    columns = ds.column_names or []
    prompts = cfg.prompt_column.split(",") if cfg.prompt_column else []
    wanted = [*prompts, cfg.completion_column] if prompts else [cfg.text_column]
    for name in filter(None, (*wanted, cfg.group_column)):
        if columns and name not in columns:
            raise UserError(f"column {name!r} is not in {cfg.source} (columns: {', '.join(columns)})")
    out, streamed = [], 0
    for i, row in enumerate(ds):
        pair = instruction_pair(row, prompts, cfg.completion_column) if prompts else None
        text = "".join(pair) if pair else row[cfg.text_column] if not prompts else None
        if not isinstance(text, str):
            counts["unreadable"] += 1
            continue
        size = len(text.encode("utf-8"))
        group = str(row[cfg.group_column]) if cfg.group_column else "all"
        read = (lambda p=pair: p) if pair else (lambda t=text: t)
        out.append(Candidate(group, str(row.get("path") or f"{cfg.source}#{i}"), size, read))
        streamed += size
        if streamed >= 4 * cfg.max_bytes:  # a hub stream can be terabytes: read a bounded prefix
            break
    return out


def candidates(cfg: DataConfig, counts: Counter, roots: list[Path] | None = None) -> list[Candidate]:
    """All records the source offers, before selection and cleaning."""
    if cfg.source in (STDLIB, LOCAL_PYTHON):
        return [c for root in roots or python_roots(cfg.source) for c in python_files(root, counts)]
    return _dataset_candidates(cfg, counts)


def round_robin(cands: list[Candidate]) -> Iterator[Candidate]:
    """Candidates interleaved across sorted groups, each group in path order."""
    by_group: dict[str, list[Candidate]] = defaultdict(list)
    for c in sorted(cands, key=lambda c: (c.group, c.path)):
        by_group[c.group].append(c)
    for batch in itertools.zip_longest(*(by_group[g] for g in sorted(by_group))):
        yield from (c for c in batch if c is not None)


def extract_functions(text: str) -> list[tuple[str, str, str]]:
    """HumanEval-style examples ``(name, prompt, completion)`` from a module's source.

    The prompt is a top-level function's decorators, signature and docstring, up to and
    including the docstring's last line; the completion is the rest of the body.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc, body = node.body[0], node.body[1:]
        if not body or body[0].lineno <= doc.end_lineno:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        prompt = "".join(lines[start : doc.end_lineno])
        completion = "".join(lines[doc.end_lineno : node.end_lineno])
        if completion.strip():
            out.append((node.name, prompt, completion))
    return out


def _records(cand: Candidate, text: str | tuple[str, str], unit: str) -> list[dict]:
    if isinstance(text, tuple):  # an instruction row: (prompt, completion)
        return [{"text": "".join(text), "group": cand.group, "path": cand.path, "prompt": text[0],
                 "completion": text[1]}]
    if unit == "file":
        return [{"text": text, "group": cand.group, "path": cand.path, "prompt": "", "completion": ""}]
    return [
        {"text": p + c, "group": cand.group, "path": f"{cand.path}::{name}", "prompt": p, "completion": c}
        for name, p, c in extract_functions(text)
    ]


def _read(cand: Candidate, cfg: DataConfig, counts: Counter) -> list[dict]:
    try:
        text = cand.read()
        return _records(cand, text, cfg.unit)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        counts["unreadable"] += 1
        return []


def build_records(cfg: DataConfig, roots: list[Path] | None = None, progress: bool = True) -> tuple[list[dict], Counter]:
    """Select, read, deduplicate and decontaminate records up to ``cfg.max_bytes``."""
    counts: Counter = Counter()
    cands = candidates(cfg, counts, roots)
    decontam = humaneval_decontaminator(cfg.decontam_ngram) if cfg.decontaminate else None
    seen, records, total = set(), [], 0
    bar = tqdm(total=cfg.max_bytes, unit="B", unit_scale=True, desc="corpus", disable=None if progress else True, file=sys.stderr)
    for cand in round_robin(cands):
        if not cfg.min_file_bytes <= cand.size <= cfg.max_file_bytes:
            counts["skipped_size"] += 1
            continue
        if total + cand.size > cfg.max_bytes:
            continue
        for rec in _read(cand, cfg, counts):
            digest = hashlib.sha256(rec["text"].encode("utf-8")).digest()
            if digest in seen:
                counts["duplicates_removed"] += 1
            elif decontam is not None and decontam.is_contaminated(rec["text"]):
                counts["decontaminated"] += 1
            else:
                seen.add(digest)
                records.append(rec)
                size = len(rec["text"].encode("utf-8"))
                total += size
                bar.update(size)
        if cfg.max_bytes - total < cfg.min_file_bytes:
            break
    bar.close()
    if not records:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing dropped"
        raise UserError(f"the corpus from {cfg.source!r} is empty after selection and cleaning ({dropped})")
    return records, counts
