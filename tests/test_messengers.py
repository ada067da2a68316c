"""Knowledge messengers: mutual distillation against a loop written from the two separate objectives, the growth rule,
and a run whose messenger grows (same function, bytes that follow its size, bit-identical resume)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_code import federated as fl
from tests.test_federated import close

V, D = 5, 3


def toy_logits(params, tokens):
    """A bigram model: logits = onehot(token) @ W."""
    return jax.nn.one_hot(tokens, V) @ params["w"]


def toy_cohort(c=3, e=2, seed=0):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (c, e, 4, 7), 0, V)
    return fl.Cohort(jnp.array([0, 3, 1][:c], jnp.int32), jnp.array([1, 1, 0][:c], bool),
                     jnp.array([1.0, 2.0, 3.0][:c]), tokens, jnp.ones((c, e), bool))


def init_private(key):
    return {"w": jax.random.normal(key, (V, V))}


def loop_round(messenger, privates, cohort, lr, alpha):
    """One round client by client, each model stepping on its own objective: CE + alpha KL(other || self)."""
    def ce(logits, targets):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]

    def kl(target_logits, logits):
        t = jax.nn.log_softmax(target_logits)
        return jnp.sum(jnp.exp(t) * (t - jax.nn.log_softmax(logits)), -1)

    def own(params, other, tokens):
        x, y = tokens[:, :-1], tokens[:, 1:]
        return jnp.mean(ce(toy_logits(params, x), y) + alpha * kl(toy_logits(other, x), toy_logits(params, x)))

    deltas, new_privates = [], dict(privates)
    for i in range(cohort.ids.shape[0]):
        p, m = privates[int(cohort.ids[i])], messenger
        for step in range(cohort.batches.shape[1]):
            tokens = cohort.batches[i, step]
            gp, gm = jax.grad(own)(p, m, tokens), jax.grad(own)(m, p, tokens)
            p, m = jax.tree.map(lambda a, g: a - lr * g, p, gp), jax.tree.map(lambda a, g: a - lr * g, m, gm)
        if cohort.mask[i]:
            new_privates[int(cohort.ids[i])] = p
            deltas.append((float(cohort.weights[i]), jax.tree.map(jnp.subtract, m, messenger)))
    total = sum(w for w, _ in deltas)
    mean = jax.tree.map(lambda *d: sum(w * x for (w, _), x in zip(deltas, d)) / total, *[d for _, d in deltas])
    return jax.tree.map(jnp.add, messenger, mean), new_privates


def test_mutual_distillation_round_equals_a_loop_over_the_two_objectives():
    lr, alpha, seed = 0.3, 0.7, 5
    alg = fl.messengers(toy_logits, toy_logits, init_private, fl.client_optimizer("sgd", lr), alpha, seed)
    messenger = {"w": jax.random.normal(jax.random.PRNGKey(9), (V, V))}
    server, states = alg.init(messenger, 4)
    privates = {i: init_private(jax.random.fold_in(jax.random.PRNGKey(seed), i)) for i in range(4)}
    for r in range(2):
        cohort = toy_cohort(seed=r)
        server, states, _ = jax.jit(alg.apply)(server, states, cohort)
        messenger, privates = loop_round(messenger, privates, cohort, lr, alpha)
    close(server.params, messenger, rtol=1e-5, atol=1e-6)
    rows, written = states
    for i in np.flatnonzero(np.asarray(written)):
        close(jax.tree.map(lambda x: x[i], rows), privates[i], rtol=1e-5, atol=1e-6)
    assert np.asarray(written).tolist() == [True, False, False, True]  # client 1 was only ever masked


def test_distillation_pulls_the_pair_together():
    """alpha > 0 moves the private model toward the messenger's predictions compared to alpha = 0."""
    messenger, cohort = {"w": 3 * jax.random.normal(jax.random.PRNGKey(1), (V, V))}, toy_cohort()
    gaps = []
    for alpha in (0.0, 5.0):
        alg = fl.messengers(toy_logits, toy_logits, init_private, optax.sgd(0.5), alpha)
        server, (rows, _), _ = alg.apply(*alg.init(messenger, 4), cohort)
        p, m = jax.tree.map(lambda x: x[0], rows), server.params
        gaps.append(float(jnp.abs(jax.nn.softmax(p["w"]) - jax.nn.softmax(m["w"])).sum()))
    assert gaps[1] < gaps[0]


