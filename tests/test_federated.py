"""Equivalence tests for the vectorised federated core (tiny linear / quadratic models)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_code import federated as fl
from fedjax_code.federated.algorithms import run_clients

# ----------------------------------------------------------------------------- models and data


def linreg_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return 0.5 * jnp.mean((pred - batch["y"]) ** 2)


def quad_loss(params, batch):
    """f(x) = 0.5 * a * (x - b)^2, gradient a * (x - b)."""
    return 0.5 * batch["a"] * (params["x"] - batch["b"]) ** 2


def linreg_params(d=3):
    return {"w": jnp.array([0.5, -0.2, 0.1][:d], jnp.float32), "b": jnp.array(0.3, jnp.float32)}


def linreg_cohort(c=4, e=3, b=5, d=3, seed=0, weights=None, mask=None, step_mask=None, ids=None):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    batches = {"x": jax.random.normal(kx, (c, e, b, d)), "y": jax.random.normal(ky, (c, e, b))}
    return fl.Cohort(
        ids=jnp.arange(c, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32),
        mask=jnp.ones(c, bool) if mask is None else jnp.asarray(mask, bool),
        weights=jnp.ones(c) if weights is None else jnp.asarray(weights, jnp.float32),
        batches=batches,
        step_mask=jnp.ones((c, e), bool) if step_mask is None else jnp.asarray(step_mask, bool),
    )


def quad_cohort(a, b, e, ids=None, mask=None, weights=None, step_mask=None):
    """Client i sees the same (a_i, b_i) at each of its E steps."""
    c = len(a)
    rep = lambda v: jnp.repeat(jnp.asarray(v, jnp.float32)[:, None], e, axis=1)
    return fl.Cohort(
        ids=jnp.arange(c, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32),
        mask=jnp.ones(c, bool) if mask is None else jnp.asarray(mask, bool),
        weights=jnp.ones(c) if weights is None else jnp.asarray(weights, jnp.float32),
        batches={"a": rep(a), "b": rep(b)},
        step_mask=jnp.ones((c, e), bool) if step_mask is None else jnp.asarray(step_mask, bool),
    )


def one_round(alg, params, cohort, num_clients=None, rounds=1):
    state, cstates = alg.init(params, num_clients if num_clients is not None else cohort.ids.shape[0])
    apply = jax.jit(alg.apply)
    for _ in range(rounds):
        state, cstates, metrics = apply(state, cstates, cohort)
    return state, cstates, metrics


def close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **{"rtol": 1e-5, "atol": 1e-6, **kw}), a, b)


def equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----------------------------------------------------------------------------- client update


def test_padded_steps_change_nothing():
    opt = fl.client_optimizer("adamw", 0.05, weight_decay=0.01)
    params, cohort = linreg_params(), linreg_cohort(c=1, e=4)
    batches = jax.tree.map(lambda x: x[0], cohort.batches)
    padded = fl.client_update(params, batches, jnp.array([1, 1, 0, 0], bool), opt, linreg_loss)
    short = fl.client_update(params, jax.tree.map(lambda x: x[:2], batches), jnp.ones(2, bool), opt, linreg_loss)
    close(padded, short, rtol=1e-6)
    assert int(padded[2]) == 2
    # Interleaved padding: the optimizer state (Adam count and moments) must not move either.
    gapped = fl.client_update(params, batches, jnp.array([1, 0, 1, 0], bool), opt, linreg_loss)
    picked = fl.client_update(params, jax.tree.map(lambda x: x[::2], batches), jnp.ones(2, bool), opt, linreg_loss)
    close(gapped, picked, rtol=1e-6)


# ----------------------------------------------------------------------------- FedAvg


def test_vmapped_round_equals_python_loop():
    opt = fl.client_optimizer("adamw", 0.05, weight_decay=0.01)
    step_mask = [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    cohort = linreg_cohort(c=4, e=3, weights=[1, 2, 3, 4], mask=[1, 1, 0, 1], step_mask=step_mask)
    params = linreg_params()
    state, _, metrics = one_round(fl.fedavg(linreg_loss, opt), params, cohort)

    total, acc, loss_acc, taus = 0.0, jax.tree.map(jnp.zeros_like, params), 0.0, []
    for i in (0, 1, 3):
        batches = jax.tree.map(lambda x: x[i], cohort.batches)
        delta, loss, tau = fl.client_update(params, batches, cohort.step_mask[i], opt, linreg_loss)
        w = float(cohort.weights[i])
        acc = jax.tree.map(lambda a, d: a + w * d, acc, delta)
        total, loss_acc = total + w, loss_acc + w * float(loss)
        taus.append(int(tau))
    expected = jax.tree.map(lambda p, a: p + a / total, params, acc)
    close(state.params, expected)
    close(metrics["train_loss"], loss_acc / total)
    assert int(metrics["participants"]) == 3 and int(state.round) == 1
    close(metrics["mean_tau"], np.mean(taus))


def test_masked_clients_have_no_influence():
    opt = fl.client_optimizer("sgd", 0.1)
    cohort = linreg_cohort(c=4, e=3, weights=[1, 2, 3, 4], mask=[1, 0, 1, 1])
    bad_x = cohort.batches["x"].at[1].set(jnp.nan)
    other = cohort._replace(
        batches={"x": bad_x, "y": cohort.batches["y"].at[1].set(1e6)},
        weights=cohort.weights.at[1].set(1e9),
        step_mask=cohort.step_mask.at[1].set(False),
    )
    alg = fl.fedavg(linreg_loss, opt)
    a = one_round(alg, linreg_params(), cohort)
    b = one_round(alg, linreg_params(), other)
    equal(a[0].params, b[0].params)
    equal(a[2], b[2])


def test_fedavg_one_step_equals_centralised_sgd():
    lr = 0.1
    cohort = linreg_cohort(c=3, e=1, b=4)
    params = linreg_params()
    state, _, _ = one_round(fl.fedavg(linreg_loss, optax.sgd(lr), optax.sgd(1.0)), params, cohort)
    union = jax.tree.map(lambda x: x[:, 0].reshape((-1,) + x.shape[3:]), cohort.batches)  # [C*B, ...]
    grad = jax.grad(linreg_loss)(params, union)
    close(state.params, jax.tree.map(lambda p, g: p - lr * g, params, grad))


def test_two_client_fedavg_by_hand():
    """Model y = w*x, loss 0.5*mean((w*x - y)^2), lr 0.1, 2 local steps, w0 = 0, weights [1, 3].

    Client 1: x=[1,1], y=[2,4]: grad = w - 3.
      step 1: w=0,   loss 0.5*(4+16)/2 = 5,                g=-3   -> w=0.3
      step 2: w=0.3, loss 0.5*(1.7^2+3.7^2)/2 = 4.145,    g=-2.7 -> w=0.57;  delta 0.57, mean loss 4.5725
    Client 2: x=[2,2], y=[2,2]: grad = 4w - 4.
      step 1: w=0,   loss 0.5*4 = 2,                       g=-4   -> w=0.4
      step 2: w=0.4, loss 0.5*1.2^2 = 0.72,                g=-2.4 -> w=0.64;  delta 0.64, mean loss 1.36
    p = [0.25, 0.75]: w1 = 0.25*0.57 + 0.75*0.64 = 0.1425 + 0.48 = 0.6225
    train_loss = 0.25*4.5725 + 0.75*1.36 = 1.143125 + 1.02 = 2.163125
    """
    loss = lambda p, b: 0.5 * jnp.mean((p["w"] * b["x"] - b["y"]) ** 2)
    x = jnp.array([[1.0, 1.0], [2.0, 2.0]])
    y = jnp.array([[2.0, 4.0], [2.0, 2.0]])
    rep = lambda v: jnp.repeat(v[:, None], 2, axis=1)  # [C, E=2, B=2]
    cohort = fl.Cohort(jnp.arange(2), jnp.ones(2, bool), jnp.array([1.0, 3.0]), {"x": rep(x), "y": rep(y)}, jnp.ones((2, 2), bool))
    state, _, metrics = one_round(fl.fedavg(loss, optax.sgd(0.1)), {"w": jnp.float32(0.0)}, cohort)
    close(state.params["w"], 0.6225)
    close(metrics["train_loss"], 2.163125)
    close(metrics["mean_tau"], 2.0)


def test_server_optimizers():
    cohort = linreg_cohort(c=3, e=2)
    params, opt = linreg_params(), optax.sgd(0.1)
    plain = one_round(fl.fedavg(linreg_loss, opt), params, cohort, rounds=2)[0]
    avgm0 = one_round(fl.fedavg(linreg_loss, opt, fl.server_optimizer("fedavgm", 1.0, momentum=0.0)), params, cohort, rounds=2)[0]
    close(avgm0.params, plain.params)
    # FedAdam's first step is lr * g / (|g| + eps) per coordinate, with g = -mean delta.
    deltas, _, _ = run_clients(params, cohort, opt, linreg_loss)
    mean_delta = fl.aggregate(deltas, cohort.weights, cohort.mask)
    adam = one_round(fl.fedavg(linreg_loss, opt, fl.server_optimizer("fedadam", lr=0.01)), params, cohort)[0]
    close(adam.params, jax.tree.map(lambda p, d: p + 0.01 * d / (jnp.abs(d) + 1e-3), params, mean_delta), rtol=1e-4)
    for name in ("fedyogi", "fedadagrad", "fedavgm"):
        moved = one_round(fl.fedavg(linreg_loss, opt, fl.server_optimizer(name, lr=0.01, momentum=0.9)), params, cohort, rounds=2)[0]
        assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(moved.params))
        assert not np.allclose(moved.params["w"], params["w"]), name


# ----------------------------------------------------------------------------- FedProx / FedNova


def test_fedprox():
    cohort = linreg_cohort(c=3, e=3, weights=[1, 2, 3])
    params, opt = linreg_params(), optax.sgd(0.1)
    avg = one_round(fl.fedavg(linreg_loss, opt), params, cohort)
    prox0 = one_round(fl.fedprox(linreg_loss, opt, mu=0.0), params, cohort)
    close(prox0[0].params, avg[0].params)
    # mu > 0 equals FedAvg on the explicitly regularised loss (anchored at this round's global params).
    mu = 0.5
    reg = lambda p, b: linreg_loss(p, b) + fl.algorithms.proximal_term(params, mu)(p)
    prox = one_round(fl.fedprox(linreg_loss, opt, mu=mu), params, cohort)
    close(prox[0].params, one_round(fl.fedavg(reg, opt), params, cohort)[0].params)
    one_step = linreg_cohort(c=3, e=1)  # reported loss excludes the penalty: same start, same loss
    close(one_round(fl.fedprox(linreg_loss, opt, mu), params, one_step)[2]["train_loss"],
          one_round(fl.fedavg(linreg_loss, opt), params, one_step)[2]["train_loss"])
    assert not np.allclose(prox[0].params["w"], avg[0].params["w"])


def test_fednova_equal_tau_is_fedavg():
    cohort = linreg_cohort(c=3, e=3, weights=[1, 2, 3], step_mask=[[1, 1, 0]] * 3)
    params, opt = linreg_params(), optax.sgd(0.1)
    close(one_round(fl.fednova(linreg_loss, opt), params, cohort)[0].params, one_round(fl.fedavg(linreg_loss, opt), params, cohort)[0].params)


def test_fednova_unequal_tau_by_hand():
    """f_i = 0.5*a_i*(x-b_i)^2, lr 0.5, x0 = 0, equal weights.

    Client 1 (a=1, b=2, tau=1): g = -2 -> x = 1;                          delta 1
    Client 2 (a=1, b=-2, tau=3): g = 2 -> -1; g = 1 -> -1.5; g = .5 -> -1.75;  delta -7/4
    FedAvg:  0.5 * (1 - 7/4) = -3/8
    FedNova: d = [1, -7/12]; tau_eff = 0.5*1 + 0.5*3 = 2; x = 2 * 0.5 * (1 - 7/12) = 5/12
    """
    cohort = quad_cohort([1.0, 1.0], [2.0, -2.0], e=3, step_mask=[[1, 0, 0], [1, 1, 1]])
    params, opt = {"x": jnp.float32(0.0)}, optax.sgd(0.5)
    close(one_round(fl.fedavg(quad_loss, opt), params, cohort)[0].params["x"], -3 / 8)
    close(one_round(fl.fednova(quad_loss, opt), params, cohort)[0].params["x"], 5 / 12)


# ----------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_by_hand():
    """f_1 = 0.5*1*(x-2)^2, f_2 = 0.5*2*(x+1)^2, lr 0.5, 2 local steps, both participate, eta_g = 1.

    Round 1 (x=0, c=c_1=c_2=0, no correction):
      client 1: g=-2 -> y=1;   g=-1 -> y=1.5.  delta 1.5; c_1+ = 0 - 0 - 1.5/(2*0.5) = -1.5
      client 2: g= 2 -> y=-1;  g= 0 -> y=-1.   delta -1;  c_2+ = 0 - 0 + 1/(2*0.5)   = 1
      x = 0 + (1.5 - 1)/2 = 0.25;  c = 0 + (2/2) * mean(-1.5, 1) = -0.25
    Round 2 (x=0.25, c=-0.25): corrections c - c_i = 1.25 (client 1), -1.25 (client 2)
      client 1: g=-1.75+1.25=-0.5 -> y=0.5;    g=-1.5+1.25=-0.25 -> y=0.625.  delta 0.375
      client 2: g= 2.5-1.25=1.25 -> y=-0.375;  g=1.25-1.25=0     -> y=-0.375. delta -0.625
      x = 0.25 + (0.375 - 0.625)/2 = 0.125
      c_1+ = -1.5 + 0.25 - 0.375 = -1.625;  c_2+ = 1 + 0.25 + 0.625 = 1.875
      c = -0.25 + (1/2)(-0.125 + 0.875) = 0.125  (= mean of the c_i, as it should stay)
    """
    alg = fl.scaffold(quad_loss, client_lr=0.5)
    cohort = quad_cohort([1.0, 2.0], [2.0, -1.0], e=2)
    state, cs, _ = one_round(alg, {"x": jnp.float32(0.0)}, cohort, num_clients=2, rounds=1)
    close(state.params["x"], 0.25)
    close(state.extras["c"]["x"], -0.25)
    close(cs[0]["x"], [-1.5, 1.0])
    state, cs, _ = one_round(alg, {"x": jnp.float32(0.0)}, cohort, num_clients=2, rounds=2)
    close(state.params["x"], 0.125)
    close(state.extras["c"]["x"], 0.125)
    close(cs[0]["x"], [-1.625, 1.875])


def test_scaffold_partial_participation():
    """Same round 1 with a third, masked client (N=3): its c_i stays 0 and c = (-1.5 + 1)/3."""
    alg = fl.scaffold(quad_loss, client_lr=0.5)
    cohort = quad_cohort([1.0, 2.0, 5.0], [2.0, -1.0, 9.0], e=2, mask=[1, 1, 0])
    state, cs, _ = one_round(alg, {"x": jnp.float32(0.0)}, cohort, num_clients=3)
    close(state.params["x"], 0.25)
    close(state.extras["c"]["x"], -0.5 / 3)
    close(cs[0]["x"], [-1.5, 1.0, 0.0])


# ----------------------------------------------------------------------------- aggregation and state


def test_aggregate_all_masked_is_zero():
    deltas = {"w": jnp.full((3, 2), jnp.nan), "b": jnp.ones(3)}
    out = fl.aggregate(deltas, jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3, bool))
    equal(out, {"w": jnp.zeros(2), "b": jnp.float32(0.0)})
    out = fl.aggregate({"w": jnp.array([[1.0], [jnp.nan], [3.0]])}, jnp.array([1.0, 5.0, 3.0]), jnp.array([1, 0, 1], bool))
    close(out["w"], [2.5])
    close(fl.client_weights(jnp.array([3, 5]), "uniform"), [1.0, 1.0])
    close(fl.client_weights(jnp.array([3, 5])), [3.0, 5.0])


def test_gather_scatter():
    states = {"c": jnp.arange(5.0)[:, None] * jnp.ones((5, 2))}
    rows = fl.gather(states, jnp.array([3, 1, 3]))
    close(rows["c"][:, 0], [3.0, 1.0, 3.0])
    new = fl.scatter(states, jnp.array([3, 1, 3]), {"c": -jnp.ones((3, 2))}, jnp.array([1, 0, 0], bool))
    close(new["c"][:, 0], [0.0, 1.0, 2.0, -1.0, 4.0])


# ----------------------------------------------------------------------------- cohort sampling


def test_cohort_basic():
    ids, mask = fl.sample_cohort(7, 3, num_clients=50, participation=0.1)
    assert ids.shape == (5,) and ids.dtype == jnp.int32 and bool(mask.all())
    assert len(set(np.asarray(ids).tolist())) == 5 and int(ids.max()) < 50
    equal(ids, fl.sample_cohort(7, 3, 50, 0.1)[0])
    assert not np.array_equal(ids, fl.sample_cohort(7, 4, 50, 0.1)[0])
    assert fl.sample_cohort(0, 0, 10, 0.01)[0].shape == (1,)
    assert fl.sample_cohort(0, 0, 10, 0.25)[0].shape == (round(2.5),)


def test_cohort_weighted_favours_big_clients():
    sizes = jnp.array([100.0] + [1.0] * 9)
    draw = jax.jit(jax.vmap(lambda r: fl.sample_cohort(1, r, 10, 0.2, sizes, weighted=True)[0]))
    ids = np.asarray(draw(jnp.arange(300)))
    assert all(len(set(row)) == 2 for row in ids.tolist())
    freq = np.bincount(ids.ravel(), minlength=10) / 300
    assert freq[0] > 0.9 and freq[1:].max() < 0.5  # uniform would give 0.2 each


def test_cohort_dropout():
    draw = jax.jit(jax.vmap(lambda r: fl.sample_cohort(2, r, 100, 0.5, dropout=0.3)))
    ids, mask = draw(jnp.arange(40))
    assert 0.25 < 1 - float(mask.mean()) < 0.35
    # A client's coin depends only on (seed, round, id), not on the rest of the cohort.
    for r in range(5):
        small_ids, small_mask = fl.sample_cohort(2, r, 100, 0.1, dropout=0.5)
        full_ids, full_mask = fl.sample_cohort(2, r, 100, 1.0, dropout=0.5)
        by_id = dict(zip(np.asarray(full_ids).tolist(), np.asarray(full_mask).tolist()))
        assert [by_id[i] for i in np.asarray(small_ids).tolist()] == np.asarray(small_mask).tolist()


def test_local_steps():
    ids = jnp.arange(20)
    equal(fl.local_steps(0, 0, ids, 4), jnp.ones((20, 4), bool))
    m = np.asarray(fl.local_steps(0, 0, ids, 5, "random"))
    tau = m.sum(1)
    assert tau.min() >= math.ceil(5 / 2) and tau.max() <= 5 and len(set(tau)) > 1
    assert (m == (np.arange(5)[None] < tau[:, None])).all()  # active steps form a prefix
    sizes = jnp.arange(1.0, 21.0)
    tau = np.asarray(fl.local_steps(0, 0, jnp.array([0, 9, 19]), 4, "proportional", sizes)).sum(1)
    assert tau.tolist() == [1, 2, 4]


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("parallel", [1, 2, 4])
@pytest.mark.parametrize("which", ["fedprox", "scaffold"])
def test_clients_in_groups_equal_one_vmap(which, parallel):
    """Training 1, 2 or 4 of the 4 clients at a time gives the vmapped round's results."""
    make = {"fedprox": lambda p: fl.fedprox(linreg_loss, fl.client_optimizer("sgd", 0.1, clip_norm=0.5), 0.1,
                                            parallel=p),
            "scaffold": lambda p: fl.scaffold(linreg_loss, 0.1, parallel=p, clip_norm=0.5)}[which]
    cohort = linreg_cohort(c=4, e=3, weights=[1, 2, 3, 4], mask=[1, 1, 0, 1], step_mask=[[1, 1, 1], [1, 0, 0],
                                                                                         [1, 1, 0], [1, 1, 1]])
    expected = one_round(make(None), linreg_params(), cohort, num_clients=6, rounds=2)
    close(one_round(make(parallel), linreg_params(), cohort, num_clients=6, rounds=2), expected)


