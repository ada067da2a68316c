"""`fedjax-code train`: metrics, determinism, kill-and-resume equality, run-directory safety, divergence."""

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_code.checkpoint import Checkpointer
from fedjax_code.config import load_experiment
from fedjax_code.errors import UserError
from fedjax_code.experiments.run import train
from fedjax_code.rundir import load_trained, read_config

TINY = [
    "data.max_bytes=300000", "data.max_file_bytes=8000", "data.vocab_size=512", "data.scheme=dirichlet", "data.clients=8",
    "model.base=cpu-0.25", "federated.participation=0.5", "federated.rounds=4", "federated.local_steps=2",
    "federated.batch_size=2", "federated.seq_len=32", "train.eval_every=2", "train.checkpoint_every=2",
    "train.eval_windows=2",
]
TIMING = ("wall_s", "tokens_per_s", "includes_compile")


def tiny(*extra):
    return load_experiment(None, TINY + list(extra))


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_state(run_dir):
    """The server state of a run's latest checkpoint."""
    ckpt = Checkpointer(run_dir / "checkpoints")
    from fedjax_code.experiments.run import Simulation

    return ckpt.restore(ckpt.latest_round(), Simulation(tiny(), progress=False).init_server())[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    train(tiny(), out, progress=False)
    return out


def test_metrics_and_summary(uninterrupted):
    rows = metrics(uninterrupted)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"train_loss", "tokens_seen", "bytes_up", "bytes_down"} <= set(r)
        assert r["bytes_up"] == r["participants"] * r["bytes_down"] // 4  # cohort of 4 selected
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True]
    assert rows[-1]["client_eval_loss_worst10"] >= rows[-1]["client_eval_loss_mean"]
    assert rows[-1]["tokens_seen"] == 4 * 4 * 2 * 2 * 32
    assert rows[-1]["eval_loss"] < rows[1]["eval_loss"]  # it learns
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["eval_loss"] == rows[-1]["eval_loss"]
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["2", "4"]
    cfg, data = read_config(uninterrupted)
    assert cfg == tiny() and summary["data"] == json.loads((uninterrupted / "config.json").read_text())["data"]
    assert len(data.tokens_sha256) == len(data.partition_sha256) == 16 and data.num_clients == 8
    assert (uninterrupted / "tokenizer" / "tokenizer.json").is_file()


def test_same_seed_same_metrics_other_seed_differs(uninterrupted, tmp_path):
    train(tiny(), tmp_path / "b", progress=False)
    assert metrics(tmp_path / "b") == metrics(uninterrupted)
    train(tiny("seed=1"), tmp_path / "c", progress=False)
    assert metrics(tmp_path / "c") != metrics(uninterrupted)


