"""Corpus sources, selection and cleaning, on small trees and files made by the tests."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fedjax_code.config import DataConfig
from fedjax_code.data import corpus
from fedjax_code.errors import UserError


def _module(name: str, lines: int = 10) -> str:
    return "".join(f"def {name}_{i}(x):\n    return x + {i}\n\n" for i in range(lines))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "site"
    for pkg in ("alpha", "beta", "gamma"):
        for i in range(3):
            path = root / pkg / "sub" / f"m{i}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_module(f"{pkg}{i}"))
    (root / "single.py").write_text(_module("single"))
    (root / "alpha" / "copy.py").write_text(_module("alpha0"))  # duplicate of alpha/sub/m0.py
    (root / "alpha-1.0.dist-info").mkdir()
    (root / "alpha-1.0.dist-info" / "x.py").write_text(_module("meta"))
    (root / "beta" / "__pycache__").mkdir()
    (root / "beta" / "__pycache__" / "y.py").write_text(_module("cache"))
    (root / "gamma" / "tiny.py").write_text("x = 1\n")
    return root


def _build(root, **kw):
    cfg = DataConfig(**{"max_bytes": 10**7, "min_file_bytes": 50, **kw})
    return corpus.build_records(cfg, roots=[root], progress=False)


def test_groups_dedup_and_size_filter(tree):
    records, counts = _build(tree)
    groups = sorted({r["group"] for r in records})
    assert groups == ["alpha", "beta", "gamma", "single"]
    assert not any("dist-info" in r["path"] or "__pycache__" in r["path"] for r in records)
    assert counts["duplicates_removed"] == 1
    assert counts["skipped_size"] == 1  # gamma/tiny.py
    assert len(records) == 10


def test_budget_is_filled_round_robin_and_deterministically(tree):
    size = len(_module("alpha0").encode())
    records, _ = _build(tree, max_bytes=4 * size + 10)
    assert [r["group"] for r in records] == ["alpha", "beta", "gamma", "single"]
    assert sum(len(r["text"].encode()) for r in records) <= 4 * size + 10
    assert records == _build(tree, max_bytes=4 * size + 10)[0]


def test_unreadable_files_are_skipped_and_counted(tree):
    (tree / "beta" / "latin1.py").write_bytes(b"s = '\xe9t\xe9'\n" * 20)
    os.symlink(tree / "missing.py", tree / "beta" / "broken.py")
    records, counts = _build(tree)
    assert counts["unreadable"] == 2
    assert len(records) == 10


def test_function_unit_extracts_humaneval_style_examples(tmp_path):
    src = (
        "import math\n\n\n@cache\ndef area(r: float) -> float:\n"
        '    """Area of a circle.\n\n    >>> area(1.0)\n    3.14159\n    """\n'
        "    return math.pi * r * r\n\n\ndef no_doc(x):\n    return x\n\n\n"
        'def only_doc():\n    """Nothing else."""\n'
    )
    examples = corpus.extract_functions(src)
    assert [name for name, _, _ in examples] == ["area"]
    _, prompt, completion = examples[0]
    assert prompt.startswith("@cache\ndef area") and prompt.endswith('    """\n')
    assert completion == "    return math.pi * r * r\n"
    (tmp_path / "site" / "geo").mkdir(parents=True)
    (tmp_path / "site" / "geo" / "shapes.py").write_text(src)
    records, _ = _build(tmp_path / "site", unit="function")
    assert [(r["path"].rsplit("::", 1)[1], r["text"]) for r in records] == [("area", prompt + completion)]


def test_empty_corpus_is_a_user_error(tmp_path):
    (tmp_path / "site").mkdir()
    with pytest.raises(UserError, match="empty"):
        _build(tmp_path / "site")


def test_default_source_is_the_standard_library_only():
    stdlib, = corpus.python_roots(corpus.STDLIB)
    assert DataConfig().source == corpus.STDLIB
    cands = corpus.candidates(DataConfig(), Counter())
    groups = {c.group for c in cands}
    assert {"json", "os", "asyncio", "email"} <= groups and not {"numpy", "jax", "transformers"} & groups
    assert all("site-packages" not in c.path for c in cands)  # not even the base interpreter's own
    everything = corpus.candidates(DataConfig(source=corpus.LOCAL_PYTHON), Counter())
    assert {"json", "numpy", "jax", "transformers"} <= {c.group for c in everything}


