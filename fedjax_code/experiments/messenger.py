"""The knowledge messengers' models in a run: the messenger's size on the ladder, its growth, and the hooks the
algorithm (``federated.algorithms.messengers``) is built from."""

from __future__ import annotations

import dataclasses

import jax

from fedjax_code import federated as fl
from fedjax_code.config import ExperimentConfig
from fedjax_code.errors import UserError
from fedjax_code.experiments.components import model_config
from fedjax_code.models import ModelConfig, init_params, logits, lora
from fedjax_code.models.grow import grow


def messenger_config(cfg: ExperimentConfig, vocab_size: int, factor: float) -> ModelConfig:
    """The messenger at ``factor`` of ``model.base``'s ladder: a full decoder (no LoRA) on the run's vocabulary."""
    model = dataclasses.replace(cfg.model, scale=factor, lora_rank=0, pretrained=None)
    return model_config(dataclasses.replace(cfg, model=model), vocab_size)


class Messenger:
    """The run's messenger: its current ladder factor and growth rule (``fl.Plateau``), both checkpointed."""

    def __init__(self, cfg: ExperimentConfig, private: ModelConfig, vocab_size: int):
        if cfg.model.pretrained and not private.lora_rank:
            raise UserError("messengers on a pretrained model need LoRA private models (set model.lora_rank)")
        self.cfg, self.private, self.vocab_size = cfg, private, vocab_size
        self.factor, self.plateau = cfg.federated.messenger_scale, fl.Plateau()

    @property
    def max_factor(self) -> float:
        """It grows up to ``messenger_max_scale``, and never past a from-scratch private model's ``model.scale``."""
        f, m = self.cfg.federated, self.cfg.model
        return f.messenger_max_scale if m.pretrained else min(f.messenger_max_scale, m.scale)

    @property
    def config(self) -> ModelConfig:
        return messenger_config(self.cfg, self.vocab_size, self.factor)

    def init(self) -> dict:
        return init_params(self.config, jax.random.PRNGKey(self.cfg.seed))

    def models(self, base) -> fl.Models:
        """The algorithm's hooks: private models are the run's model (adapters on ``base`` for LoRA), each
        initialised from its client's key; the messenger's logits follow its current size."""
        private = self.private

        def init_private(key):
            return lora.init_adapters(private, key) if private.lora_rank else init_params(private, key)

        return fl.Models(private_logits=lambda p, t: logits(private, lora.join(base, p), t),
                         messenger_logits=lambda p, t: logits(self.config, p, t), init_private=init_private,
                         seed=self.cfg.seed)

    def after_eval(self, params, eval_loss: float):
        """The messenger's params after an evaluation: grown one ladder step (Net2Net, the same function) when the
        rule says so, else None."""
        f = self.cfg.federated
        if f.messenger_growth == "none" or self.factor >= self.max_factor:
            return None
        self.plateau, now = self.plateau.update(eval_loss, f.messenger_patience)
        if not now:
            return None
        src = self.config
        self.factor *= 2
        return grow(jax.device_get(params), src, self.config)

    def state(self) -> dict:
        """What a checkpoint records (and `restore` reads back)."""
        best = self.plateau.best
        return {"messenger_scale": self.factor, "plateau": [None if best == float("inf") else best, self.plateau.stale]}

    def restore(self, meta: dict) -> None:
        self.factor = meta["messenger_scale"]
        best, stale = meta["plateau"]
        self.plateau = fl.Plateau(float("inf") if best is None else best, stale)
