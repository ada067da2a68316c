"""Frozen, validated configuration dataclasses, one per concern."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedjax_code.errors import UserError
from fedjax_code.federated.algorithms import REGISTRY as ALGORITHMS
from fedjax_code.federated.schedules import SCHEDULES
from fedjax_code.models.scales import LADDER_FACTORS, LORA_TARGETS

UNITS = ("file", "function")
SCHEMES = ("iid", "dirichlet", "pathological", "natural", "size")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def config_hash(cfg, extra: dict | None = None) -> str:
    """A short stable hash of a config dataclass (plus optional extra facts)."""
    blob = json.dumps({"config": dataclasses.asdict(cfg), "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DataConfig:
    """What goes into the corpus and the tokenizer (``fedjax-code data prepare``)."""

    source: str = "stdlib"
    split: str = "train"
    text_column: str = "text"
    group_column: str | None = None
    unit: str = "file"
    max_bytes: int = 20_000_000
    min_file_bytes: int = 200
    max_file_bytes: int = 200_000
    decontaminate: bool = True
    decontam_ngram: int = 13
    vocab_size: int = 8192
    tokenizer: str | None = None
    topics: int = 12  # topic classes for label skew (data.topics); 8-20 are sensible
    prompt_column: str | None = None      # instruction data: the prompt's column(s), comma-separated, joined by newlines
    completion_column: str | None = None  # ... and the response's column: each row is one prompt/completion record
    loss_on: str = "all"                  # "completion": train on completion tokens only (unit function, or the above)
    document_prefix: str = "bos"          # before each document: "bos", or "tokenizer" (what it adds to any text;
                                          # a pretrained model's convention, set for it by model.pretrained)

    def __post_init__(self):
        _require(self.unit in UNITS, f"unit must be one of {', '.join(UNITS)}, not {self.unit!r}")
        _require(self.max_bytes > 0, f"max_bytes must be positive, not {self.max_bytes}")
        _require(0 <= self.min_file_bytes <= self.max_file_bytes, "min_file_bytes must be between 0 and max_file_bytes")
        _require(self.decontam_ngram >= 1, "decontam_ngram must be at least 1")
        _require(self.vocab_size >= 300, f"vocab_size must be at least 300 (256 bytes + specials), not {self.vocab_size}")
        _require(self.topics >= 1, f"topics must be at least 1, not {self.topics}")
        _require((self.prompt_column is None) == (self.completion_column is None),
                 "data.prompt_column and data.completion_column go together (instruction data needs both)")
        _require(self.document_prefix in ("bos", "tokenizer"),
                 f"data.document_prefix must be bos or tokenizer, not {self.document_prefix!r}")
        _require(self.loss_on in ("all", "completion"), f"data.loss_on must be all or completion, not {self.loss_on!r}")
        _require(self.loss_on == "all" or self.unit == "function" or self.completion_column is not None,
                 "data.loss_on = 'completion' needs prompt/completion pairs: data.unit = 'function' or instruction "
                 "columns (data.prompt_column, data.completion_column)")


@dataclass(frozen=True)
class PartitionConfig:
    """How the prepared corpus is split across clients and into train/held-out (``fedjax-code data partition``
    and the ``[data]`` keys beyond DataConfig's). The seed is the run's (``partition(..., seed)``)."""

    scheme: str = "iid"
    clients: int = 16
    alpha: float = 0.5
    groups_per_client: int = 2
    min_client_examples: int = 2
    heldout_frac: float = 0.1

    def __post_init__(self):
        _require(self.scheme in SCHEMES, f"unknown partition scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}")
        _require(self.clients >= 1, f"the number of clients must be at least 1, not {self.clients}")
        _require(self.alpha > 0, f"alpha must be > 0 (a Dirichlet concentration), not {self.alpha}")
        _require(self.groups_per_client >= 1, f"groups per client must be at least 1, not {self.groups_per_client}")
        _require(self.min_client_examples >= 1, "min_client_examples must be at least 1")
        _require(0 <= self.heldout_frac < 1, f"data.heldout_frac must be in [0, 1), not {self.heldout_frac}")


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: a base preset (see ``fedjax-code model info``) scaled by ``scale``, or a pretrained model.

    ``tie_embeddings``: share the input embedding with the output head (None: the preset's choice).
    ``pretrained``: anything ``models.load_pretrained`` takes (a registered name, a .gguf file, a directory, a
    hub id); it replaces ``base`` and ``scale``, and the data is tokenised with its tokenizer.
    ``lora_rank`` r > 0 trains LoRA adapters on ``lora_targets`` with a frozen base (``models.lora``); 0 trains
    every parameter (full fine-tuning of a pretrained model, or training from scratch).
    """

    base: str = "cpu-1"
    scale: float = 1.0
    dtype: str = "float32"
    tie_embeddings: bool | None = None
    pretrained: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        _require(self.scale > 0, f"model.scale must be positive, not {self.scale}")
        _require(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0: no adapters), not {self.lora_rank}")
        _require(self.lora_alpha > 0, f"model.lora_alpha must be positive, not {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        _require(not unknown and len(self.lora_targets) > 0,
                 f"model.lora_targets must name some of {', '.join(LORA_TARGETS)}, not {list(self.lora_targets)}")

    @property
    def lora(self) -> dict:
        """The ModelConfig fields of the adapters."""
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_targets": self.lora_targets}


@dataclass(frozen=True)
class FederatedConfig:
    """``[federated]``: the algorithm, participation and local work."""

    algorithm: str = "fedavg"
    participation: float = 0.25
    rounds: int = 20
    local_steps: int = 4
    local_steps_mode: str = "fixed"
    batch_size: int = 4
    seq_len: int = 128
    client_optimizer: str = "sgd"
    client_lr: float = 0.5
    clip_norm: float = 1.0  # local gradients clipped to this global norm; 0 = off
    server_lr: float = 1.0
    server_momentum: float = 0.9
    mu: float = 0.01
    dropout: float = 0.0
    weighted_sampling: bool = False
    weighting: str = "examples"
    clients_in_parallel: int = 0  # cohort clients trained at once; 0: automatic (components.parallel_clients)
    client_lr_schedule: str = "constant"  # across rounds: constant | cosine | inverse-sqrt (federated.schedules)
    server_lr_schedule: str = "constant"
    warmup_rounds: int = 0        # linear warm-up of the non-constant schedules (may exceed rounds)
    final_lr_ratio: float = 0.1   # cosine: the last round's lr / the lr
    qffl_q: float = 0.0           # q-FFL: aggregation weights x (client loss)^q, with any algorithm; 0: off
    ditto_lambda: float = 0.1     # Ditto: the personal model's pull to the global model
    fedrep_head: str = "last"     # FedRep: the per-client head; last | none | a regex over param paths (a/b/c)
    pfedme_lambda: float = 15.0   # pFedMe: the Moreau envelope's lambda
    pfedme_beta: float = 1.0      # pFedMe: the server's step toward the clients' mean (1: the mean itself)
    pfedme_inner_steps: int = 5   # pFedMe: gradient steps solving for the personal model at each local step
    pfedme_lr: float = 0.01       # pFedMe: the learning rate of those inner steps
    distill_alpha: float = 1.0    # messengers: weight of the mutual KL terms
    messenger_scale: float = 0.25  # messengers: the messenger's start, a factor of model.base's ladder
    messenger_max_scale: float = 1.0  # messengers: how far it may grow
    messenger_growth: str = "plateau"  # messengers: none | plateau (a ladder step when held-out loss stalls)
    messenger_patience: int = 2   # messengers: evaluations without a 1% improvement before it grows

    def __post_init__(self):
        _require(self.algorithm in ALGORITHMS, f"unknown algorithm {self.algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        _require(not ALGORITHMS[self.algorithm].sgd_client_only or self.client_optimizer == "sgd",
                 f"{self.algorithm} needs federated.client_optimizer = 'sgd' (its update rule assumes plain local SGD)")
        _require(0 < self.participation <= 1, f"participation must be in (0, 1], not {self.participation}")
        for name in ("rounds", "local_steps", "batch_size", "seq_len"):
            _require(getattr(self, name) >= 1, f"federated.{name} must be at least 1, not {getattr(self, name)}")
        _require(self.local_steps_mode in ("fixed", "random", "proportional"),
                 f"local_steps_mode must be fixed, random or proportional, not {self.local_steps_mode!r}")
        _require(self.client_optimizer in ("sgd", "adamw"), f"client_optimizer must be sgd or adamw, not {self.client_optimizer!r}")
        _require(self.client_lr > 0 and self.server_lr > 0, "client_lr and server_lr must be positive")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1), not {self.dropout}")
        _require(self.clip_norm >= 0, f"clip_norm must be >= 0 (0: off), not {self.clip_norm}")
        _require(self.mu >= 0, f"mu must be >= 0, not {self.mu}")
        _require(self.clients_in_parallel >= 0,
                 f"clients_in_parallel must be >= 0 (0: automatic), not {self.clients_in_parallel}")
        _require(self.weighting in ("examples", "uniform"), f"weighting must be examples or uniform, not {self.weighting!r}")
        for name in ("client_lr_schedule", "server_lr_schedule"):
            _require(getattr(self, name) in SCHEDULES,
                     f"federated.{name} must be one of {', '.join(SCHEDULES)}, not {getattr(self, name)!r}")
        _require(self.warmup_rounds >= 0, f"warmup_rounds must be >= 0, not {self.warmup_rounds}")
        _require(0 < self.final_lr_ratio <= 1, f"final_lr_ratio must be in (0, 1], not {self.final_lr_ratio}")
        _require(self.qffl_q >= 0, f"qffl_q must be >= 0 (0: off), not {self.qffl_q}")
        for name in ("ditto_lambda", "pfedme_lambda", "pfedme_beta", "pfedme_lr"):
            _require(getattr(self, name) > 0, f"federated.{name} must be positive, not {getattr(self, name)}")
        _require(self.messenger_scale in LADDER_FACTORS and self.messenger_max_scale in LADDER_FACTORS,
                 f"messenger_scale and messenger_max_scale must be ladder factors ({', '.join(map(str, LADDER_FACTORS))})")
        _require(self.messenger_scale <= self.messenger_max_scale, "messenger_scale must not exceed messenger_max_scale")
        _require(self.messenger_growth in ("none", "plateau"),
                 f"messenger_growth must be none or plateau, not {self.messenger_growth!r}")
        _require(self.messenger_patience >= 1 and self.distill_alpha >= 0,
                 "messenger_patience must be at least 1 and distill_alpha at least 0")
        _require(self.pfedme_inner_steps >= 1, f"pfedme_inner_steps must be at least 1, not {self.pfedme_inner_steps}")
        try:
            re.compile(self.fedrep_head)
        except re.error as err:
            raise UserError(f"federated.fedrep_head {self.fedrep_head!r} is not a regular expression ({err})") from None


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: evaluation and checkpoint cadence."""

    eval_every: int = 5
    eval_windows: int = 4
    checkpoint_every: int = 10

    def __post_init__(self):
        for name in ("eval_every", "eval_windows", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"train.{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class EvalConfig:
    """HumanEval sampling and scoring: a sweep's ``[eval]`` and the flags of ``fedjax-code eval humaneval``."""

    n: int = 20                    # samples per problem
    k: tuple[int, ...] = (1, 10)   # pass@k reported for each k <= n
    problems: str | None = None    # a slice START:END of the 164 problems to sample (default: all)
    nll_problems: str = ":"        # problems whose canonical-solution NLL is computed (one forward pass each)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 384
    seed: int = 0
    timeout: float = 3.0           # seconds per completion in the sandbox
    workers: int = 0               # sandbox worker processes; 0: one per core
    slots: int = 64                # decode slots sampled together (continuous batching: models.decode)

    def __post_init__(self):
        _require(self.n >= 1 and self.max_new_tokens >= 1 and self.slots >= 1,
                 "eval.n, eval.max_new_tokens and eval.slots must be at least 1")
        _require(len(self.k) > 0 and all(isinstance(k, int) and k >= 1 for k in self.k),
                 f"every k of pass@k must be a positive integer, not {self.k}")
        _require(0 < self.top_p <= 1 and self.temperature >= 0, "eval.top_p must be in (0, 1] and temperature >= 0")
        _require(self.timeout > 0 and self.workers >= 0, "eval.timeout must be positive and eval.workers >= 0")
        for name in ("problems", "nll_problems"):
            value = getattr(self, name)
            _require(value is None or _is_slice(value),
                     f"eval.{name} must look like START:END (for example 0:40), not {value!r}")