def kill_after_checkpoint(out, *overrides, checkpoint=2, marker=None):
    """Start ``fedjax-code train`` on TINY + ``overrides`` into ``out`` and kill -9 it once checkpoint
    ``checkpoint`` (or the file ``out / marker``) exists."""
    marker = out / (marker or f"checkpoints/{checkpoint}")
    cmd = [sys.executable, "-m", "fedjax_code.cli", "train", "--out", str(out), "--quiet", *TINY, *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"


def test_killed_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    kill_after_checkpoint(out, "federated.rounds=4", "train.checkpoint_every=1")
    with pytest.raises(UserError, match="unfinished run"):
        train(tiny("train.checkpoint_every=1"), out, progress=False)
    train(tiny("train.checkpoint_every=1"), out, resume=True, progress=False)
    assert metrics(out) == metrics(uninterrupted)
    server_a, server_b = final_state(uninterrupted), final_state(out)
    for a, b in zip(jax.tree.leaves(server_a), jax.tree.leaves(server_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical


def test_load_trained_returns_the_final_params(uninterrupted):
    cfg, model, params, tokenizer, round_, trainable = load_trained(uninterrupted)
    assert cfg == tiny()
    assert round_ == 4 and model.vocab_size == len(tokenizer) == 512
    server = final_state(uninterrupted)
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(server.params), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))  # no adapters: what was trained is the model
    assert load_trained(uninterrupted, uninterrupted / "checkpoints" / "2")[4] == 2
    with pytest.raises(UserError, match="no checkpoint"):
        load_trained(uninterrupted, uninterrupted / "checkpoints" / "3")


def test_finished_runs_are_not_overwritten(uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="finished run"):
        train(tiny(), uninterrupted, progress=False)
    with pytest.raises(UserError, match="another configuration"):
        train(tiny("federated.rounds=6"), uninterrupted, resume=True, progress=False)
    assert (uninterrupted / "metrics.jsonl").read_bytes() == before


def test_divergence_stops_with_one_sentence_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = subprocess.run([sys.executable, "-m", "fedjax_code.cli", "train", "--out", str(out), "--quiet", *TINY,
                           "train.checkpoint_every=1", "federated.client_lr=1e30"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "diverged at round" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "diverged at round 2" in proc.stderr and "last good checkpoint (round 1) is kept" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold", "fednova", "fedadam"])
def test_every_algorithm_trains(tmp_path, algorithm):
    summary = train(tiny(f"federated.algorithm={algorithm}", "federated.rounds=2", "federated.server_lr=0.01"
                         if algorithm == "fedadam" else "federated.server_lr=1.0",
                         "federated.local_steps_mode=random"), tmp_path / algorithm, progress=False)
    assert np.isfinite(summary.eval_loss) and summary.rounds == 2


def test_resume_rebuilds_a_deleted_cache_and_refuses_changed_data(tmp_path, monkeypatch):
    """The issue's case: local-python data, then a package install changes the corpus under an unfinished run."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDJAX_CODE_CACHE", str(cache))
    cfg, out = tiny("data.source=local-python", "federated.rounds=2"), tmp_path / "run"
    train(cfg, out, progress=False)
    recorded = read_config(out)[1]
    (out / "summary.json").unlink()  # as if killed after its last checkpoint
    shutil.rmtree(cache)
    train(cfg, out, resume=True, progress=False)  # re-prepared from the same sources: the same bytes
    assert (out / "summary.json").is_file() and read_config(out)[1] == recorded
    (out / "summary.json").unlink()
    package = Path(sysconfig.get_paths()["purelib"]) / f"fedjax_code_fake_install_{tmp_path.name}"
    try:
        package.mkdir()
        (package / "__init__.py").write_text("def installed(x):\n    return x + 1\n" * 20)
        with pytest.raises(UserError, match=f"trained on tokens {recorded.tokens_sha256} .* but the data prepared "
                                            "now is tokens (?!" + recorded.tokens_sha256 + ")"):
            train(cfg, out, resume=True, progress=False)
    finally:
        shutil.rmtree(package, ignore_errors=True)
    assert not (out / "summary.json").exists()


def test_completion_only_loss(tmp_path):
    """data.loss_on = completion: each cohort batch carries its windows' loss mask, the loss counts the masked
    targets only, and the run trains."""
    from fedjax_code.experiments.run import Simulation
    from fedjax_code.models import logits, loss_fn

    cfg = tiny("data.unit=function", "data.loss_on=completion", "federated.rounds=2")
    sim = Simulation(cfg, progress=False)
    tokens, mask = sim.cohort(0).batches
    assert tokens.shape == mask.shape and 0 < float(mask.mean()) < 1
    server = sim.init_server()
    rows = np.asarray(mask).reshape(-1, *mask.shape[-2:])[..., 1:].mean(axis=(1, 2))
    i = int(np.argmin(np.where(rows > 0, rows, 2)))  # the batch with the most prompt tokens among its targets
    window, window_mask = tokens.reshape(-1, *tokens.shape[-2:])[i], mask.reshape(-1, *mask.shape[-2:])[i]
    masked = float(sim.loss(sim.base)(server.params, (window, window_mask)))
    logp = jax.nn.log_softmax(logits(sim.model, server.params, window[:, :-1]))
    target_logp = np.take_along_axis(np.asarray(logp), np.asarray(window[:, 1:])[..., None], -1)[..., 0]
    weights = np.asarray(window_mask[:, 1:], np.float64)
    np.testing.assert_allclose(masked, -(target_logp * weights).sum() / weights.sum(), rtol=1e-5)
    assert abs(masked - float(loss_fn(server.params, sim.model, window))) > 1e-3
    summary = train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(summary.eval_loss) and summary.rounds == 2
