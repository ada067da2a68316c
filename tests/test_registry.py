"""The algorithm registry is the one place an algorithm is declared: config, wiring, bytes and report read it."""

from pathlib import Path

import pytest

import fedjax_code
from fedjax_code import federated as fl
from fedjax_code.config import FederatedConfig
from fedjax_code.errors import UserError
from fedjax_code.experiments.answer import sentences

BUILT_IN = {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold", "fednova", "ditto", "fedrep",
            "pfedme", "messengers"}


def test_every_built_in_algorithm_is_registered_and_validates():
    assert set(fl.REGISTRY) == BUILT_IN
    for name, spec in fl.REGISTRY.items():
        optimizer = "sgd" if spec.sgd_client_only else "adamw"
        assert FederatedConfig(algorithm=name, client_optimizer=optimizer).algorithm == name
    assert fl.REGISTRY["scaffold"].messages == 2 and fl.REGISTRY["fedadam"].server_optimizer == "fedadam"


def test_no_other_module_lists_algorithm_names():
    """Outside the federated package no module spells an algorithm's name or display name as a string
    (but for config.py's default, fedavg): config, wiring, bytes and the report all ask the registry."""
    root = Path(fedjax_code.__file__).parent
    names = [f"{q}{n}{q}" for spec in fl.REGISTRY.values() for n in (spec.name, spec.display) for q in "'\""
             if n != "fedavg"]
    for path in root.rglob("*.py"):
        if "federated" not in path.parts:
            text = path.read_text()
            assert not [n for n in names if n in text], path


@pytest.fixture
def toy_algorithm():
    """A new algorithm registered in one call: FedAvg that sends three model-sized messages."""
    spec = fl.register(fl.AlgorithmSpec("toyavg", "ToyAvg", fl.REGISTRY["fedavg"].build, messages=3))
    yield spec
    del fl.REGISTRY["toyavg"]


def test_a_registered_algorithm_reaches_config_wiring_bytes_and_report(toy_algorithm):
    f = FederatedConfig(algorithm="toyavg", client_optimizer="sgd", client_lr=0.1)
    algorithm = fl.build_algorithm(f, lambda p, b: 0.0)
    assert isinstance(algorithm, fl.FederatedAlgorithm)
    assert fl.communicated_bytes("toyavg", model_bytes=10, selected=4, participants=3) == (90, 120)
    group = {"partition": "iid", "participation": 0.25, "algorithm": "toyavg", "clients": 16, "metric": "pass@10",
             "pass_metric": "pass@10", "nll_because": None, "heterogeneity": 0.2, "optimal": 1.0, "ci": [1.0, 1.0], "agreement": 1.0,
             "values": {1.0: 0.5}}
    assert "ToyAvg" in " ".join(sentences([group]))
    with pytest.raises(ValueError, match="registered twice"):
        fl.register(toy_algorithm)


def test_unknown_algorithm_is_one_sentence():
    with pytest.raises(UserError, match="unknown algorithm 'fedsgd': use one of fedavg"):
        FederatedConfig(algorithm="fedsgd")