def test_clipping_bounds_the_local_step():
    params, batches = {"x": jnp.array(0.0)}, {"a": jnp.ones(1), "b": jnp.full(1, 100.0)}  # gradient -100
    delta, _, _ = fl.client_update(params, batches, jnp.ones(1, bool), fl.client_optimizer("sgd", 0.1, clip_norm=2.0),
                                   quad_loss)
    close(delta["x"], 0.2)  # lr * clipped gradient norm


def test_automatic_clients_in_parallel():
    from fedjax_code.config import FederatedConfig
    from fedjax_code.experiments.components import parallel_clients

    small, big = FederatedConfig(batch_size=1, seq_len=128), FederatedConfig(batch_size=8, seq_len=128)
    assert parallel_clients(small, 8, 1, "cpu") == 4  # 512 tokens in flight: 4 clients of 128
    assert parallel_clients(small, 4, 1, "cpu") is None  # the whole cohort fits: one vmap
    assert parallel_clients(big, 4, 1, "cpu") == 1  # one 1,024-token client at a time
    assert parallel_clients(big, 8, 4, "cpu") == 4  # at least one per device, a multiple of the devices
    assert parallel_clients(small, 6, 1, "cpu") == 3  # a divisor of the cohort
    assert parallel_clients(big, 64, 1, "gpu") is None  # accelerators vmap the whole cohort
    assert parallel_clients(FederatedConfig(clients_in_parallel=2), 8, 1, "gpu") == 2


