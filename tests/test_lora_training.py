"""Federated LoRA: the round over stacked adapters equals a loop over clients for every algorithm, the frozen
base is shared (the round's memory grows with the cohort by adapters, not by the model), and a LoRA run on a
pretrained model checkpoints only its adapters, resumes bit-identically after kill -9 and exports to
transformers and PEFT."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedjax_code import federated as fl
from fedjax_code.checkpoint import Checkpointer
from fedjax_code.config import FederatedConfig
from fedjax_code.errors import UserError
from fedjax_code.experiments import components
from fedjax_code.experiments.run import Simulation, train
from fedjax_code.models import ModelConfig, Pretrained, init_params, logits, loss_fn, lora, num_params
from fedjax_code.models.pretrained import save_own
from fedjax_code.rundir import load_trained
from tests.test_federated import close, equal
from tests.test_train import TINY, kill_after_checkpoint, metrics, tiny

BASE = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "down"))


def tiny_model():
    """(base params, adapters with a random lora_b, so that they act)."""
    base = init_params(BASE, jax.random.PRNGKey(0))
    _, adapters = lora.split(init_params(LORA, jax.random.PRNGKey(1)))
    return base, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)


def token_cohort(c=4, e=2, b=2, t=16, seed=0):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (c, e, b, t + 1), 0, BASE.vocab_size)
    return fl.Cohort(jnp.arange(c, dtype=jnp.int32), jnp.array([1, 1, 0, 1][:c], bool),
                     jnp.arange(1.0, c + 1), tokens, jnp.ones((c, e), bool).at[1, 1].set(False))


def lora_loss(base):
    return lambda adapters, batch: loss_fn(lora.join(base, adapters), LORA, batch)


def test_lora_round_equals_a_python_loop_over_clients():
    base, adapters = tiny_model()
    cohort, opt = token_cohort(), fl.client_optimizer("adamw", 0.01)
    alg = fl.fedavg(lora_loss(base), opt)
    state, _, _ = jax.jit(alg.apply)(*alg.init(adapters, 4), cohort)
    total, acc = 0.0, jax.tree.map(jnp.zeros_like, adapters)
    for i in (0, 1, 3):
        delta, _, _ = fl.client_update(adapters, cohort.batches[i], cohort.step_mask[i], opt, lora_loss(base))
        acc = jax.tree.map(lambda a, d: a + cohort.weights[i] * d, acc, delta)
        total += float(cohort.weights[i])
    close(state.params, jax.tree.map(lambda p, a: p + a / total, adapters, acc), atol=1e-6)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)  # only adapters are trained


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold", "fednova", "fedadam", "ditto", "fedrep", "pfedme"])
def test_every_algorithm_runs_on_adapters_and_its_vmap_equals_a_loop(algorithm):
    """All clients in one vmap, or one after another (lax.map, the Flower way): the same round."""
    base, adapters = tiny_model()
    f = FederatedConfig(algorithm=algorithm, client_lr=0.05, server_lr=0.01 if algorithm == "fedadam" else 1.0)
    rounds = []
    for parallel in (None, 1):
        alg = fl.build_algorithm(f, lora_loss(base), parallel)
        state, clients = alg.init(adapters, 6)
        for r in range(2):
            state, clients, m = jax.jit(alg.apply)(state, clients, token_cohort(seed=r))
        rounds.append((state.params, clients, m))
    close(rounds[0], rounds[1], rtol=2e-5, atol=1e-6)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(rounds[0][0]), jax.tree.leaves(adapters))]
    assert max(moved) > 1e-4


def round_memory(trainable, base, loss, c):
    """Bytes XLA assigns to one jitted FedAvg round over ``c`` clients of batch 1 x 4 tokens (arguments, outputs
    and temporaries, less donated aliases); ``loss(base, trainable, batch)``, the base an argument of the round."""
    make = lambda b: fl.fedavg(lambda p, x: loss(b, p, x), fl.client_optimizer("sgd", 0.1))
    state, clients = make(base).init(trainable, c)
    run = jax.jit(lambda b, s, cs, co: make(b).apply(s, cs, co), donate_argnums=(1, 2))
    cohort = token_cohort(c=c, b=1, t=4)._replace(mask=jnp.ones(c, bool), step_mask=jnp.ones((c, 2), bool))
    m = run.lower(base, state, clients, cohort).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def test_the_base_is_shared_memory_grows_by_adapters_not_by_the_model():
    """With a base much larger than the activations, each client beyond the first costs a small fraction of
    the base under LoRA (its activations and adapter-sized deltas), and more than a whole model under full
    fine-tuning (a model-sized delta)."""
    wide = dataclasses.replace(BASE, d_model=256, d_ff=512)
    adapted = dataclasses.replace(wide, **{k: getattr(LORA, k) for k in ("lora_rank", "lora_alpha", "lora_targets")})
    base, adapters = lora.split(init_params(adapted, jax.random.PRNGKey(0)))
    lora_round = lambda c: round_memory(adapters, base, lambda b, a, x: loss_fn(lora.join(b, a), adapted, x), c)
    full_round = lambda c: round_memory(base, {}, lambda b, p, x: loss_fn(p, wide, x), c)
    base_bytes = num_params(base) * 4
    assert (full_round(16) - full_round(1)) / 15 > base_bytes
    assert (lora_round(16) - lora_round(1)) / 15 < base_bytes / 10


# ----------------------------------------------------------------------------- a LoRA run on a pretrained model

LORA_RUN = ["model.lora_rank=4", "model.lora_targets=['q','v','up']", "federated.client_optimizer=adamw",
            "federated.client_lr=0.01"]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A random cpu-0.25 model with the tiny runs' tokenizer, saved in the project's own format."""
    from fedjax_code.data.prepare import load_prepared, prepare

    tokenizer = load_prepared(prepare(tiny().data, progress=False))[1]
    config = components.model_config(tiny(), len(tokenizer))
    params = init_params(config, jax.random.PRNGKey(7))
    return save_own(Pretrained(config, params, tokenizer, "tiny"), tmp_path_factory.mktemp("pre") / "tiny")


