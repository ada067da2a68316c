"""``fedjax-code train``: one federated run with metrics, checkpoints, resume and divergence checks.

It writes a self-contained run directory (see ``fedjax_code.rundir``): config.json with the hashes of the
data, the tokenizer, metrics.jsonl, checkpoints/ and, when finished, summary.json. A resumed run hashes
the data it is about to train on and refuses to go on if it differs from what the run started with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fedjax_code import federated as fl
from fedjax_code import rundir
from fedjax_code.checkpoint import Checkpointer
from fedjax_code.config import ExperimentConfig
from fedjax_code.errors import UserError
from fedjax_code.eval.heldout import client_losses_fn, evaluate_clients, fairness
from fedjax_code.experiments import components
from fedjax_code.experiments.messenger import Messenger
from fedjax_code.models import lora, loss_fn, model_info
from fedjax_code.records import RoundRecord, RunSummary, read_json, read_jsonl, to_dict, write_json

EVAL_CHUNK_WINDOWS = 32  # held-out windows evaluated per jitted call
INITIAL_EVAL = "initial_eval.json"  # the held-out evaluation before round 1
PERSONAL_FIELDS = [f.name for f in dataclasses.fields(RoundRecord) if f.name.startswith("personal_")]


def _open_run_dir(out: Path, cfg: ExperimentConfig, resume: bool, force: bool) -> None:
    state = rundir.state(out)
    if state != "empty" and force:
        shutil.rmtree(out)
    elif state == "finished" and not resume:
        raise UserError(f"{out} holds a finished run; pass --force to overwrite it or choose another --out")
    elif state == "unfinished" and not resume:
        raise UserError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
    elif state != "empty" and rundir.read_config(out)[0] != cfg:
        raise UserError(f"{out} was started with another configuration; resume it with the same config")
    out.mkdir(parents=True, exist_ok=True)


def _record_data(out: Path, cfg: ExperimentConfig, data: components.ClientData, base: dict | None) -> None:
    """Write config.json (with the frozen ``base``'s reference, if any) and the tokenizer on a fresh run; on a
    resumed one, check the data is the same."""
    if (out / "config.json").is_file():
        rundir.check_same_data(out, rundir.read_config(out)[1], data.provenance)
    else:
        rundir.write_config(out, cfg, data.provenance, base)
    rundir.save_tokenizer(out, data.tokenizer_dir)


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Keep the rows up to ``last_round`` (those after the checkpoint are recomputed on resume)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] <= last_round]
        path.write_text("".join(r + "\n" for r in rows))


class Simulation:
    """Everything fixed for a run: shards, model (a frozen base and the trainable tree), jitted round and
    evaluation, device placement.

    The algorithms see only the trainable tree (all params, or a LoRA run's adapters): their ``loss_fn`` joins
    it to the frozen base, which the jitted round takes as an argument shared by every client (never stacked,
    copied per client or sent)."""

    def __init__(self, cfg: ExperimentConfig, progress: bool):
        self.cfg, f = cfg, cfg.federated
        pre = components.pretrained(cfg)
        self.data = components.client_data(cfg, progress, pre)
        self.shards, self.examples = self.data.shards, self.data.examples
        setup = components.run_model(cfg, self.data.provenance.vocab_size, pre)
        self.model, self.trainable = setup.config, setup.trainable
        self.messenger = Messenger(cfg, self.model, self.data.provenance.vocab_size) \
            if fl.algorithm_spec(f.algorithm).needs_models else None
        self.base_ref = {"source": cfg.model.pretrained or "random", "sha256": components.params_sha256(setup.base)} \
            if setup.base else None
        self.num_clients = self.shards.num_clients
        self.mesh = fl.make_mesh()
        self.base = self.place(setup.base)
        cohort = fl.cohort_size(self.num_clients, f.participation)
        padded = cohort + -cohort % self.mesh.size
        self.parallel = components.parallel_clients(f, padded, self.mesh.size, jax.devices()[0].platform)
        self.algorithm = fl.build_algorithm(f, self.loss(self.base), self.parallel, self.models(self.base))
        self.round_fn = jax.jit(self._round, donate_argnums=(1, 2))
        self.stateful = self.algorithm.init_client is not None  # per-client state, kept in a ClientStore
        self.eval_fn = client_losses_fn(lambda p, batch: loss_fn(p, self.global_model, batch))
        self.personal_eval_fn = jax.jit(self._personal_losses)
        windows = cfg.train.eval_windows
        self.heldout = np.stack([self.shards.heldout(c, f.seq_len, windows) for c in range(self.num_clients)])
        self.heldout_tokens = self.shards.bounds[:, 2] - self.shards.bounds[:, 1]
        self.eval_chunk = max(1, EVAL_CHUNK_WINDOWS // windows)

    def loss(self, base):
        """loss(trainable, batch) of the model ``lora.join(base, trainable)``; a batch is token windows [B, T+1],
        or (windows, their loss mask) when the data trains on completions only (``data.loss_on``)."""
        def loss(trainable, batch):
            tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
            return loss_fn(lora.join(base, trainable), self.model, tokens, None if mask is None else mask[..., 1:])

        return loss

    @property
    def global_model(self):
        """The config of the server's model: the run's model, or the messenger at its current size."""
        return self.messenger.config if self.messenger else self.model

    def models(self, base) -> fl.Models | None:
        """The two models the messengers are built from (None for the other algorithms)."""
        return self.messenger.models(base) if self.messenger else None

    def _round(self, base, server, rows, fresh, cohort):
        """One round (jitted with the server state and the cohort's rows donated); ``base`` is a traced argument,
        so the compiled program holds no copy of it. ``rows`` (the cohort's per-client state, or None) come from
        the client store; ``fresh`` marks the clients with nothing stored yet."""
        algorithm = fl.build_algorithm(self.cfg.federated, self.loss(base), self.parallel, self.models(base))
        if self.stateful:
            rows = fl.with_fresh(algorithm, server, rows, fresh, cohort.ids)
        return algorithm.round(server, rows, cohort)

    def init_server(self):
        return self.algorithm.init_server(self.messenger.init() if self.messenger else self.trainable,
                                          self.num_clients)

    def client_store(self, out: Path, server) -> fl.ClientStore | None:
        """The run's per-client state on the host (``out/client_state``), or None for a stateless algorithm."""
        if not self.stateful:
            return None
        row = jax.eval_shape(self.algorithm.init_client, server, jnp.int32(0))
        return fl.ClientStore(out / "client_state", row, self.num_clients)

    def run_round(self, server, store: fl.ClientStore | None, round_: int, cohort: fl.Cohort):
        """One round: the cohort's rows gathered from ``store``, trained on the device, scattered back."""
        rows = fresh = None
        if store is not None:
            rows, fresh = (fl.shard_rows(x, self.mesh) for x in store.gather(cohort.ids))
        server, rows, metrics = self.round_fn(self.base, server, rows, fresh, cohort)
        if store is not None:
            store.scatter(round_ + 1, cohort.ids, jax.device_get(rows), cohort.mask)
        return server, jax.device_get(metrics)

    def place(self, tree):
        return fl.replicate(tree, self.mesh)

    def cohort(self, round_: int) -> fl.Cohort:
        f, k = self.cfg.federated, self.num_clients
        ids, mask = fl.sample_cohort(self.cfg.seed, round_, k, f.participation, self.examples,
                                     f.weighted_sampling, f.dropout)
        steps = fl.local_steps(self.cfg.seed, round_, ids, f.local_steps, f.local_steps_mode, self.examples)
        ids = np.asarray(ids)
        batches = jnp.asarray(self.shards.sample(ids, round_, f.local_steps, f.batch_size, f.seq_len))
        if self.shards.loss_mask is not None:
            loss_mask = self.shards.sample(ids, round_, f.local_steps, f.batch_size, f.seq_len, self.shards.loss_mask)
            batches = (batches, jnp.asarray(loss_mask, jnp.uint8))
        weights = fl.client_weights(self.examples[ids], f.weighting)
        cohort = fl.Cohort(jnp.asarray(ids), mask, weights, batches, steps)
        return fl.shard_cohort(fl.pad_cohort(cohort, self.mesh.size), self.mesh)

    def evaluate(self, trainable) -> dict:
        """The server's model on every client's held-out split (`fairness`)."""
        params = trainable if self.messenger else lora.join(self.base, trainable)
        losses = evaluate_clients(params, self.heldout, self.eval_fn, self.eval_chunk)
        return fairness(losses, self.heldout_tokens)

    def _personal_losses(self, base, server, rows, fresh, ids, windows):
        """Held-out loss [n] of clients ``ids``' personal models, each on its own ``windows``."""
        rows = fl.with_fresh(self.algorithm, server, rows, fresh, ids)
        personal = jax.vmap(self.algorithm.personal, in_axes=(None, 0))(server, rows)
        return jax.vmap(lambda p, w: loss_fn(lora.join(base, p), self.model, w))(personal, windows)

    def grow_messenger(self, server, eval_loss: float):
        """``server``, with its messenger grown one ladder step if the growth rule says so after this evaluation."""
        grown = self.messenger.after_eval(server.params, eval_loss) if self.messenger else None
        if grown is None:
            return server
        return self.place(self.algorithm.init_server(grown, self.num_clients).replace(round=server.round))

    def evaluate_personal(self, server, store: fl.ClientStore | None) -> dict:
        """Every client's personal model on its own held-out split (a client that has not trained yet: the model
        it would start from), summarised as `evaluate` does, with personal_ names; {} without personal models."""
        if store is None or self.algorithm.personal is None:
            return {}
        losses = []
        for start in range(0, self.num_clients, self.eval_chunk):
            ids = np.arange(start, start + self.eval_chunk) % self.num_clients  # the last chunk wraps: one compile
            rows, fresh = store.gather(ids)
            losses.append(np.asarray(self.personal_eval_fn(self.base, server, rows, fresh, ids, self.heldout[ids])))
        summary = fairness(np.concatenate(losses)[: self.num_clients], self.heldout_tokens)
        return {f"personal_{k}": v for k, v in summary.items()}


def _round_record(sim: Simulation, round_: int, cohort: fl.Cohort, metrics: dict, wall: float, model_bytes: int,
                  tokens_seen: int, first_in_process: bool) -> RoundRecord:
    f = sim.cfg.federated
    mask = np.asarray(cohort.mask)
    active_steps = int((np.asarray(cohort.step_mask) & mask[:, None]).sum())
    tokens = active_steps * f.batch_size * f.seq_len
    selected = fl.cohort_size(sim.num_clients, f.participation)
    up, down = fl.communicated_bytes(f.algorithm, model_bytes, selected, int(mask.sum()))
    return RoundRecord(round=round_ + 1, train_loss=float(metrics["train_loss"]), tokens=tokens,
                       tokens_seen=tokens_seen + tokens, wall_s=round(wall, 4), tokens_per_s=round(tokens / wall, 1),
                       includes_compile=first_in_process, bytes_up=up, bytes_down=down,
                       participants=int(metrics["participants"]), mean_tau=float(metrics["mean_tau"]),
                       messenger_scale=sim.messenger.factor if sim.messenger else None)


def train(cfg: ExperimentConfig, out: Path, resume: bool = False, force: bool = False,
          progress: bool = True) -> RunSummary:
    """Run (or resume) the federated training that ``cfg`` describes in ``out``; returns the summary."""
    out = Path(out)
    _open_run_dir(out, cfg, resume, force)
    if (out / "summary.json").is_file():
        return read_json(RunSummary, out / "summary.json")
    sim = Simulation(cfg, progress)
    if sim.base_ref:
        rundir.check_same_base(out, sim.base_ref["sha256"])
    _record_data(out, cfg, sim.data, sim.base_ref)
    ckpt = Checkpointer(out / "checkpoints")
    start = ckpt.latest_round() or 0
    if start and sim.messenger:
        sim.messenger.restore(ckpt.meta(start))  # its size at the checkpoint
    server = sim.init_server()
    if start:
        server, _ = ckpt.restore(start, server)
    elif not (out / INITIAL_EVAL).is_file():  # the model before any round: a pretrained model's own loss
        write_json(out / INITIAL_EVAL, sim.evaluate(server.params))
    store = sim.client_store(out, server)
    if store is not None:
        store.rollback(start)  # undo the rows of rounds after the checkpoint
    _truncate_metrics(out / "metrics.jsonl", start)
    _run_rounds(sim, out, ckpt, sim.place(server), store, start, progress)
    ckpt.close()
    summary = _summary(sim, out)
    write_json(out / "summary.json", summary)
    return summary


def _run_rounds(sim: Simulation, out: Path, ckpt: Checkpointer, server, store: fl.ClientStore | None, start: int,
                progress: bool) -> None:
    """Rounds ``start`` .. ``rounds - 1``: one metrics.jsonl line each, evaluations and checkpoints on cadence."""
    f, t = sim.cfg.federated, sim.cfg.train
    done = read_jsonl(RoundRecord, out / "metrics.jsonl")
    tokens_seen = done[-1].tokens_seen if done else 0
    bar = tqdm(range(start, f.rounds), initial=start, total=f.rounds, desc="rounds", disable=None if progress else True,
               file=sys.stderr)
    with open(out / "metrics.jsonl", "a") as log:
        for r in bar:
            cohort = sim.cohort(r)
            began = time.perf_counter()
            server, metrics = sim.run_round(server, store, r, cohort)
            record = _round_record(sim, r, cohort, metrics, time.perf_counter() - began,
                                   fl.message_bytes(f, server.params), tokens_seen, r == start)
            _check_finite(record, ckpt, out)
            if (r + 1) % t.eval_every == 0 or r + 1 == f.rounds:
                record = dataclasses.replace(record, **sim.evaluate(server.params),
                                             **sim.evaluate_personal(server, store))
                server = sim.grow_messenger(server, record.eval_loss)
            log.write(json.dumps(to_dict(record)) + "\n")
            log.flush()
            tokens_seen = record.tokens_seen
            bar.set_postfix(loss=f"{record.train_loss:.3f}")
            if (r + 1) % t.checkpoint_every == 0 or r + 1 == f.rounds:
                ckpt.save(r + 1, server, {"round": r + 1, **(sim.messenger.state() if sim.messenger else {})})
                if store is not None:
                    store.commit(r + 1)


def _check_finite(record: RoundRecord, ckpt: Checkpointer, out: Path) -> None:
    if not math.isfinite(record.train_loss):
        last = ckpt.latest_round()
        kept = f"the last good checkpoint (round {last}) is kept" if last else "no checkpoint was saved yet"
        raise UserError(f"training diverged at round {record.round} (train_loss={record.train_loss}); {kept} in {out}; "
                        "lower federated.client_lr or federated.server_lr")


def _summary(sim: Simulation, out: Path) -> RunSummary:
    rows = read_jsonl(RoundRecord, out / "metrics.jsonl")
    last_eval = next(r for r in reversed(rows) if r.eval_loss is not None)
    timed = [r for r in rows if not r.includes_compile] or rows  # compile time is not throughput
    return RunSummary(
        rounds=rows[-1].round, final_train_loss=rows[-1].train_loss, eval_loss=last_eval.eval_loss,
        initial_eval_loss=json.loads((out / INITIAL_EVAL).read_text())["eval_loss"] if (out / INITIAL_EVAL).is_file()
        else None,
        client_eval_loss_mean=last_eval.client_eval_loss_mean,
        client_eval_loss_worst10=last_eval.client_eval_loss_worst10,
        client_eval_loss_std=last_eval.client_eval_loss_std, tokens_seen=rows[-1].tokens_seen,
        **{k: getattr(last_eval, k) for k in PERSONAL_FIELDS},
        train_wall_s=round(sum(r.wall_s for r in rows), 3),
        train_tokens_per_s=round(sum(r.tokens for r in timed) / sum(r.wall_s for r in timed), 1),
        comm_mb=round(sum(r.bytes_up + r.bytes_down for r in rows) / 1e6, 3), num_clients=sim.num_clients,
        devices=sim.mesh.size, model=model_info(sim.model), config=sim.cfg.to_dict(),
        data=dataclasses.asdict(sim.data.provenance))