@pytest.mark.parametrize("which", ["fedavg", "scaffold"])
def test_sharded_equals_single_device_and_traces_once(which):
    assert len(jax.devices()) >= 4, "tests/conftest.py should force 4 host devices"
    k, c, e = 10, 6, 3
    if which == "fedavg":  # the sharded round also trains the clients in 4 groups (one per device)
        alg, sharded_alg = (fl.fedavg(linreg_loss, optax.sgd(0.1), fl.server_optimizer("fedadam", 0.05), parallel=p)
                            for p in (None, 4))
    else:
        alg = sharded_alg = fl.scaffold(linreg_loss, 0.1)
    cohorts = []
    for r in range(3):
        ids, mask = fl.sample_cohort(0, r, k, c / k, dropout=0.2)
        steps = fl.local_steps(0, r, ids, e, "random")
        cohorts.append(linreg_cohort(c=c, e=e, seed=r, ids=ids, mask=mask, step_mask=steps, weights=jnp.arange(1.0, c + 1)))

    traces = []

    def counted(*args):
        traces.append(1)
        return sharded_alg.apply(*args)

    # Single device, unpadded.
    single = jax.jit(alg.apply)
    state, cs = alg.init(linreg_params(), k)
    for cohort in cohorts:
        state, cs, m1 = single(state, cs, cohort)

    # Four devices, cohort padded 6 -> 8 and split over the 'clients' axis.
    mesh = fl.make_mesh(4)
    round_fn = jax.jit(counted, donate_argnums=(0, 1))
    s_state, s_cs = fl.replicate(alg.init(linreg_params(), k), mesh)
    for cohort in cohorts:
        sharded = fl.shard_cohort(fl.pad_cohort(cohort, 4), mesh)
        assert sharded.ids.shape == (8,) and len(sharded.batches["x"].sharding.device_set) == 4
        s_state, s_cs, m4 = round_fn(s_state, s_cs, sharded)
    assert len(traces) == 1
    close(s_state.params, state.params, rtol=1e-5)
    close(s_state.extras, state.extras, rtol=1e-5)
    close(s_cs, cs, rtol=1e-5)
    close(m4, m1, rtol=1e-5)
    assert int(s_state.round) == 3


