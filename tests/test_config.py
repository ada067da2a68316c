"""Experiment configuration: TOML + overrides onto frozen, validated dataclasses."""

import json
import subprocess
import sys

import pytest

from fedjax_code.config import ExperimentConfig, experiment_from_dict, load_experiment
from fedjax_code.errors import UserError


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[data]\nscheme = "dirichlet"\nalpha = 0.1\nclients = 32\n'
                    '[model]\nscale = 2\n[federated]\nrounds = 7\nparticipation = 0.25\n')
    cfg = load_experiment(str(path), ["federated.rounds=9", "data.scheme=iid", "model.dtype=bfloat16"])
    assert cfg.seed == 3 and cfg.partition.alpha == 0.1 and cfg.partition.clients == 32
    assert cfg.partition.scheme == "iid" and cfg.federated.rounds == 9 and cfg.model.scale == 2.0
    assert cfg.model.dtype == "bfloat16"
    assert experiment_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # round-trips through JSON


def test_required_keys_exist():
    d = ExperimentConfig().to_dict()
    assert {"max_bytes", "scheme", "alpha", "clients", "heldout_frac"} <= set(d["data"])
    assert {"algorithm", "participation", "rounds", "local_steps", "batch_size", "seq_len", "client_lr",
            "server_lr"} <= set(d["federated"])
    assert {"eval_every", "checkpoint_every"} <= set(d["train"]) and "scale" in d["model"] and "seed" in d


@pytest.mark.parametrize("overrides, message", [
    (["data.nope=1"], "unknown key data.nope"),
    (["federated.rounds=many"], "federated.rounds must be int"),
    (["federated.participation=1.5"], "participation must be in (0, 1]"),
    (["data.alpha=-1"], "alpha must be > 0"),
    (["federated.algorithm=fedsgd"], "unknown algorithm"),
    (["federated.algorithm=scaffold", "federated.client_optimizer=adamw"], "scaffold needs federated.client_optimizer"),
    (["data.partition=iid"], "unknown key data.partition"),
    (["optimizer.lr=1"], "unknown section or key"),
    (["rounds"], "must look like section.key=value"),
    (["model.scale=0"], "model.scale must be positive"),
    (["model.tie_embeddings=1"], "model.tie_embeddings must be a boolean"),
    (["federated.client_lr_schedule=linear"], "federated.client_lr_schedule must be one of constant, cosine"),
    (["federated.server_lr_schedule=1"], "federated.server_lr_schedule must be str"),
    (["federated.warmup_rounds=-1"], "warmup_rounds must be >= 0"),
    (["federated.final_lr_ratio=0"], "final_lr_ratio must be in (0, 1]"),
    (["federated.final_lr_ratio=1.5"], "final_lr_ratio must be in (0, 1]"),
])
def test_bad_values_are_one_sentence(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_experiment(None, overrides)


def test_lr_schedule_keys():
    cfg = load_experiment(None, ["federated.client_lr_schedule=cosine", "federated.server_lr_schedule=inverse-sqrt",
                                 "federated.warmup_rounds=3", "federated.final_lr_ratio=0.05"])
    f = cfg.federated
    assert (f.client_lr_schedule, f.server_lr_schedule, f.warmup_rounds, f.final_lr_ratio) == \
        ("cosine", "inverse-sqrt", 3, 0.05)
    defaults = ExperimentConfig().federated
    assert (defaults.client_lr_schedule, defaults.server_lr_schedule, defaults.warmup_rounds) == \
        ("constant", "constant", 0)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="cannot read config file"):
        load_experiment(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("[data\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_experiment(str(tmp_path / "bad.toml"))


def test_model_info_cli():
    run = lambda *a: subprocess.run([sys.executable, "-m", "fedjax_code.cli", "model", "info", *a],  # noqa: E731
                                    capture_output=True, text=True)
    small, big = (json.loads(run("--scale", s).stdout) for s in ("0.5", "2"))
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_len", "params_total",
                "params_non_embedding", "flops_per_token", "size_mb"):
        assert key in small
    assert big["params_total"] > small["params_total"] and big["d_model"] == 4 * small["d_model"]
    bad = run("--preset", "cpu-9")
    assert bad.returncode == 2 and "unknown model preset" in bad.stderr and "Traceback" not in bad.stderr


def test_tie_embeddings_overrides_the_preset():
    from fedjax_code.models import param_count
    from fedjax_code.experiments.components import model_config
    tied = model_config(load_experiment(None, ["model.scale=0.5"]), vocab_size=512)
    untied = model_config(load_experiment(None, ["model.scale=0.5", "model.tie_embeddings=false"]), vocab_size=512)
    assert tied.tie_embeddings and not untied.tie_embeddings  # cpu-1 ties by default
    assert param_count(untied)["params_total"] - param_count(tied)["params_total"] == 512 * tied.d_model  # the head's own matrix
