"""`fedjax-code sweep`: presets, budgets, the cell lifecycle (skip, resume, failure), refusals."""

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from fedjax_code.errors import UserError
from fedjax_code.experiments import sweep
from tests.test_lora_training import pretrained_dir  # noqa: F401  (a fixture)


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "fedjax_code.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("name", sweep.presets())
def test_every_preset_loads_and_validates(name):
    spec = sweep.load_spec(name)
    cells = sweep.cells(spec)
    assert len(cells) == len({c["id"] for c in cells}) > 1
    for cell in cells:
        cfg = sweep.cell_config(spec, cell["axes"], vocab_size=None)
        scale, key = cell["axes"]["scale"], spec["scale_axis"]["key"]
        expected = spec["scale_axis"]["models"].get(f"{scale:g}") if key == "model.pretrained" else scale
        assert getattr(cfg.model, key.split(".")[1]) == expected and cfg.seed == cell["axes"]["seed"]
        variant = spec["per_algorithm"].get(cell["axes"]["algorithm"], {})  # a variant label names its algorithm
        assert cfg.federated.algorithm == variant.get("algorithm", cell["axes"]["algorithm"])


def test_the_issue_presets_exist():
    assert {"cpu-demo", "clients-vs-size", "algorithms"} <= set(sweep.presets())
    assert any(name.startswith("gpu-") for name in sweep.presets())
    demo = sweep.load_spec("cpu-demo")
    assert len(demo["grid"]["scale"]) >= 2 and "iid" in demo["grid"]["partition"]  # 2 scales x 2 seeds fit ~10 min
    assert any(p.startswith("dirichlet-") for p in demo["grid"]["partition"]) and demo["tune"]["client_lr"]
    assert len(demo["grid"]["seed"]) >= 2  # a gap is told from seed noise
    scaling = sweep.load_spec("cpu-scaling")["grid"]  # the ladder: 4+ scales, IID vs two non-IID levels, 2 seeds
    assert len(scaling["scale"]) >= 4 and len(scaling["partition"]) >= 3 and len(scaling["seed"]) >= 2
    assert sweep.load_spec("clients-vs-size")["grid"]["clients"] == [4, 16, 64]


def test_dry_run_lists_pretrained_cells_offline_without_weights(monkeypatch):
    """hf-scaling's models are hub ids; their recorded architectures give sizes and FLOPs with nothing loaded."""
    import fedjax_code.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "load_pretrained", lambda *a: pytest.fail("a dry run loaded weights"))
    rows = sweep.dry_run(sweep.load_spec("hf-scaling"))
    by_model = {r["model"]: r for r in rows}
    assert len(rows) == 24 and len(by_model) == 6
    for millions, source in sweep.load_spec("hf-scaling")["scale_axis"]["models"].items():
        assert round(by_model[source]["params"] / 1e6) == int(millions)  # the axis value is the model's size
        assert 0 < by_model[source]["params_trainable"] < by_model[source]["params"] / 10  # LoRA adapters
    assert by_model["Qwen/Qwen2.5-Coder-3B"]["train_flops"] > by_model["HuggingFaceTB/SmolLM2-135M"]["train_flops"] * 15
    code, out, err = cli("sweep", "--config", "cpu-pretrained", "--dry-run")
    assert code == 0 and len(out.splitlines()) == 12 and "12 cells" in err
    ranks = [json.loads(line) for line in out.splitlines()]
    assert [r["params_trainable"] for r in ranks[::4]] == [230_400, 921_600, 3_686_400]  # 30 layers x r x (576+192)x2
    code, _, err = cli("sweep", "--config", "cpu-pretrained", "--dry-run", "architectures={}")
    assert code == 2 and "records no architecture for the pretrained model 'smollm2-135m-instruct'" in err


def test_budgets():
    flops = sweep.load_spec("clients-vs-size")
    rounds = {(c["axes"]["clients"], c["axes"]["scale"]): sweep.cell_config(flops, c["axes"], 4096).federated.rounds
              for c in sweep.cells(flops)}
    assert rounds[(16, 0.25)] > rounds[(16, 1.0)] > rounds[(16, 2.0)]  # equal FLOPs: bigger models, fewer tokens
    assert rounds[(4, 1.0)] > rounds[(16, 1.0)] > rounds[(64, 1.0)]  # and more clients per round, fewer rounds
    tokens = sweep.load_spec("cpu-demo")
    cfgs = [sweep.cell_config(tokens, c["axes"], 4096) for c in sweep.cells(tokens)]
    assert len({c.federated.rounds for c in cfgs}) == 1  # equal tokens: the same rounds at every scale
    f = cfgs[0].federated
    assert f.rounds == round(tokens["budget"]["value"] / (4 * f.local_steps * f.batch_size * f.seq_len))