# ----------------------------------------------------------------------------- learning-rate schedules


def test_schedule_values_by_hand():
    """n = round + 1, W = warmup. cosine R=11, W=3, ratio 0.1: 1/3 at round 0, 1 at round 2 (end of warm-up),
    0.1 + 0.9 * (1 + cos(pi * 4/8)) / 2 = 0.55 at round 6, 0.1 at round 10 (the last).
    inverse-sqrt W=4: 1/4 at round 0, 1 at round 3, sqrt(4/16) = 0.5 at round 15. constant: 1."""
    value = lambda name, r, *a: float(fl.lr_factor(name, *a)(jnp.int32(r)))  # noqa: E731
    for r, expected in ((0, 1 / 3), (2, 1.0), (6, 0.55), (10, 0.1)):
        assert value("cosine", r, 11, 3, 0.1) == pytest.approx(expected, rel=1e-6)
    assert value("cosine", 0, 11, 0, 0.1) == 1.0 and value("cosine", 10, 11, 0, 0.25) == pytest.approx(0.25)
    for r, expected in ((0, 0.25), (3, 1.0), (15, 0.5)):
        assert value("inverse-sqrt", r, 16, 4) == pytest.approx(expected, rel=1e-6)
    assert all(fl.lr_factor("constant", 10, 3)(r) == 1.0 for r in range(10))
    lr = fl.server_learning_rate("cosine", 2.0, 11, 3, 0.1)
    assert float(lr(2)) == pytest.approx(2.0) and float(lr(10)) == pytest.approx(0.2)
    assert fl.server_learning_rate("constant", 2.0, 11, 3) == 2.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        fl.lr_factor("linear", 10)


