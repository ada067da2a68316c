"""``fedjax-code train``: one federated run with metrics, checkpoints, resume and divergence checks.

Writes to the run directory::

    config.json      the validated configuration
    metrics.jsonl    one JSON object per round (eval fields at eval rounds)
    checkpoints/     orbax checkpoints of the whole simulation state (last 2 kept)
    summary.json     written when the run finishes; its presence marks the run as finished
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_code import federated as fl
from fedjax_code.checkpoint import Checkpointer
from fedjax_code.config import ExperimentConfig, experiment_from_dict
from fedjax_code.errors import UserError
from fedjax_code.eval.heldout import client_losses_fn, evaluate_clients, fairness
from fedjax_code.experiments import components
from fedjax_code.models import init_params, loss_fn, model_info, num_params

EVAL_CHUNK_WINDOWS = 32  # held-out windows evaluated per jitted call


def _open_run_dir(out: Path, cfg: ExperimentConfig, resume: bool, force: bool) -> None:
    state = components.run_dir_state(out)
    if state != "empty" and force:
        shutil.rmtree(out)
    elif state == "finished" and not resume:
        raise UserError(f"{out} holds a finished run; pass --force to overwrite it or choose another --out")
    elif state == "unfinished" and not resume:
        raise UserError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
    elif state != "empty" and resume:
        saved = experiment_from_dict(json.loads((out / "config.json").read_text()))
        if saved != cfg:
            raise UserError(f"{out} was started with another configuration; resume it with the same config")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Keep the rows up to ``last_round`` (those after the checkpoint are recomputed on resume)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] <= last_round]
        path.write_text("".join(r + "\n" for r in rows))


class Simulation:
    """Everything fixed for a run: shards, model, jitted round and evaluation, device placement."""

    def __init__(self, cfg: ExperimentConfig, progress: bool):
        self.cfg, f = cfg, cfg.federated
        self.shards, self.examples, vocab = components.client_shards(cfg, progress)
        self.model = components.model_config(cfg, vocab)
        self.num_clients = self.shards.num_clients
        loss = lambda p, batch: loss_fn(p, self.model, batch)  # noqa: E731
        self.mesh = fl.make_mesh()
        cohort = fl.cohort_size(self.num_clients, f.participation)
        padded = cohort + -cohort % self.mesh.size
        self.parallel = components.parallel_clients(f, padded, self.mesh.size, jax.devices()[0].platform)
        self.algorithm = components.algorithm(f, loss, self.parallel)
        self.round_fn = fl.jit_round(self.algorithm)
        self.eval_fn = client_losses_fn(loss)
        windows = cfg.train.eval_windows
        self.heldout = np.stack([self.shards.heldout(c, f.seq_len, windows) for c in range(self.num_clients)])
        self.heldout_tokens = self.shards.bounds[:, 2] - self.shards.bounds[:, 1]
        self.eval_chunk = max(1, EVAL_CHUNK_WINDOWS // windows)

    def init_state(self):
        params = init_params(self.model, jax.random.PRNGKey(self.cfg.seed))
        return self.algorithm.init(params, self.num_clients)

    def place(self, tree):
        return fl.replicate(tree, self.mesh)

    def cohort(self, round_: int) -> fl.Cohort:
        f, k = self.cfg.federated, self.num_clients
        ids, mask = fl.sample_cohort(self.cfg.seed, round_, k, f.participation, self.examples,
                                     f.weighted_sampling, f.dropout)
        steps = fl.local_steps(self.cfg.seed, round_, ids, f.local_steps, f.local_steps_mode, self.examples)
        ids = np.asarray(ids)
        batches = self.shards.sample(ids, round_, f.local_steps, f.batch_size, f.seq_len)
        weights = fl.client_weights(self.examples[ids], f.weighting)
        cohort = fl.Cohort(jnp.asarray(ids), mask, weights, jnp.asarray(batches), steps)
        return fl.shard_cohort(fl.pad_cohort(cohort, self.mesh.size), self.mesh)

    def evaluate(self, params) -> dict:
        losses = evaluate_clients(params, self.heldout, self.eval_fn, self.eval_chunk)
        return fairness(losses, self.heldout_tokens)


def _round_row(sim: Simulation, round_: int, cohort: fl.Cohort, metrics: dict, wall: float, model_bytes: int) -> dict:
    f = sim.cfg.federated
    mask = np.asarray(cohort.mask)
    active_steps = int((np.asarray(cohort.step_mask) & mask[:, None]).sum())
    tokens = active_steps * f.batch_size * f.seq_len
    selected = fl.cohort_size(sim.num_clients, f.participation)
    up, down = components.communicated_bytes(f, model_bytes, selected, int(mask.sum()))
    return {"round": round_ + 1, "train_loss": float(metrics["train_loss"]), "tokens": tokens,
            "wall_s": round(wall, 4), "tokens_per_s": round(tokens / wall, 1), "bytes_up": up, "bytes_down": down,
            "participants": int(metrics["participants"]), "mean_tau": float(metrics["mean_tau"])}


def load_trained(run_dir: Path, checkpoint: Path | None = None):
    """(config, model config, global params, tokenizer, round) of a run's latest or a given checkpoint.

    ``checkpoint`` is a step directory such as ``RUN/checkpoints/10``.
    """
    from fedjax_code.data.prepare import prepare
    from fedjax_code.data.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no config.json)")
    cfg = experiment_from_dict(json.loads((run_dir / "config.json").read_text()))
    ckpt_dir = Path(checkpoint).parent if checkpoint else run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir)
    round_ = int(Path(checkpoint).name) if checkpoint and Path(checkpoint).name.isdigit() else ckpt.latest_round()
    if round_ is None or round_ not in ckpt.all_rounds():
        raise UserError(f"no checkpoint {'at ' + str(checkpoint) if checkpoint else 'in ' + str(ckpt_dir)}")
    sim = Simulation(cfg, progress=False)
    server, clients = sim.init_state()
    server, _, _ = ckpt.restore(round_, server, clients)
    ckpt.close()
    tokenizer = load_tokenizer(prepare(cfg.data, progress=False) / "tokenizer")
    return cfg, sim.model, server.params, tokenizer, round_


def train(cfg: ExperimentConfig, out: Path, resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the federated training that ``cfg`` describes in ``out``; returns the summary."""
    from tqdm.auto import tqdm

    out = Path(out)
    _open_run_dir(out, cfg, resume, force)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    sim = Simulation(cfg, progress)
    server, clients = sim.init_state()
    model_bytes = num_params(server.params) * 4
    ckpt = Checkpointer(out / "checkpoints")
    start = ckpt.latest_round() or 0
    if start:
        server, clients, _ = ckpt.restore(start, server, clients)
    _truncate_metrics(out / "metrics.jsonl", start)
    server, clients = sim.place((server, clients))
    f, t = cfg.federated, cfg.train
    tokens_seen = sum(json.loads(line)["tokens"] for line in (out / "metrics.jsonl").read_text().splitlines()) if start else 0
    bar = tqdm(range(start, f.rounds), initial=start, total=f.rounds, desc="rounds", disable=None if progress else True,
               file=sys.stderr)
    with open(out / "metrics.jsonl", "a") as log:
        for r in bar:
            first_in_process = r == start
            cohort = sim.cohort(r)
            began = time.perf_counter()
            server, clients, metrics = sim.round_fn(server, clients, cohort)
            metrics = jax.device_get(metrics)
            row = _round_row(sim, r, cohort, metrics, time.perf_counter() - began, model_bytes)
            if not math.isfinite(row["train_loss"]):
                last = ckpt.latest_round()
                kept = f"the last good checkpoint (round {last}) is kept" if last else "no checkpoint was saved yet"
                raise UserError(f"training diverged at round {r + 1} (train_loss={row['train_loss']}); {kept} in {out}; "
                                "lower federated.client_lr or federated.server_lr")
            tokens_seen += row["tokens"]
            row["tokens_seen"] = tokens_seen
            row["includes_compile"] = first_in_process
            if (r + 1) % t.eval_every == 0 or r + 1 == f.rounds:
                row.update(sim.evaluate(server.params))
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['train_loss']:.3f}")
            if (r + 1) % t.checkpoint_every == 0 or r + 1 == f.rounds:
                ckpt.save(r + 1, server, clients, {"round": r + 1, "config": cfg.to_dict()})
    ckpt.close()
    summary = _summary(cfg, sim, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _summary(cfg: ExperimentConfig, sim: Simulation, out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = next(r for r in reversed(rows) if "eval_loss" in r)
    timed = [r for r in rows if not r["includes_compile"]] or rows  # compile time is not throughput
    return {
        "rounds": rows[-1]["round"],
        "final_train_loss": rows[-1]["train_loss"],
        **{k: last_eval[k] for k in ("eval_loss", "client_eval_loss_mean", "client_eval_loss_worst10", "client_eval_loss_std")},
        "tokens_seen": rows[-1]["tokens_seen"],
        "train_wall_s": round(sum(r["wall_s"] for r in rows), 3),
        "train_tokens_per_s": round(sum(r["tokens"] for r in timed) / sum(r["wall_s"] for r in timed), 1),
        "comm_mb": round(sum(r["bytes_up"] + r["bytes_down"] for r in rows) / 1e6, 3),
        "num_clients": sim.num_clients,
        "devices": sim.mesh.size,
        "model": model_info(sim.model),
        "config": cfg.to_dict(),
    }
