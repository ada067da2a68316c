"""Personalised algorithms (Ditto, FedRep, pFedMe) and q-FFL: their limits, hand-computed rounds and loops."""

import jax
import jax.numpy as jnp
import pytest

from fedjax_code import federated as fl
from fedjax_code.federated.algorithms.fedrep import head_paths, join, split
from tests.test_federated import close, equal, linreg_cohort, linreg_loss, linreg_params, one_round, quad_cohort, \
    quad_loss

SGD = fl.client_optimizer("sgd", 0.1)
COHORT = dict(c=4, e=3, weights=[1, 2, 3, 4], mask=[1, 1, 0, 1], step_mask=[[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_ditto_global_model_is_fedavg_and_an_infinite_pull_keeps_personal_models_global():
    cohort = linreg_cohort(**COHORT)
    fedavg_state, _, _ = one_round(fl.fedavg(linreg_loss, SGD), linreg_params(), cohort, num_clients=6, rounds=2)
    ditto = fl.ditto(linreg_loss, SGD, lam=1e9, client_lr=0.1)
    server, states = ditto.init(linreg_params(), 6)
    for _ in range(2):
        start = server.params
        server, states, metrics = jax.jit(ditto.apply)(server, states, cohort)
    equal(server.params, fedavg_state.params)  # the global update is FedAvg's, bit for bit
    personal, written = states
    assert written.tolist() == [True, True, False, True, False, False]
    for i in (0, 1, 3):  # each trained client's personal model is the round's starting global model
        close(jax.tree.map(lambda x: x[i], personal), start, rtol=1e-6, atol=1e-6)
    assert "personal_train_loss" in metrics


def test_ditto_with_no_pull_trains_personal_models_locally():
    """lam -> 0: a personal model is its client's own local SGD from where it started (the global model)."""
    cohort = linreg_cohort(**COHORT)
    ditto = fl.ditto(linreg_loss, SGD, lam=1e-12, client_lr=0.1)
    server, (personal, _) = jax.jit(ditto.apply)(*ditto.init(linreg_params(), 6), cohort)[:2]
    deltas, _, _ = fl.algorithms.run_clients(linreg_params(), cohort, SGD, linreg_loss)
    close(jax.tree.map(lambda v: v[jnp.array([0, 1, 3])], personal),
          jax.tree.map(lambda p, d: p + d[jnp.array([0, 1, 3])], linreg_params(), deltas))


def test_fedrep_with_an_empty_head_is_fedavg():
    cohort = linreg_cohort(**COHORT)
    expected, _, _ = one_round(fl.fedavg(linreg_loss, SGD), linreg_params(), cohort, num_clients=6, rounds=2)
    state, _, _ = one_round(fl.fedrep(linreg_loss, SGD, head="none"), linreg_params(), cohort, num_clients=6, rounds=2)
    equal(state.params, expected.params)


def test_fedrep_keeps_heads_per_client_and_aggregates_only_the_body():
    """Head b, body w: the server's b never moves; each client's head is its own, trained against the old body."""
    cohort = linreg_cohort(**COHORT)
    fedrep = fl.fedrep(linreg_loss, SGD, head="^b$")
    state, (heads, written), _ = one_round(fedrep, linreg_params(), cohort, num_clients=6)
    equal(state.params["b"], linreg_params()["b"])
    assert not jnp.allclose(state.params["w"], linreg_params()["w"])
    trained = heads["b"][jnp.array([0, 1, 3])]
    assert len(set(trained.tolist())) == 3 and written.tolist() == [True, True, False, True, False, False]
    # client 1's head: one SGD step on b with the body w at the server's
    batch = jax.tree.map(lambda x: x[1, 0], cohort.batches)
    grad_b = jax.grad(lambda b: linreg_loss({"w": linreg_params()["w"], "b": b}, batch))(linreg_params()["b"])
    close(trained[1], linreg_params()["b"] - 0.1 * grad_b)
    assert fl.message_bytes(fl_config("fedrep", "^b$"), linreg_params()) == 3 * 4  # only the body is sent


def fl_config(algorithm, head="last"):
    from fedjax_code.config import FederatedConfig

    return FederatedConfig(algorithm=algorithm, fedrep_head=head)


def test_fedrep_head_names_the_last_block():
    params = {"embed_tokens": {"embedding": 0}, "layers_0": {"mlp": {"up_proj": {"kernel": 1}}},
              "layers_10": {"mlp": {"up_proj": {"kernel": 2}}, "self_attn": {"q_proj": {"lora_a": 3}}},
              "layers_9": {"mlp": {"up_proj": {"kernel": 4}}}, "norm": {"weight": 5}}
    assert head_paths(params, "last") == {"layers_10/mlp/up_proj/kernel", "layers_10/self_attn/q_proj/lora_a",
                                          "norm/weight"}
    assert head_paths(params, "none") == set() and head_paths(params, "lora_a") == {"layers_10/self_attn/q_proj/lora_a"}
    head, body = split(params, head_paths(params, "last"))
    assert join(params, head, body) == params and len(head) == 3 and len(body) == 3


def test_pfedme_one_inner_step_by_hand():
    """f_i(x) = a_i/2 (x - b_i)^2, one local step (SGD, lr eta), one inner step (lr mu), beta = 1:
    theta = w - mu a (w - b);  w_i = w - eta lam (w - theta) = w - eta lam mu a (w - b);  x = mean_i w_i;
    the personal model kept is theta at w_i: w_i - mu a (w_i - b)."""
    eta, mu, lam, a, b = 0.5, 0.1, 2.0, jnp.array([1.0, 3.0]), jnp.array([2.0, -1.0])
    alg = fl.pfedme(quad_loss, fl.client_optimizer("sgd", eta), lam=lam, inner_steps=1, inner_lr=mu, beta=1.0)
    state, (thetas, _), metrics = one_round(alg, {"x": jnp.float32(0.0)}, quad_cohort(a, b, e=1), num_clients=2)
    w_i = 0.0 - eta * lam * mu * a * (0.0 - b)
    close(state.params["x"], w_i.mean())
    close(thetas["x"], w_i - mu * a * (w_i - b))
    theta0 = 0.0 - mu * a * (0.0 - b)  # train_loss: the envelope at w = 0
    close(metrics["train_loss"], jnp.mean(0.5 * a * (theta0 - b) ** 2 + 0.5 * lam * theta0**2))
    half, _, _ = one_round(fl.pfedme(quad_loss, fl.client_optimizer("sgd", eta), lam, 1, mu, beta=0.5),
                           {"x": jnp.float32(0.0)}, quad_cohort(a, b, e=1), num_clients=2)
    close(half.params["x"], 0.5 * w_i.mean())  # beta = 1/2: half way to the mean


def test_qffl_with_q_zero_is_fedavg_and_q_weights_by_loss():
    cohort = quad_cohort([1.0, 1.0], [1.0, 3.0], e=1)  # losses at x = 0: 0.5 and 4.5
    base = fl.fedavg(quad_loss, fl.client_optimizer("sgd", 0.5))
    plain, _, _ = one_round(base, {"x": jnp.float32(0.0)}, cohort)
    zero, _, _ = one_round(fl.qffl(base, quad_loss, 0.0), {"x": jnp.float32(0.0)}, cohort)
    equal(zero.params, plain.params)
    one, _, _ = one_round(fl.qffl(base, quad_loss, 1.0), {"x": jnp.float32(0.0)}, cohort)
    close(one.params["x"], (0.5 * 0.5 + 4.5 * 1.5) / 5.0)  # deltas 0.5 and 1.5, weighted 0.5 : 4.5


@pytest.mark.parametrize("which", ["ditto", "fedrep", "pfedme", "ditto+qffl"])
def test_personalised_rounds_in_a_loop_equal_one_vmap(which):
    """parallel=1 trains the clients one after another (lax.map); 2 in two groups; None: one vmap."""
    def make(p):
        alg = {"ditto": lambda: fl.ditto(linreg_loss, SGD, 0.5, 0.1, parallel=p),
               "fedrep": lambda: fl.fedrep(linreg_loss, SGD, "^b$", parallel=p),
               "pfedme": lambda: fl.pfedme(linreg_loss, SGD, 2.0, 3, 0.05, 1.0, parallel=p),
               "ditto+qffl": lambda: fl.qffl(fl.ditto(linreg_loss, SGD, 0.5, 0.1, parallel=p), linreg_loss, 2.0)}
        return alg[which]()

    cohort = linreg_cohort(**COHORT)
    expected = one_round(make(None), linreg_params(), cohort, num_clients=6, rounds=2)
    for parallel in (1, 2):
        close(one_round(make(parallel), linreg_params(), cohort, num_clients=6, rounds=2), expected)


def test_humaneval_of_a_ditto_run_adds_its_personal_models_nll(tmp_path):
    """eval humaneval of a personalised run: ``nll`` is the global model's, ``personal_nll`` the mean over four
    clients of their personal models' (here Ditto's stored rows, or the global model for a client that never
    trained), computed again here from the client store."""
    import numpy as np

    from fedjax_code.config import EvalConfig
    from fedjax_code.eval.humaneval import evaluate_run, prompt_prefix, select_problems
    from fedjax_code.eval.metrics import canonical_nll
    from fedjax_code.experiments.run import train
    from fedjax_code.rundir import load_trained
    from tests.test_train import tiny

    run = tmp_path / "ditto"
    train(tiny("federated.algorithm=ditto", "federated.rounds=2"), run, progress=False)
    cfg = EvalConfig(n=1, k=(1,), problems="0:1", nll_problems="0:3", max_new_tokens=4, workers=1)
    record = evaluate_run(run, tmp_path / "he", cfg, progress=False)
    assert record.personal_nll_clients == [0, 2, 5, 7]
    assert record.personal_client is None and record.personal_decode_tokens_per_s is None  # the global's shape
    trained = load_trained(run)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained.params)
    rows, fresh = fl.ClientStore(run / "client_state", template, 8).gather([0, 2, 5, 7])
    assert 0 < fresh.sum() < 4  # some of them trained, some not
    problems, prefix = select_problems("0:3"), prompt_prefix(trained.tokenizer, False)
    nlls = [canonical_nll(trained.params if f else jax.tree.map(lambda x: x[i], rows), trained.model,
                          trained.tokenizer, problems, prefix=prefix)["nll"] for i, f in enumerate(fresh)]
    assert record.personal_nll == pytest.approx(float(np.mean(nlls)), rel=1e-5)
    assert record.nll == pytest.approx(canonical_nll(trained.params, trained.model, trained.tokenizer, problems,
                                                     prefix=prefix)["nll"], rel=1e-6)


def test_deploys_personal_when_the_server_lacks_a_trained_part():
    assert fl.deploys_personal(fl_config("fedrep", "^b$"), linreg_params())
    for algorithm, head in (("fedrep", "none"), ("fedavg", "last"), ("ditto", "last"), ("pfedme", "last")):
        assert not fl.deploys_personal(fl_config(algorithm, head), linreg_params())


def test_humaneval_of_a_fedrep_run_samples_a_personal_model(tmp_path):
    """FedRep's server model keeps its initial head, so eval humaneval samples and scores client 0's personal model
    (the server's body with client 0's head from the store) and says so; a past checkpoint has no such model."""
    from fedjax_code.config import EvalConfig
    from fedjax_code.errors import UserError
    from fedjax_code.eval.humaneval import evaluate_run, prompt_prefix, select_problems
    from fedjax_code.eval.metrics import canonical_nll
    from fedjax_code.experiments.run import train
    from fedjax_code.rundir import load_trained
    from tests.test_train import tiny

    run = tmp_path / "fedrep"
    train(tiny("federated.algorithm=fedrep", "federated.rounds=2", "federated.participation=1.0"), run,
          progress=False)
    cfg = EvalConfig(n=1, k=(1,), problems="0:1", nll_problems="0:3", max_new_tokens=4, workers=1)
    record = evaluate_run(run, tmp_path / "he", cfg, progress=False)
    assert record.personal_client == 0
    trained = load_trained(run)
    server_head, body = split(trained.params, head_paths(trained.params, "last"))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), server_head)
    heads, fresh = fl.ClientStore(run / "client_state", template, 8).gather([0])
    assert not fresh[0]  # client 0 trained its head
    own = join(trained.params, jax.tree.map(lambda x: x[0], heads), body)
    problems, prefix = select_problems("0:3"), prompt_prefix(trained.tokenizer, False)
    nll = lambda params: canonical_nll(params, trained.model, trained.tokenizer, problems, prefix=prefix)["nll"]
    assert record.nll == pytest.approx(nll(own), rel=1e-5)
    assert abs(record.nll - nll(trained.params)) > 1e-3  # not the server model
    with pytest.raises(UserError, match="omit --checkpoint"):
        evaluate_run(run, tmp_path / "he2", cfg, checkpoint=run / "checkpoints" / "2", progress=False)