def test_plateau_rule():
    rule, grown = fl.Plateau(), []
    for loss in (5.0, 4.0, 3.99, 3.98, 3.0, 2.999):
        rule, now = rule.update(loss, patience=2)
        grown.append(now)
    assert grown == [False, False, False, True, False, False] and rule.best == 3.0


MESSENGERS = ("federated.algorithm=messengers", "model.base=cpu-1", "model.scale=0.5", "federated.messenger_patience=1",
              "federated.client_optimizer=adamw", "federated.client_lr=0.003", "federated.rounds=6")


def test_a_messenger_run_grows_sends_its_size_and_resumes_bit_identical(tmp_path):
    from fedjax_code.experiments.run import train
    from fedjax_code.rundir import load_trained
    from tests.test_train import kill_after_checkpoint, metrics, tiny

    train(tiny(*MESSENGERS), tmp_path / "a", progress=False)
    rows = metrics(tmp_path / "a")
    scales = [r["messenger_scale"] for r in rows]
    assert scales[0] == 0.25 and scales[-1] == 0.5 and scales == sorted(scales)  # it grew, up to the private size
    grew = scales.index(0.5)
    assert rows[grew]["bytes_down"] > 2 * rows[grew - 1]["bytes_down"]  # what is sent is the messenger, now bigger
    assert all("personal_eval_loss" in r for r in rows if "eval_loss" in r)
    run = load_trained(tmp_path / "a")
    assert run.model.d_model == 64 and run.model.n_layers == 3  # the messenger at 0.5 of cpu-1

    kill_after_checkpoint(tmp_path / "b", *MESSENGERS, checkpoint=4)
    train(tiny(*MESSENGERS), tmp_path / "b", resume=True, progress=False)
    assert metrics(tmp_path / "b") == rows
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(load_trained(tmp_path / "b").params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_humaneval_of_a_messenger_run_scores_the_messenger_and_times_the_private_model(tmp_path):
    """``nll`` and the samples are the messenger's; the private models (built at the run's scale, twice the
    messenger's) get their own canonical NLL and, being a different architecture, their own decode tokens/s."""
    from fedjax_code.config import EvalConfig
    from fedjax_code.eval.humaneval import evaluate_run, prompt_prefix, select_problems
    from fedjax_code.eval.metrics import canonical_nll
    from fedjax_code.experiments.run import train
    from fedjax_code.rundir import load_personal, load_trained
    from tests.test_train import tiny

    run = tmp_path / "static"
    train(tiny(*MESSENGERS[:-1], "federated.rounds=2", "federated.messenger_growth=none"), run, progress=False)
    cfg = EvalConfig(n=1, k=(1,), problems="0:1", nll_problems="0:2", max_new_tokens=4, workers=1)
    record = evaluate_run(run, tmp_path / "he", cfg, progress=False)
    messenger = load_trained(run)
    problems, prefix = select_problems("0:2"), prompt_prefix(messenger.tokenizer, False)
    assert record.nll == pytest.approx(canonical_nll(messenger.params, messenger.model, messenger.tokenizer,
                                                     problems, prefix=prefix)["nll"], rel=1e-6)
    private, _ = load_personal(run, [0])
    assert private.d_model == 2 * messenger.model.d_model
    assert record.personal_client is None and record.personal_nll is not None
    assert record.personal_decode_tokens_per_s > 0
