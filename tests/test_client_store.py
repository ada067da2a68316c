"""The host-side client store: round trips, crash rollback, and rounds that equal device-stacked state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_code import federated as fl
from tests.test_federated import close, linreg_cohort, linreg_loss, linreg_params

TEMPLATE = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)}


def rows(values, n=None):
    values = np.asarray(values, np.float32)
    return {"w": np.repeat(values[:, None], 3, axis=1), "n": np.asarray(n if n is not None else values, np.int32)}


def test_gather_scatter_round_trip_and_reopen(tmp_path):
    store = fl.ClientStore(tmp_path, TEMPLATE, 6)
    got, fresh = store.gather([4, 1])
    assert fresh.tolist() == [True, True] and not got["w"].any()
    store.scatter(1, [4, 1, 4], rows([2.0, 3.0, 9.0]), [True, True, False])  # a masked padded repeat of 4
    store.commit(1)
    reopened = fl.ClientStore(tmp_path, TEMPLATE, 6)
    got, fresh = reopened.gather([1, 4, 0])
    close(got["w"][:, 0], [3.0, 2.0, 0.0])
    assert got["n"].tolist() == [3, 2, 0] and fresh.tolist() == [False, False, True]
    assert reopened.row_bytes == 3 * 4 + 4
    with pytest.raises(ValueError, match="other shapes"):
        fl.ClientStore(tmp_path, TEMPLATE, 7)


def test_rollback_restores_the_checkpointed_rows(tmp_path):
    store = fl.ClientStore(tmp_path, TEMPLATE, 5)
    store.scatter(1, [0, 1], rows([1.0, 1.0]), [True, True])
    store.commit(1)
    snapshot = store.gather(range(5))
    store.scatter(2, [1, 2], rows([2.0, 2.0]), [True, True])
    store.scatter(3, [2, 3], rows([3.0, 3.0]), [True, True])  # a run killed here resumes from checkpoint 1
    reopened = fl.ClientStore(tmp_path, TEMPLATE, 5)
    reopened.rollback(1)
    for a, b in zip(jax.tree.leaves(reopened.gather(range(5))), jax.tree.leaves(snapshot)):
        np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "undo").iterdir())
    reopened.rollback(0)  # nothing left to undo past the commit: the committed rows stay
    close(reopened.gather([0])[0]["w"][:, 0], [1.0])


def store_rounds(alg, params, cohorts, num_clients, directory):
    """Rounds with the per-client state in a ClientStore, as training runs do."""
    server = alg.init_server(params, num_clients)
    row = jax.eval_shape(alg.init_client, server, jnp.int32(0))
    store = fl.ClientStore(directory, row, num_clients)

    @jax.jit
    def round_(server, cohort_rows, fresh, cohort):
        return alg.round(server, fl.with_fresh(alg, server, cohort_rows, fresh, cohort.ids), cohort)

    for r, cohort in enumerate(cohorts):
        cohort_rows, fresh = store.gather(cohort.ids)
        server, cohort_rows, _ = round_(server, cohort_rows, fresh, cohort)
        store.scatter(r + 1, cohort.ids, jax.device_get(cohort_rows), cohort.mask)
    return server, store


@pytest.mark.parametrize("which", ["scaffold", "ditto", "fedrep"])
def test_store_rounds_equal_device_stacked_state(tmp_path, which):
    """3 rounds of partial participation (one client masked): the host store ends with the same server state and
    per-client rows (control variates, personal models, heads) as the state stacked [K, ...] on the device."""
    sgd = fl.client_optimizer("sgd", 0.1)
    alg = {"scaffold": lambda: fl.scaffold(linreg_loss, 0.1), "ditto": lambda: fl.ditto(linreg_loss, sgd, 0.5, 0.1),
           "fedrep": lambda: fl.fedrep(linreg_loss, sgd, "^b$")}[which]()
    k = 6
    cohorts = [linreg_cohort(c=3, e=2, b=4, seed=r, ids=ids, mask=[1, 1, r != 1])
               for r, ids in enumerate(([0, 2, 5], [2, 3, 1], [5, 0, 4]))]
    server, states = alg.init(linreg_params(), k)
    for cohort in cohorts:
        server, states, _ = fl.jit_round(alg)(server, states, cohort)
    store_server, store = store_rounds(alg, linreg_params(), cohorts, k, tmp_path)
    close(store_server.params, server.params)
    close(store_server.extras, server.extras)
    stored, fresh = store.gather(range(k))
    close(stored, states[0])
    np.testing.assert_array_equal(~fresh, np.asarray(states[1]))
    assert fresh.tolist() == [False, True, False, False, False, False]  # client 1 was only ever masked


def test_a_scaffold_run_killed_between_checkpoints_resumes_bit_identical(tmp_path):
    """Killed after round 3 wrote its rows (undo/3.npz) but before checkpoint 4: the resume rolls the store back to
    checkpoint 2 and ends as the uninterrupted run does, the per-client control variates included."""
    from fedjax_code.experiments.run import train
    from tests.test_train import kill_after_checkpoint, metrics, tiny

    scaffold = ("federated.algorithm=scaffold", "federated.client_lr=0.3")
    train(tiny(*scaffold), tmp_path / "a", progress=False)
    kill_after_checkpoint(tmp_path / "b", *scaffold, marker="client_state/undo/3.npz")
    train(tiny(*scaffold), tmp_path / "b", resume=True, progress=False)
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a" / "client_state").glob("*.bin"))
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "b" / "client_state").glob("*.bin"))
    for name in files:  # every c_i and the written flags, bit for bit
        a, b = ((tmp_path / run / "client_state" / name).read_bytes() for run in "ab")
        assert a == b