def _config(**kw):
    from fedjax_code.config import FederatedConfig

    return FederatedConfig(**{"client_optimizer": "adamw", "client_lr": 0.05, "clip_norm": 0.0, "rounds": 5, **kw})


def test_constant_schedules_are_todays_round_bit_for_bit():
    """build_algorithm with the default (constant) schedules is the schedule-free algorithm, bit for bit."""
    cohort = linreg_cohort(c=4, e=3, weights=[1, 2, 3, 4], mask=[1, 1, 0, 1])
    for name in ("fedavg", "fedadam"):
        f = _config(algorithm=name, server_lr=0.1)
        built = fl.build_algorithm(f, linreg_loss)
        plain = fl.fedavg(linreg_loss, fl.client_optimizer("adamw", 0.05),
                          fl.server_optimizer(fl.REGISTRY[name].server_optimizer, 0.1, momentum=f.server_momentum))
        equal(one_round(built, linreg_params(), cohort, rounds=3), one_round(plain, linreg_params(), cohort, rounds=3))
    sgd = fl.client_optimizer("sgd", 0.1)
    batches = jax.tree.map(lambda x: x[0], cohort.batches)
    equal(jax.jit(lambda s: fl.client_update(linreg_params(), batches, cohort.step_mask[0], sgd, linreg_loss,
                                             lr_scale=s))(jnp.float32(1.0)),
          jax.jit(lambda: fl.client_update(linreg_params(), batches, cohort.step_mask[0], sgd, linreg_loss))())


