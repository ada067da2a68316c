"""Byte-level BPE tokenizer trained with ``tokenizers``, saved as an HF fast tokenizer.

Byte-level BPE (Radford et al. 2019) covers every byte, so any source text,
tabs and trailing whitespace included, decodes back exactly. Special tokens:
``<|pad|>`` (id 0), ``<|bos|>`` (1), ``<|eos|>`` (2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedjax_code.errors import UserError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIALS = [PAD, BOS, EOS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192):
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def load_tokenizer(path: str | Path):
    """Load an HF tokenizer (a directory, ours or any other, or a hub id) with ``AutoTokenizer``."""
    try:
        return AutoTokenizer.from_pretrained(str(path), clean_up_tokenization_spaces=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer {str(path)!r}: it is not a tokenizer directory and the hub "
                        f"has no such id or cannot be reached ({str(err).splitlines()[0]})") from None


def tokenizer_sha256(tokenizer) -> str:
    """A short hash of what a tokenizer does: its vocabulary, merges, normalisation and splitting rules, and its
    special tokens; the same for a tokenizer and its ``save_pretrained``/``load_tokenizer`` round trip."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps({"backend": backend, "special": special}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def special_ids(tokenizer) -> tuple[int, int]:
    """(bos, eos) ids; a tokenizer without BOS uses its EOS for both."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    return bos, eos


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(tokenizer, texts: list[str], prompts: list[str] | None = None, prefix: list[int] | None = None
                     ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Each text as ``prefix ids [EOS]`` (batched in Rust, no special tokens added by the tokenizer; ``prefix``
    defaults to [BOS]), and, given each text's prompt (a prefix of it), a uint8 loss mask per document: 1 on
    the tokens that end past the prompt (the completion, a token straddling the boundary included) and on
    EOS, 0 on the prefix and the prompt."""
    bos, eos = special_ids(tokenizer)
    prefix = [bos] if prefix is None else list(prefix)
    dtype = token_dtype(len(tokenizer))
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    docs = [np.array([*prefix, *e.ids, eos], dtype=dtype) for e in encodings]
    if prompts is None:
        return docs, None
    masks = [np.array([0] * len(prefix) + [end > len(p) for _, end in e.offsets] + [1], np.uint8)
             for e, p in zip(encodings, prompts)]
    return docs, masks