def test_per_algorithm_keys_and_partition_labels():
    spec = sweep.load_spec("algorithms")
    by_alg = {c["axes"]["algorithm"]: sweep.cell_config(spec, c["axes"], None) for c in sweep.cells(spec)}
    assert by_alg["fedadam"].federated.server_lr == 0.01 and by_alg["fedavg"].federated.server_lr == 1.0
    assert sweep.partition_keys("dirichlet-0.1") == {"scheme": "dirichlet", "alpha": 0.1}
    assert sweep.partition_keys("pathological-3") == {"scheme": "pathological", "groups_per_client": 3}
    assert sweep.partition_keys("iid") == {"scheme": "iid"}


@pytest.mark.parametrize("args, message", [
    (["--config", "no-such-preset"], "neither a sweep config file nor a preset"),
    (["--config", "cpu-demo", "grid.scale=[-1.0]"], "model.scale must be positive"),
    (["--config", "cpu-demo", "grid.colour=[1]"], "unknown grid axis 'colour'"),
    (["--config", "cpu-demo", "grid.scale=[]"], "grid.scale must be a non-empty list"),
    (["--config", "cpu-demo", "budget.kind=hours"], "budget must have kind"),
    (["--config", "cpu-demo", "eval.temperatur=1"], "unknown key eval.temperatur"),
    (["--config", "cpu-demo", "base.federated.algoritm=fedavg"], "unknown key federated.algoritm"),
    (["--config", "cpu-demo", "grid.partition=['dirichlet-x']"], "must look like scheme or scheme-number"),
    (["--config", "cpu-demo", "grid.algorithm=['scaffold']"], "scaffold needs federated.client_optimizer = 'sgd'"),
    (["--config", "cpu-demo", "eval.k=[0]"], "every k of pass@k must be a positive integer"),
    (["--config", "cpu-demo", "eval.problems='first'"], "eval.problems must look like START:END"),
])
def test_bad_specs_are_one_sentence(tmp_path, args, message):
    code, _, err = cli("sweep", *args, "--out", tmp_path / "s", "--quiet")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()  # nothing ran