def test_scheduled_round_scales_one_sgd_step():
    """One local SGD step at round 1 (cosine factor 2/4 during the warm-up): x <- x - 0.5 * lr * mean gradient."""
    lr, rounds, warmup = 0.1, 10, 4  # cosine factor at round 1: 2/4 = 0.5
    cohort = linreg_cohort(c=3, e=1, b=4)
    params = linreg_params()
    alg = fl.fedavg(linreg_loss, optax.sgd(lr), client_schedule=fl.lr_factor("cosine", rounds, warmup))
    state, cs = alg.init(params, 3)
    state, _, _ = jax.jit(alg.apply)(state.replace(round=jnp.int32(1)), cs, cohort)
    grads = [jax.grad(linreg_loss)(params, jax.tree.map(lambda x: x[i, 0], cohort.batches)) for i in range(3)]
    mean_grad = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    close(state.params, jax.tree.map(lambda p, g: p - 0.5 * lr * g, params, mean_grad))
    assert int(state.round) == 2


def loop_rounds(make, params, cohorts, num_clients):
    """The reference: a plain loop whose round r applies the schedule-free algorithm ``make(r)`` to the carried state."""
    state, cs = make(0).init(params, num_clients)
    for r, cohort in enumerate(cohorts):
        state, cs, metrics = make(r).apply(state, cs, cohort)
    return state, cs, metrics