def _is_slice(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 2 and all(p.strip().lstrip("-").isdigit() or not p.strip() for p in parts)


@dataclass(frozen=True)
class TuneConfig:
    """A sweep's ``[tune]``: the per-scale learning-rate protocol (``experiments.tuning``); off when empty."""

    client_lr: tuple[float, ...] = ()  # candidate client learning rates
    fraction: float = 0.25             # each trial's share of the cell's budget
    partition: str = "iid"             # the partition the trials train on

    def __post_init__(self):
        _require(all(lr > 0 for lr in self.client_lr), f"every tune.client_lr must be positive, not {self.client_lr}")
        _require(0 < self.fraction <= 1, f"tune.fraction must be in (0, 1], not {self.fraction}")


@dataclass(frozen=True)
class ReportConfig:
    """A sweep's ``[report]``."""

    target_loss: float = 5.0  # rounds_to_target: the first round at or below this held-out loss
    bootstrap: int = 1000     # resamples for the confidence intervals

    def __post_init__(self):
        _require(self.bootstrap >= 1, f"report.bootstrap must be at least 1, not {self.bootstrap}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole training run. TOML sections: [data] [model] [federated] [train]; ``seed`` at top level.

    ``[data]`` takes the DataConfig keys (corpus and tokenizer) and the PartitionConfig keys.
    """

    seed: int = 0
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelSection = ModelSection()
    federated: FederatedConfig = FederatedConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        """The TOML-shaped dict (``partition`` keys folded into ``data``)."""
        d = dataclasses.asdict(self)
        d["data"].update(d.pop("partition"))
        return d


_SECTIONS = {"model": ModelSection, "federated": FederatedConfig, "train": TrainConfig}


def _coerce(key: str, value, default, annotation: str = ""):
    """Check a TOML value against the field's default type (ints are accepted for floats); an optional field
    (default None) takes a string, or a boolean when annotated ``bool | None``."""
    if isinstance(default, tuple):
        item = (str,) if default and isinstance(default[0], str) else (int, float)
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif isinstance(default, bool) or default is None:
        allowed = bool if isinstance(default, bool) else (bool, type(None)) if str(annotation).startswith("bool") \
            else (str, type(None))
        ok = isinstance(value, allowed)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    kind = (f"a list of {'strings' if default and isinstance(default[0], str) else 'numbers'}"
            if isinstance(default, tuple) else "a boolean" if str(annotation).startswith("bool")
            else "a string" if default is None else type(default).__name__)
    _require(ok, f"{key} must be {kind}, not {value!r}")
    return value


def build_section(cls, section: str, values: dict):
    """``cls`` from a TOML section's values: unknown keys and ill-typed values are refused with one sentence."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    _require(not unknown, f"unknown key {section}.{unknown[0] if unknown else ''} (known: {', '.join(sorted(fields))})")
    return cls(**{k: _coerce(f"{section}.{k}", v, fields[k].default, fields[k].type) for k, v in values.items()})


def experiment_from_dict(d: dict) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a TOML-shaped dict."""
    known = {"seed", "data", *_SECTIONS}
    unknown = sorted(set(d) - known)
    _require(not unknown, f"unknown section or key {unknown[0] if unknown else ''!r} (known: {', '.join(sorted(known))})")
    data = dict(d.get("data", {}))
    partition_keys = {f.name for f in dataclasses.fields(PartitionConfig)}
    data_keys = partition_keys | {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - data_keys)
    _require(not unknown, f"unknown key data.{unknown[0] if unknown else ''} (known: {', '.join(sorted(data_keys))})")
    partition = {k: data.pop(k) for k in list(data) if k in partition_keys}
    return ExperimentConfig(
        seed=_coerce("seed", d.get("seed", 0), 0),
        data=build_section(DataConfig, "data", data),
        partition=build_section(PartitionConfig, "data", partition),
        **{name: build_section(cls, name, d.get(name, {})) for name, cls in _SECTIONS.items()},
    )


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as dirichlet


def apply_overrides(d: dict, overrides: list[str], max_depth: int = 2) -> dict:
    """Apply ``section.key=value`` (or ``key=value``) overrides to a TOML-shaped dict; returns a new dict.

    ``max_depth`` is the longest dotted path accepted (2 for a train config: ``section.key``).
    """
    d = copy.deepcopy(d)
    for item in overrides:
        path, _, text = item.partition("=")
        keys = [k.strip() for k in path.split(".")]
        _require("=" in item and all(keys) and len(keys) <= max_depth,
                 f"override {item!r} must look like {'.'.join(['section'] * (max_depth - 1) + ['key'])}=value")
        target = d
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            _require(isinstance(target, dict), f"{key} in override {item!r} is not a section")
        target[keys[-1]] = _parse_value(text.strip())
    return d


def load_experiment(path: str | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a TOML file (or start from the defaults), apply overrides, validate."""
    d = {}
    if path is not None:
        try:
            d = tomllib.loads(Path(path).read_text())
        except OSError:
            raise UserError(f"cannot read config file {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {path} is not valid TOML ({err})") from None
    return experiment_from_dict(apply_overrides(d, list(overrides)))
