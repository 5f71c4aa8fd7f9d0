"""The helpers the backends share: tokenization rules, scoring layout, token strings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from thresher.generators.backend_common import (
    PromptEncoder,
    StopScanner,
    TokenStrings,
    candidate_row,
    finish_reason,
    logprob_value,
    normalize_piece,
    parse_token_id,
    resolve_single_tokens,
    score_positions,
    top_k_pairs,
    trim_at_stop,
    truncate_pair,
)
from thresher.generators.base import ModelError, NotSingleTokenError


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from thresher.generators.embedded import resolve_embedded

    return AutoTokenizer.from_pretrained(resolve_embedded(name).path, local_files_only=True)


@pytest.fixture(scope="module")
def smol_tok():
    return _tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma_tok():
    return _tokenizer("embedded:gemma-3-270m")


# --------------------------------------------------------------------------- PromptEncoder


def test_encoder_without_default_bos(smol_tok):
    enc = PromptEncoder(smol_tok)
    assert enc.prefix_ids == []  # SmolLM2 adds no BOS by default
    chat = smol_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    (ids,) = enc.encode_prompts([chat])
    assert ids[0] == enc.bos_id == smol_tok.convert_tokens_to_ids("<|im_start|>")  # special string parsed
    assert enc.encode_continuations(["Hello there"]) == [smol_tok("Hello there", add_special_tokens=False)["input_ids"]]
    assert enc.start_ids() == [enc.bos_id]  # an empty prompt is given BOS
    assert enc.server_text(chat) == chat  # nothing to strip when the server adds no BOS


def test_encoder_with_default_bos_never_doubles_it(gemma_tok):
    enc = PromptEncoder(gemma_tok)
    bos = gemma_tok.bos_token_id
    assert enc.prefix_ids == [bos]
    plain, spelled = enc.encode_prompts(["The sky is", gemma_tok.bos_token + "The sky is"])
    assert plain == spelled and plain[0] == bos and plain[1] != bos
    assert plain[1:] == gemma_tok("The sky is", add_special_tokens=False)["input_ids"]
    # a server that adds BOS itself must not get it spelled out too
    assert enc.server_text(gemma_tok.bos_token + "x") == "x"
    assert enc.encode_continuations(["blue"])[0][0] != bos


def test_encoder_matches_hf_backend(smollm2_backend, gemma_backend):
    """The rules are the hf backend's: the same ids for the same texts."""
    texts = ["", "plain text", "<|im_start|>user\nHi<|im_end|>\n", "<bos>Hi", "  spaces  ", "1"]
    for backend in (smollm2_backend, gemma_backend):
        ours = PromptEncoder(backend.tokenizer)
        assert ours.encode_prompts(texts) == backend.encode_prompts(texts)
        assert ours.encode_continuations(texts) == backend.encode_continuations(texts)
        digits = [str(d) for d in range(1, 7)] + ["A", " zebra"]
        assert resolve_single_tokens(backend.tokenizer, digits) == backend.resolve_single_tokens(digits)


def test_resolve_single_tokens(smol_tok, gemma_tok):
    ids = resolve_single_tokens(smol_tok, ["1", "6", "A", " zebra"])
    assert [smol_tok.decode([i]) for i in ids] == ["1", "6", "A", " zebra"]
    # Gemma (SentencePiece) digits are single tokens too
    assert len(resolve_single_tokens(gemma_tok, [str(d) for d in range(1, 7)])) == 6
    with pytest.raises(NotSingleTokenError, match="'hello world' is not a single token"):
        resolve_single_tokens(smol_tok, ["1", "hello world"], "smollm2")


# --------------------------------------------------------------------------- scoring layout


def test_truncate_pair():
    assert truncate_pair([1, 2], [3, 4], None) == ([1, 2], [3, 4], False)
    assert truncate_pair([1, 2], [3, 4], 4) == ([1, 2], [3, 4], False)
    assert truncate_pair([1, 2], [3, 4, 5], 3) == ([1, 2], [3], True)
    assert truncate_pair([1, 2, 3], [4], 2) == ([1, 2], [], True)


def test_score_positions_reads_vllm_layout():
    lp = lambda v: SimpleNamespace(logprob=v)  # vLLM's Logprob
    seq = [5, 6, 7, 8]
    entries = [None, {6: lp(-0.5), 9: lp(-0.1)}, {7: lp(-1.5)}, -2.5]  # dicts, a float
    s = score_positions(seq, 2, entries, truncated=True)
    assert s.token_ids == [7, 8] and s.token_logprobs == [-1.5, -2.5] and s.truncated
    assert math.isclose(s.mean, -2.0)


