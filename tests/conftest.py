"""Test setup: 4 fake CPU devices (set before JAX starts), a data cache per process, one JAX compilation cache for
the run, and a small prepared corpus shared by the suite."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
_USER_CACHE = os.environ.get("FEDJAX_CODE_CACHE", os.path.expanduser("~/.cache/fedjax-code"))
os.environ["FEDJAX_CODE_CACHE"] = tempfile.mkdtemp(prefix="fedjax-code-test-cache-")  # runs prepare data here
atexit.register(shutil.rmtree, os.environ["FEDJAX_CODE_CACHE"], ignore_errors=True)
if os.path.isdir(os.path.join(_USER_CACHE, "pretrained")):  # reuse the models `make install` fetched
    os.symlink(os.path.join(_USER_CACHE, "pretrained"), os.path.join(os.environ["FEDJAX_CODE_CACHE"], "pretrained"))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # one compilation cache for the whole run: pytest-xdist's workers
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedjax-code-test-jax-")  # and the CLI
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)  # subprocesses
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # inherit it, and the tests compile the same
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"  # small programs again and again
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: a hub id fails at once

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A 2 MB corpus of the installed Python sources with a 2,048-token BPE, prepared once."""
    from fedjax_code.config import DataConfig
    from fedjax_code.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    return prepare(DataConfig(max_bytes=2_000_000, vocab_size=2048), out, progress=False)


TINY_SWEEP = """
name = "tiny"
description = "Two scales of cpu-0.25, IID vs Dirichlet(0.5) over 8 clients, two rounds: a test fixture."

[grid]
scale = [0.5, 1.0]
partition = ["iid", "dirichlet-0.5"]
participation = [0.5]

[budget]
kind = "rounds"
value = 2

[eval]
n = 10
k = [1, 10]
problems = "0:2"
nll_problems = "0:3"
max_new_tokens = 8
workers = 2

[report]
target_loss = 7.0
bootstrap = 50

[base.data]
max_bytes = 300000
max_file_bytes = 8000
vocab_size = 512
clients = 8

[base.model]
base = "cpu-0.25"

[base.federated]
local_steps = 2
batch_size = 2
seq_len = 32

[base.train]
eval_every = 1
eval_windows = 2
checkpoint_every = 2
"""


@pytest.fixture(scope="session")
def tiny_sweep_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.toml"
    path.write_text(TINY_SWEEP)
    return path


@pytest.fixture(scope="session")
def tiny_sweep(tiny_sweep_spec, tmp_path_factory):
    """A finished 4-cell sweep (trained, evaluated, reported) shared by the sweep, report and notebook tests."""
    from fedjax_code.experiments.report import write_report
    from fedjax_code.experiments.sweep import load_spec, run_sweep

    out = tmp_path_factory.mktemp("sweeps") / "tiny"
    outcomes = run_sweep(load_spec(str(tiny_sweep_spec)), out, progress=False, log=lambda line: None)
    assert [o.status for o in outcomes] == ["done"] * 4, outcomes
    write_report(out)
    return out
