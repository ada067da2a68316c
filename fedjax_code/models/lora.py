"""LoRA adapters (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on the one decoder.

A config with ``lora_rank`` r > 0 gives each projection in ``lora_targets`` two extra params, ``lora_a`` [in, r]
and ``lora_b`` [r, out] (``decoder.Linear``), computing W x + B A x * alpha / r without forming the merged
weight. Training keeps the two apart: ``split`` takes the adapters out of a param tree, the frozen base is
closed over, and ``join`` puts them back for ``Decoder.apply``; joining copies no array, so a cohort's
adapters stacked [C, ...] and vmapped all read the one base. ``merge`` folds the adapters into the kernels
(W + A B * alpha / r), giving a plain model for export or fast sampling. ``save_peft`` writes the adapters in
PEFT's format, which ``peft.PeftModel.from_pretrained`` loads onto the Hugging Face export of the base.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from fedjax_code.models.scales import ModelConfig

ADAPTER_LEAVES = ("lora_a", "lora_b")
PEFT_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def init_adapters(config: ModelConfig, key) -> dict:
    """Fresh adapters of ``config`` (``lora_a`` random, ``lora_b`` zero, as ``decoder.Linear`` makes them), without
    building the base: the jitted init returns only the adapters, so XLA drops the base's initialisation."""
    from fedjax_code.models.decoder import init_params

    return jax.jit(lambda k: split(init_params(config, k))[1])(key)


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the params without and with the ``lora_a``/``lora_b`` leaves, as nested dicts."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    adapters = {k: v for k, v in flat.items() if k[-1] in ADAPTER_LEAVES}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join(base: dict, adapters: dict) -> dict:
    """The full param tree of ``base`` and ``adapters`` (the inverse of ``split``; no array is copied)."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


def merge(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """(config without adapters, params with each adapted kernel replaced by W + A B * alpha / r)."""
    base, adapters = split(params)
    flat, lora = traverse_util.flatten_dict(base), traverse_util.flatten_dict(adapters)
    scale = config.lora_alpha / max(config.lora_rank, 1)
    for path, a in lora.items():
        if path[-1] == "lora_a":
            layer = path[:-1]
            flat[layer + ("kernel",)] = flat[layer + ("kernel",)] + (a @ lora[layer + ("lora_b",)]) * scale
    plain = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name.startswith("lora_")}
    return dataclasses.replace(config, **plain), traverse_util.unflatten_dict(flat)


def save_peft(adapters: dict, rank: int, alpha: float, path: Path, base_model: str) -> Path:
    """Write ``adapters`` as a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``) for the
    Hugging Face model ``base_model``; PEFT's weights are torch's [out, in]: lora_A [r, in], lora_B [out, r]."""
    from fedjax_code.models.hf import hf_module_name

    flat = traverse_util.flatten_dict(jax.device_get(adapters))
    tensors = {f"base_model.model.{hf_module_name(p[:-1])}.{PEFT_LEAVES[p[-1]]}.weight":
               np.ascontiguousarray(np.asarray(v, np.float32).T) for p, v in flat.items()}
    modules = sorted({p[-2] for p in flat})
    doc = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": rank, "lora_alpha": alpha, "target_modules": modules, "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
           "inference_mode": True}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(doc, indent=2) + "\n")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path