@pytest.mark.parametrize(
    "entries, match",
    [
        ([None, {9: -1.0}, {7: -1.0}], "token 6 missing"),
        ([None, {6: None}, {7: -1.0}], "no log-probability"),
        ([None, {6: -1.0}], "did not return prompt log-probs"),
    ],
)
def test_score_positions_never_defaults(entries, match):
    with pytest.raises(ModelError, match=match):
        score_positions([5, 6, 7], 1, entries)


def test_score_positions_needs_a_prompt():
    with pytest.raises(ModelError, match="give it a prompt"):
        score_positions([5, 6], 0, [None, -1.0])


def test_top_k_pairs_drops_the_extra_sampled_entry():
    entry = {3: -0.1, 8: -2.0, 1: -0.5, 4: -0.5}  # k=3 plus the sampled token
    assert top_k_pairs(entry, 3) == [(3, -0.1), (1, -0.5), (4, -0.5)]  # ties by id
    assert logprob_value(SimpleNamespace(logprob=-1.25)) == -1.25
    with pytest.raises(ModelError):
        logprob_value(None)


def test_trim_at_stop_and_finish_reason():
    assert trim_at_stop("a\nb###c", ["###", "\n"]) == ("a", True)
    assert trim_at_stop("abc", ["x", ""]) == ("abc", False)
    assert finish_reason("length") == "length"
    assert finish_reason("length", stopped_here=True) == "stop"
    assert finish_reason("eos") == finish_reason(None) == finish_reason("stop") == "stop"


STOP_TEXTS = [
    "Hello world. How are you?\n\nFine, thanks.",
    "Les élèves ont mangé des crêpes ; 東京は日本の首都です。 🍣🍜 done.",
    "<|im_start|>assistant\nAnswer: 42<|im_end|> and then more text",
    "   spaced    out\ttabs\nnew lines ### end ###",
    "emoji 👩‍👩‍👧 family then ok",
]
STOPS = [(".",), ("\n\n", "?"), ("###",), ("首都",), ("🍜",), ("out\tt",), ("ok",), ("zzz",), ("42<",)]


@pytest.mark.parametrize("tok_name", ["smol_tok", "gemma_tok"])
def test_stop_scanner_finds_stops_where_a_full_decode_does(tok_name, request):
    """Token by token, the scanner fires at the first token whose full decoded text contains a stop."""
    tok = request.getfixturevalue(tok_name)
    checked = 0
    for text in STOP_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for stops in STOPS:
            scanner = StopScanner(tok, stops, rows=2)
            fired = next((t + 1 for t, tid in enumerate(ids) if scanner.push(1, tid)), None)
            full = next((t for t in range(1, len(ids) + 1)
                         if trim_at_stop(tok.decode(ids[:t], skip_special_tokens=True), stops)[1]), None)
            assert fired == full, (text, stops, fired, full)
            checked += full is not None
    assert checked >= 8  # pairs that do stop somewhere


# --------------------------------------------------------------------------- token strings


def test_token_strings_map_only_unambiguous_strings(smol_tok):
    ts = TokenStrings(smol_tok)
    zebra = smol_tok(" zebra", add_special_tokens=False)["input_ids"][0]
    assert ts.lookup(" zebra") == zebra and ts.is_unique(zebra)
    assert ts.lookup("token_id:17") == 17  # vLLM's return_tokens_as_token_ids
    assert ts.lookup("\ufffd") is None and ts.lookup("") is None  # partial UTF-8 bytes
    assert ts.lookup("no such token string at all") is None
    # every byte token of a multi-byte character is unmappable, never guessed
    partial = [i for i, p in enumerate(ts.pieces) if "\ufffd" in p]
    assert partial and not any(ts.is_unique(i) for i in partial)


def test_small_helpers():
    assert parse_token_id("token_id:42") == 42
    assert parse_token_id("token_id:x") is None and parse_token_id("42") is None
    assert normalize_piece("a\ufffdb") == "ab"
    row, missing = candidate_row({4: -1.0, 9: -2.0}, [9, 5, 4])
    assert row[0] == -2.0 and math.isnan(row[1]) and row[2] == -1.0 and missing == [1]