def test_a_finished_sweep(tiny_sweep):
    meta = json.loads((tiny_sweep / "sweep.json").read_text())
    assert len(meta["cells"]) == 4
    for cell in meta["cells"]:
        d = tiny_sweep / "cells" / cell["id"]
        record = json.loads((d / "cell.json").read_text())
        assert record["status"] == "done" and record["rounds"] == 2 and record["train_s"] > 0
        summary = json.loads((d / "run" / "summary.json").read_text())
        assert summary["config"]["model"]["scale"] == cell["axes"]["scale"]
        assert summary["config"]["data"]["scheme"] == cell["axes"]["partition"].split("-")[0]
        he = json.loads((d / "humaneval" / "humaneval.json").read_text())
        assert he["n"] == 10 and he["problems"] == 2 and "pass@10" in he["pass_at_k"]
        assert he["nll_problems"] == 3 and len(he["nll_per_task"]) == 3
    rows = (tiny_sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "pass@10" in rows[0] and "rounds_to_target" in rows[0]
    hashes = {r["tokens_sha256"] for r in csv.DictReader(io.StringIO((tiny_sweep / "results.csv").read_text()))}
    assert len(hashes) == 1 and f"token stream {hashes.pop()}" in (tiny_sweep / "report.md").read_text()
    answer = json.loads((tiny_sweep / "answer.json").read_text())
    assert {g["partition"] for g in answer["groups"]} == {"iid", "dirichlet-0.5"}
    assert all(g["optimal"] in (0.5, 1.0) for g in answer["groups"])


def test_rerun_skips_finished_cells_and_refuses_another_spec(tiny_sweep, tiny_sweep_spec, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_sweep, out)
    before = (out / "results.csv").read_text()
    lines = []
    outcomes = sweep.run_sweep(sweep.load_spec(str(tiny_sweep_spec)), out, progress=False, log=lines.append)
    assert [o.status for o in outcomes] == ["skipped"] * 4 and all("skipped" in line for line in lines)
    with pytest.raises(UserError, match="holds a sweep with another spec"):
        sweep.run_sweep(sweep.load_spec(str(tiny_sweep_spec), ["eval.n=4"]), out, progress=False)
    assert (out / "results.csv").read_text() == before  # nothing was overwritten
    code, _, err = cli("sweep", "--config", tiny_sweep_spec, "--out", out, "eval.n=4", "--quiet")
    assert code == 2 and "pass --force" in err


def test_a_sweep_extends_with_another_seed(tiny_sweep, tiny_sweep_spec, tmp_path):
    """More grid values (a second seed) extend a sweep: its finished cells are kept, only the new ones run."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_sweep, out)
    spec = sweep.load_spec(str(tiny_sweep_spec), ["grid.seed=[0,1]", "grid.scale=[1.0,0.5]"])
    saved = json.loads((out / "sweep.json").read_text())["spec"]
    assert sweep.extends(saved, spec) and not sweep.extends(spec, saved)
    assert not sweep.extends(saved, sweep.load_spec(str(tiny_sweep_spec), ["grid.seed=[1]"]))  # drops seed 0
    assert sweep.extends(saved, sweep.load_spec(str(tiny_sweep_spec), ["report.target_loss=6.5"]))  # report only
    with pytest.raises(UserError, match="matches no cell"):
        sweep.run_sweep(spec, out, progress=False, only="*_seed7")
    outcomes = sweep.run_sweep(spec, out, progress=False, log=lambda line: None, only="iid_*x1_seed*")
    assert sorted(o.status for o in outcomes) == ["done", "skipped"]  # --only: one new cell, the rest left
    listed = json.loads((out / "sweep.json").read_text())["cells"]
    assert [c["axes"]["seed"] for c in listed] == [0, 1] * 4 and [c["axes"]["scale"] for c in listed[:2]] == [1.0] * 2
    for cell in listed:  # seed 0's cells are the fixture's, untouched; of seed 1's only the chosen one ran
        run = out / "cells" / cell["id"] / "run"
        if cell["axes"]["seed"] == 0:
            assert (run / "metrics.jsonl").read_text() == (tiny_sweep / "cells" / cell["id"] / "run" /
                                                           "metrics.jsonl").read_text()
        elif cell["id"] != "iid_p0.5_fedavg_k8_x1_seed1":
            assert not run.exists()
            continue
        assert json.loads((run / "summary.json").read_text())["config"]["seed"] == cell["axes"]["seed"]


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tiny_sweep_spec, tmp_path):
    # FedProx at an absurd learning rate diverges at run time: that cell fails, the FedAvg cell still runs.
    spec = sweep.load_spec(str(tiny_sweep_spec), ["grid.scale=[0.5]", "grid.partition=['iid']",
                                                  "grid.algorithm=['fedprox','fedavg']",
                                                  "per_algorithm.fedprox.client_lr=1e30"])
    outcomes = sweep.run_sweep(spec, tmp_path / "s", progress=False, log=lambda line: None)
    assert [o.status for o in outcomes] == ["failed", "done"]
    assert "training diverged" in outcomes[0].error
    cell_dir = tmp_path / "s" / "cells" / outcomes[0].id
    assert json.loads((cell_dir / "cell.json").read_text())["status"] == "failed"
    assert "Traceback" in (cell_dir / "error.txt").read_text()
    again = sweep.run_sweep(spec, tmp_path / "s", progress=False, log=lambda line: None)
    assert [o.status for o in again] == ["failed (kept)", "skipped"]


def test_interrupted_evaluation_resumes(tiny_sweep_spec, tmp_path, monkeypatch):
    spec = sweep.load_spec(str(tiny_sweep_spec), ["grid.scale=[0.5]", "grid.partition=['iid']"])
    real = sweep.evaluate_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "evaluate_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(spec, tmp_path / "s", progress=False, log=lambda line: None)
    cell_dir = tmp_path / "s" / "cells" / sweep.cells(spec)[0]["id"]
    assert json.loads((cell_dir / "cell.json").read_text())["status"] == "evaluating"
    trained = (cell_dir / "run" / "metrics.jsonl").read_text()
    monkeypatch.setattr(sweep, "evaluate_run", real)
    lines = []
    assert [o.status for o in sweep.run_sweep(spec, tmp_path / "s", progress=False, log=lines.append)] == ["done"]
    assert "resuming" in lines[0]
    assert (cell_dir / "run" / "metrics.jsonl").read_text() == trained  # training was not redone


def test_force_starts_over(tiny_sweep_spec, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    spec = sweep.load_spec(str(tiny_sweep_spec), ["grid.scale=[0.5]", "grid.partition=['iid']"])
    with pytest.raises(UserError, match="is not empty and holds no sweep"):
        sweep.run_sweep(spec, tmp_path / "s", progress=False)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_report_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    code, _, err = cli("report", tmp_path)
    assert code == 2 and "is not a sweep directory" in err and len(err.strip().splitlines()) == 1


def test_report_of_a_partial_sweep_says_what_is_missing(tiny_sweep, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(tiny_sweep, out)
    missing = sorted((out / "cells").iterdir())[0]
    shutil.rmtree(missing)
    code, stdout, err = cli("report", out)
    assert code == 0, err
    assert f"missing: {missing.name} (not started)" in err and "report:" in stdout
    assert missing.name in (out / "report.md").read_text()
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 3


def test_tuning_picks_each_scales_rate_and_cells_use_it(tiny_sweep_spec, tmp_path):
    spec = sweep.load_spec(str(tiny_sweep_spec), ["grid.scale=[0.5]", "grid.partition=['iid','dirichlet-0.5']",
                                                  "tune.client_lr=[0.05,1e30]", "tune.fraction=0.5"])
    lines = []
    outcomes = sweep.run_sweep(spec, tmp_path / "s", progress=False, log=lines.append)
    assert [o.status for o in outcomes] == ["done", "done"] and sum("[tune" in line for line in lines) == 2
    chosen = json.loads((tmp_path / "s" / "tune" / "chosen.json").read_text())
    (group, c), = chosen.items()
    assert c["client_lr"] == 0.05 and c["trials"]["1e+30"] is None and c["trials"]["0.05"] > 0  # 1e30 diverged
    for cell in sweep.cells(spec):
        record = json.loads((tmp_path / "s" / "cells" / cell["id"] / "cell.json").read_text())
        assert record["client_lr"] == 0.05 and record["lr_tuned"]
        config = json.loads((tmp_path / "s" / "cells" / cell["id"] / "run" / "config.json").read_text())
        assert config["config"]["federated"]["client_lr"] == 0.05
    trial = json.loads((tmp_path / "s" / "tune" / f"{group}_lr=0.05" / "run" / "summary.json").read_text())
    assert trial["config"]["data"]["scheme"] == "iid" and trial["rounds"] == 1  # half of the 2-round budget
    from fedjax_code.experiments.report import write_report

    write_report(tmp_path / "s")
    assert "## Learning-rate tuning" in (tmp_path / "s" / "report.md").read_text()
    assert (tmp_path / "s" / "plots" / "lr_tuning.png").is_file()


def test_a_lora_rank_sweep_on_a_pretrained_model(pretrained_dir, tmp_path):
    """The scale axis is the LoRA rank; the pretrained model is evaluated once before fine-tuning, with the
    cells' settings, and the report names the axis and the baseline."""
    text = (f'name = "tiny-lora"\n[scale_axis]\nkey = "model.lora_rank"\n[grid]\nscale = [2, 8]\n'
            f'partition = ["iid"]\nparticipation = [0.5]\n[budget]\nkind = "rounds"\nvalue = 2\n'
            f'[eval]\nn = 2\nk = [1]\nproblems = "0:2"\nnll_problems = "0:2"\nmax_new_tokens = 8\nworkers = 2\n'
            f'[base.data]\nmax_bytes = 300000\nmax_file_bytes = 8000\nclients = 8\n'
            f'[base.model]\npretrained = "{pretrained_dir}"\n'
            f'[base.federated]\nlocal_steps = 2\nbatch_size = 2\nseq_len = 32\nclient_optimizer = "adamw"\n'
            f'client_lr = 0.01\n[base.train]\neval_every = 1\neval_windows = 2\ncheckpoint_every = 1\n')
    (tmp_path / "spec.toml").write_text(text)
    spec = sweep.load_spec(str(tmp_path / "spec.toml"))
    outcomes = sweep.run_sweep(spec, tmp_path / "s", progress=False, log=lambda line: None)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert (sweep.before_dir(tmp_path / "s", str(pretrained_dir)) / "humaneval.json").is_file()
    from fedjax_code.experiments.report import write_report

    answer = write_report(tmp_path / "s")["answer"]
    assert "at every LoRA rank" in answer and "  " not in answer
    assert "Before fine-tuning, tiny scores pass@1 " in answer  # tiny: the model's recorded source
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    per_rank = 2 * (32 + 32 + 32 + 32)  # 2 layers x (q: 32 -> 32, v: 32 -> 32) per unit of rank, cpu-0.25
    assert sorted(int(r["params"]) for r in rows) == [2 * per_rank, 8 * per_rank]  # the adapters, not the base