def test_installing_a_package_leaves_the_default_corpus_key_unchanged():
    """A real install into this environment's site-packages changes local-python's key, never stdlib's."""
    import sysconfig

    from fedjax_code.data.prepare import data_key

    package = Path(sysconfig.get_paths()["purelib"]) / f"fedjax_code_fake_install_{os.getpid()}"
    default, everything = DataConfig(), DataConfig(source=corpus.LOCAL_PYTHON)
    before = data_key(default), data_key(everything)
    try:
        package.mkdir()
        (package / "__init__.py").write_text(_module("installed"))
        after = data_key(default), data_key(everything)
    finally:
        shutil.rmtree(package, ignore_errors=True)
    assert after[0] == before[0] and after[1] != before[1]


ROWS = [{"content": _module(f"f{i}"), "repo": f"org{i % 3}", "path": f"r/{i}.py"} for i in range(9)]


def _write_rows(path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "dir":
        ds.save_to_disk(str(path))
    elif fmt == "arrow":
        ds.save_to_disk(str(path.parent / "saved"))
        path = next((path.parent / "saved").glob("*.arrow"))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "dir"])
def test_local_dataset_files_as_source(tmp_path, fmt):
    path = _write_rows(tmp_path / f"rows.{fmt}", fmt)
    cfg = DataConfig(source=str(path), text_column="content", group_column="repo", max_bytes=10**6, min_file_bytes=1)
    records, _ = corpus.build_records(cfg, progress=False)
    assert sorted(r["text"] for r in records) == sorted(r["content"] for r in ROWS)
    assert {r["group"] for r in records} == {"org0", "org1", "org2"}
    assert {r["path"] for r in records} == {r["path"] for r in ROWS}


def test_bad_sources_are_user_errors(tmp_path):
    path = _write_rows(tmp_path / "rows.jsonl", "jsonl")
    with pytest.raises(UserError, match="column 'text' is not in"):
        corpus.build_records(DataConfig(source=str(path)), progress=False)
    with pytest.raises(UserError, match="does not exist"):
        corpus.build_records(DataConfig(source=str(tmp_path / "nope.parquet")), progress=False)
    with pytest.raises(UserError, match="unknown source"):
        corpus.build_records(DataConfig(source=str(tmp_path / "notes.txt")), progress=False)


def test_hub_source_offline_is_a_user_error(monkeypatch):
    """A hub id goes to the hub; offline, that fails with one sentence (the libraries read the flag at import)."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not load hub dataset 'nobody/no-such-dataset'"):
        corpus.build_records(DataConfig(source="nobody/no-such-dataset"), progress=False)


ALPACA = [  # code-alpaca's columns: instruction, input (often empty), output
    {"instruction": "Write a function that doubles x.", "input": "", "output": "def double(x):\n    return 2 * x\n"},
    {"instruction": "Sum a list.", "input": "xs = [1, 2]", "output": "def total(xs):\n    return sum(xs)\n"},
    {"instruction": "Broken row.", "input": "", "output": None},
]


def test_instruction_columns_give_prompt_completion_records(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    cfg = DataConfig(source=str(path), prompt_column="instruction,input", completion_column="output",
                     min_file_bytes=1, loss_on="completion")
    records, counts = corpus.build_records(cfg, progress=False)
    assert [(r["prompt"], r["completion"]) for r in records] == [
        ("Write a function that doubles x.\n", ALPACA[0]["output"]), ("Sum a list.\nxs = [1, 2]\n", ALPACA[1]["output"])]
    assert all(r["text"] == r["prompt"] + r["completion"] for r in records) and counts["unreadable"] == 1
    with pytest.raises(UserError, match="column 'response' is not in"):
        corpus.build_records(DataConfig(source=str(path), prompt_column="instruction", completion_column="response"),
                             progress=False)


def test_instruction_and_loss_settings_are_validated():
    with pytest.raises(UserError, match="go together"):
        DataConfig(prompt_column="instruction")
    with pytest.raises(UserError, match="needs prompt/completion pairs"):
        DataConfig(loss_on="completion")
    with pytest.raises(UserError, match="loss_on must be all or completion"):
        DataConfig(loss_on="prompt")
