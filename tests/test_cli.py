"""The command line end to end, and its one-sentence refusals of bad input."""

import json
import subprocess
import sys

import pytest


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "fedjax_code.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def assert_refused(args, message):
    code, _, err = run(*args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "code.jsonl"
    rows = [{"content": f"def f{i}(x):\n    '''Add {i}.'''\n    return x + {i}\n" * 8, "repo": f"org{i % 4}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_partition_shards_from_a_local_file(rows_file, tmp_path):
    data = tmp_path / "data"
    code, out, err = run("data", "prepare", "--source", rows_file, "--text-column", "content", "--group-column",
                         "repo", "--out", data, "--vocab-size", "400", "--min-file-bytes", "10", "--quiet")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["records"] == 40 and stats["groups"] == 4
    code, out, err = run("data", "partition", "--data", data, "--scheme", "natural", "--clients", 4, "--out", tmp_path / "p.json")
    assert code == 0, err
    assert json.loads(out)["clients"] == 4 and json.loads(out)["group_distance"] > 0.7
    code, out, err = run("data", "shards", "--data", data, "--partition", tmp_path / "p.json", "--out", tmp_path / "s")
    assert code == 0, err
    assert json.loads(out)["clients"] == 4


def test_bad_partition_arguments_are_refused(prepared, tmp_path):
    out = tmp_path / "p.json"
    assert_refused(["data", "partition", "--data", prepared, "--scheme", "dirichlet", "--alpha", -1, "--out", out], "alpha must be > 0")
    assert_refused(["data", "partition", "--data", prepared, "--scheme", "zipf", "--out", out], "unknown partition scheme")
    assert_refused(["data", "partition", "--data", prepared, "--clients", 10**6, "--out", out], "more clients than examples")
    assert_refused(["data", "partition", "--data", prepared, "--scheme", "pathological", "-k", 10**5, "--out", out],
                   "exceeds the")
    assert_refused(["data", "partition", "--data", tmp_path / "missing", "--out", out], "not a prepared data directory")
    assert not out.exists()


def test_bad_sources_are_refused(rows_file, tmp_path):
    assert_refused(["data", "prepare", "--source", tmp_path / "none.txt", "--out", tmp_path / "d"], "unknown source")
    assert_refused(["data", "prepare", "--source", rows_file, "--out", tmp_path / "d"], "column 'text' is not in")
    assert_refused(["data", "prepare", "--source", rows_file, "--text-column", "content", "--min-file-bytes", 10**5,
                    "--out", tmp_path / "d"], "empty")
    assert not (tmp_path / "d").exists()