def lora_cfg(pretrained_dir, *extra):
    return tiny(f"model.pretrained={pretrained_dir}", *LORA_RUN, *extra)


@pytest.fixture(scope="module")
def lora_run(pretrained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    train(lora_cfg(pretrained_dir), out, progress=False)
    return out


def checkpointed(run_dir, cfg):
    ckpt = Checkpointer(run_dir / "checkpoints")
    return ckpt.restore(ckpt.latest_round(), Simulation(cfg, progress=False).init_server())[0]


def test_a_lora_run_trains_sends_and_checkpoints_only_its_adapters(pretrained_dir, lora_run):
    from fedjax_code.models.pretrained import load_pretrained

    pre = load_pretrained(pretrained_dir)
    rows = metrics(lora_run)
    server = checkpointed(lora_run, lora_cfg(pretrained_dir))
    paths = traverse_util.flatten_dict(server.params)
    assert {p[-1] for p in paths} == {"lora_a", "lora_b"} and {p[-2] for p in paths} == {"q_proj", "v_proj", "up_proj"}
    adapter_bytes = num_params(server.params) * 4
    assert adapter_bytes < num_params(pre.params) * 4 / 20
    assert all(r["bytes_down"] == 4 * adapter_bytes for r in rows)  # 4 clients selected, adapters only
    assert rows[-1]["eval_loss"] < rows[1]["eval_loss"]  # it learns
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["initial_eval_loss"] > rows[-1]["eval_loss"]  # the pretrained model before round 1
    base = json.loads((lora_run / "config.json").read_text())["base"]
    assert base == {"source": str(pretrained_dir), "sha256": components.params_sha256(pre.params)}
    run = load_trained(lora_run)
    assert run.model.lora_rank == 0 and run.trainable.keys() == server.params.keys()
    frozen = traverse_util.flatten_dict(pre.params)
    merged = traverse_util.flatten_dict(run.params)
    for path, value in frozen.items():
        adapted = path[-2] in ("q_proj", "v_proj", "up_proj") and path[-1] == "kernel"
        assert np.array_equal(np.asarray(merged[path]), np.asarray(value)) != adapted, path
    tokens = np.arange(1, 17)[None]
    unmerged = logits(components.model_config(lora_cfg(pretrained_dir), 0, pre.config),
                      lora.join(pre.params, run.trainable), tokens)
    close(logits(run.model, run.params, tokens), unmerged, atol=1e-4)


def test_a_killed_lora_run_resumes_bit_identical(pretrained_dir, lora_run, tmp_path):
    out = tmp_path / "killed"
    kill_after_checkpoint(out, f"model.pretrained={pretrained_dir}", *LORA_RUN, "train.checkpoint_every=1")
    cfg = lora_cfg(pretrained_dir, "train.checkpoint_every=1")
    train(cfg, out, resume=True, progress=False)
    assert metrics(out) == metrics(lora_run)
    equal(checkpointed(out, cfg).params, checkpointed(lora_run, cfg).params)


def test_messengers_with_private_lora_adapters(pretrained_dir, tmp_path):
    """On a pretrained base, each client's private model is LoRA adapters (stored per client, never sent) and the
    messenger a small decoder of its own that is sent and evaluated."""
    from fedjax_code.rundir import load_personal, load_trained

    cfg = lora_cfg(pretrained_dir, "federated.algorithm=messengers", "model.base=cpu-1", "federated.rounds=2")
    train(cfg, tmp_path / "run", progress=False)
    adapters = Simulation(cfg, progress=False).trainable
    store = sorted(p.name for p in (tmp_path / "run" / "client_state").glob("leaf*.bin"))
    assert len(store) == len(jax.tree.leaves(adapters))  # a private row is the adapters
    messenger = load_trained(tmp_path / "run")
    assert messenger.model.d_model == 32 and messenger.model.lora_rank == 0  # cpu-1 at 0.25
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["bytes_down"] == 4 * 4 * sum(x.size for x in jax.tree.leaves(messenger.params))  # 4 clients, fp32
    model, personal = load_personal(tmp_path / "run", [0, 1])
    assert model.lora_rank == 0 and len(personal) == 2  # merged private models on the pretrained base


def test_export_merged_and_peft_adapters_load_in_transformers(pretrained_dir, lora_run, tmp_path):
    import peft
    import torch
    import transformers

    from tests.test_pretrained import cli

    run = load_trained(lora_run)
    tokens = np.array([run.tokenizer.encode("def f(x):\n    return x\n")])
    ours = np.asarray(logits(run.model, run.params, tokens))
    for args in (["model", "export", lora_run, "--out", tmp_path / "merged"],
                 ["model", "export", pretrained_dir, "--out", tmp_path / "base"],
                 ["model", "export", lora_run, "--adapters", "--out", tmp_path / "peft"]):
        code, _, err = cli(*args)
        assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        for model in (merged, adapted):
            assert np.abs(model(input_ids=torch.tensor(tokens)).logits.numpy() - ours).max() <= 1e-4
        with adapted.disable_adapter():  # the base alone: the adapters act
            assert np.abs(adapted(input_ids=torch.tensor(tokens)).logits.numpy() - ours).max() > 1e-3
    code, _, err = cli("model", "export", pretrained_dir, "--adapters", "--out", tmp_path / "no")
    assert code == 2 and "needs a run directory that trained LoRA adapters" in err


@pytest.mark.parametrize("override, sentence", [
    ("model.lora_targets=['q','attn']", "model.lora_targets must name some of q, k, v, o, gate, up, down"),
    ("model.lora_rank=1000", "lora_rank 1000 exceeds the width"),
])
def test_bad_lora_settings_get_one_sentence(pretrained_dir, tmp_path, override, sentence):
    proc = subprocess.run([sys.executable, "-m", "fedjax_code.cli", "train", "--out", str(tmp_path / "r"), "--quiet",
                           *TINY, f"model.pretrained={pretrained_dir}", *LORA_RUN, override],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and sentence in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_tokenizer_or_base_that_disagrees_is_refused(pretrained_dir, lora_run, prepared, tmp_path):
    with pytest.raises(UserError, match="is not the tokenizer of the pretrained model"):
        train(lora_cfg(pretrained_dir, f"data.tokenizer={prepared / 'tokenizer'}"), tmp_path / "t", progress=False)
    from fedjax_code.models.pretrained import load_pretrained

    pre = load_pretrained(pretrained_dir)
    other = save_own(pre._replace(params=jax.tree.map(lambda x: x * 1.01, pre.params)), tmp_path / "other")
    run = tmp_path / "run"
    train(lora_cfg(other, "federated.rounds=2"), run, progress=False)
    (run / "summary.json").unlink()
    save_own(pre, tmp_path / "fresh")
    (tmp_path / "other" / "params.safetensors").write_bytes((tmp_path / "fresh" / "params.safetensors").read_bytes())
    with pytest.raises(UserError, match="restore the original weights"):
        train(lora_cfg(other, "federated.rounds=2"), run, resume=True, progress=False)