def test_scheduled_rounds_equal_a_loop_and_trace_once():
    """Client adamw with a cosine schedule and a server sgd with an inverse-sqrt schedule, vmapped and jitted
    once, equal a loop whose round r uses learning rates lr * factor(r) (client) and server_lr * factor(r)."""
    rounds, warmup, lr, server_lr = 4, 2, 0.05, 0.8
    client_f, server_f = fl.lr_factor("cosine", rounds, warmup, 0.2), fl.lr_factor("inverse-sqrt", rounds, warmup)
    f = _config(client_lr_schedule="cosine", server_lr_schedule="inverse-sqrt", warmup_rounds=warmup,
                final_lr_ratio=0.2, rounds=rounds, server_lr=server_lr)
    alg = fl.build_algorithm(f, linreg_loss, parallel=2)
    cohorts = [linreg_cohort(c=4, e=3, seed=r, weights=[1, 2, 3, 4], mask=[1, 1, 0, 1],
                             step_mask=[[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]) for r in range(rounds)]
    traces = []

    def counted(*args):
        traces.append(1)
        return alg.apply(*args)

    round_fn = jax.jit(counted)
    state, cs = alg.init(linreg_params(), 4)
    for cohort in cohorts:
        state, cs, metrics = round_fn(state, cs, cohort)
    assert len(traces) == 1 and int(state.round) == rounds

    def make(r):
        return fl.fedavg(linreg_loss, fl.client_optimizer("adamw", lr * float(client_f(r))),
                         optax.sgd(server_lr * float(server_f(r))))

    ref_state, _, ref_metrics = loop_rounds(make, linreg_params(), cohorts, 4)
    close(state.params, ref_state.params)
    close(metrics, ref_metrics)
    constant = one_round(fl.build_algorithm(_config(rounds=rounds, server_lr=server_lr), linreg_loss),
                         linreg_params(), cohorts[0])[0]
    assert not np.allclose(state.params["w"], constant.params["w"])


def test_scaffold_with_schedule_equals_a_loop():
    """SCAFFOLD option II divides by tau * (the round's scaled lr): a scheduled run equals a loop whose round r is
    SCAFFOLD at client_lr * factor(r), control variates carried across rounds."""
    rounds, lr = 3, 0.5
    factor = fl.lr_factor("cosine", rounds, 2, 0.3)
    cohort = quad_cohort([1.0, 2.0, 5.0], [2.0, -1.0, 9.0], e=2, mask=[1, 1, 0])
    alg = fl.scaffold(quad_loss, lr, client_schedule=factor)
    scheduled = one_round(alg, {"x": jnp.float32(0.0)}, cohort, num_clients=3, rounds=rounds)
    make = lambda r: fl.scaffold(quad_loss, lr * float(factor(r)))  # noqa: E731
    close(scheduled, loop_rounds(make, {"x": jnp.float32(0.0)}, [cohort] * rounds, 3))
    f = _config(algorithm="scaffold", client_optimizer="sgd", client_lr=lr, client_lr_schedule="cosine",
                warmup_rounds=2, final_lr_ratio=0.3, rounds=rounds)
    close(one_round(fl.build_algorithm(f, quad_loss), {"x": jnp.float32(0.0)}, cohort, num_clients=3,
                    rounds=rounds), scheduled)
