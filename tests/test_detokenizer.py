"""Tests for albireo.engine.detokenizer.IncrementalDetokenizer on two tiny tokenizers built here.

* ``byte_level``: GPT-2 style ByteLevel BPE; characters outside ASCII are split over byte tokens.
* ``metaspace``: Llama style BPE on "▁"-joined text with ``byte_fallback`` and ``<0x00>``..``<0xFF>``
  in the vocabulary, decoded by Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from albireo.engine.detokenizer import IncrementalDetokenizer
from albireo.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld 日本語 😀 hello world",
    "the quick brown fox jumps over the lazy dog",
    "hello there, general kenobi. STOP here.",
    "naïve café résumé über straße",
] * 3

# Ω ≈ ç 🚀 are absent from CORPUS, so the metaspace tokenizer spells them with byte tokens.
MULTIBYTE_TEXTS = [
    "héllo wörld 日本語 😀",
    "naïve Ω≈ç 🚀 hello\nworld",
    "😀😀 語 x 🚀🚀",
]


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Learn merges on a plain BPE, then rebuild the vocabulary Llama style: specials, then the 256
    # byte tokens as ordinary (non-special) tokens, then the learned pieces.
    base = Tokenizer(models.BPE())
    base.normalizer = normalizer
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers_by_name() -> dict[str, PreTrainedTokenizerFast]:
    return {"byte_level": _byte_level_tokenizer(), "metaspace": _metaspace_tokenizer()}


@pytest.fixture(scope="module")
def byte_level(tokenizers_by_name) -> PreTrainedTokenizerFast:
    return tokenizers_by_name["byte_level"]


@pytest.fixture(scope="module")
def metaspace(tokenizers_by_name) -> PreTrainedTokenizerFast:
    return tokenizers_by_name["metaspace"]


@pytest.fixture(params=["byte_level", "metaspace"])
def tokenizer(request, tokenizers_by_name) -> PreTrainedTokenizerFast:
    return tokenizers_by_name[request.param]


@pytest.fixture(params=[True, False], ids=["decode_stream", "python"])
def use_decode_stream(request) -> bool:
    return request.param


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(det: IncrementalDetokenizer, ids: list[int], step: int = 1) -> tuple[list[str], list[str | None]]:
    """Feed ``ids`` ``step`` at a time; return the deltas (final one included) and update results."""
    deltas, stops = [], []
    for i in range(0, len(ids), step):
        stops.append(det.update(ids[i : i + step]))
        deltas.append(det.take_delta())
    deltas.append(det.take_delta(final=True))
    return deltas, stops


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_deltas_concatenate_to_full_decode_one_token_at_a_time(tokenizer, use_decode_stream, text):
    ids = encode(tokenizer, text)
    det = IncrementalDetokenizer(tokenizer, [5, 6], SamplingParams(), use_decode_stream=use_decode_stream)
    deltas, _ = stream(det, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert det.output_text == text


@pytest.mark.parametrize("step", [2, 3, 100])
def test_deltas_concatenate_to_full_decode_with_several_tokens_per_update(tokenizer, use_decode_stream, step):
    text = " ".join(MULTIBYTE_TEXTS)
    ids = encode(tokenizer, text)
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams(), use_decode_stream=use_decode_stream)
    deltas, _ = stream(det, ids, step=step)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_no_replacement_char_in_any_delta_for_split_characters(tokenizer, use_decode_stream):
    text = " ".join(MULTIBYTE_TEXTS)
    ids = encode(tokenizer, text)
    # Precondition: some characters really are split, so a token decoded alone gives U+FFFD.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams(), use_decode_stream=use_decode_stream)
    deltas, _ = stream(det, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text


def test_metaspace_text_goes_through_byte_fallback_tokens(metaspace):
    tokens = metaspace.convert_ids_to_tokens(encode(metaspace, "Ω≈ç 🚀"))
    assert {"<0xCE>", "<0xA9>", "<0xF0>", "<0x9F>"} <= set(tokens)


@pytest.mark.parametrize("text", ["hello world", "  two spaces first", "Ω first"])
def test_metaspace_first_token_leading_space_matches_decode_of_output_ids(metaspace, use_decode_stream, text):
    prompt = encode(metaspace, "say")
    ids = encode(metaspace, text)
    assert metaspace.convert_ids_to_tokens(ids)[0].startswith("▁")
    det = IncrementalDetokenizer(metaspace, prompt, SamplingParams(), use_decode_stream=use_decode_stream)
    deltas, _ = stream(det, ids)
    assert deltas[0] == metaspace.decode(ids[:1])
    assert "".join(deltas) == metaspace.decode(ids) == text


def test_random_text_streams_to_full_decode(tokenizer, use_decode_stream):
    rng = random.Random(1234)
    alphabet = list("abc xyz\n.,") + list("éöïß日本語😀🚀Ω≈ç") + ["  "]
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = encode(tokenizer, text)
        if rng.random() < 0.3:  # add a special token where it does not split a character
            with_eos = list(ids)
            with_eos.insert(rng.randrange(len(ids) + 1), tokenizer.eos_token_id)
            if "\ufffd" not in tokenizer.decode(with_eos):
                ids = with_eos
        skip = rng.random() < 0.5
        params = SamplingParams(skip_special_tokens=skip)
        det = IncrementalDetokenizer(tokenizer, [], params, use_decode_stream=use_decode_stream)
        deltas, _ = stream(det, ids, step=rng.randint(1, 3))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip), (text, ids)


def test_random_ids_never_raise_and_match_decode_when_valid_utf8(tokenizer, use_decode_stream):
    rng = random.Random(99)
    for _ in range(150):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 12))]
        det = IncrementalDetokenizer(tokenizer, [], SamplingParams(), use_decode_stream=use_decode_stream)
        deltas, _ = stream(det, ids, step=rng.randint(1, 3))
        assert "".join(deltas) == det.output_text
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in full:
            assert det.output_text == full, ids


def test_incomplete_character_at_end_is_held_until_final_flush(byte_level, use_decode_stream):
    ids = encode(byte_level, "ab 😀")
    truncated = ids[:-2]  # cut the emoji's bytes short: it can never complete
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(), use_decode_stream=use_decode_stream)
    for i in truncated:
        det.update([i])
        assert "\ufffd" not in det.take_delta()
    assert "\ufffd" not in det.output_text
    final = det.take_delta(final=True)
    assert final.startswith("\ufffd")
    assert det.output_text == byte_level.decode(truncated)


def test_switches_to_python_path_when_decode_stream_raises(tokenizer):
    class FailingStream:
        def step(self, _tokenizer, _id):
            raise Exception("Invalid prefix encountered while decoding stream")

    text = " ".join(MULTIBYTE_TEXTS)
    ids = encode(tokenizer, text)
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    half = len(ids) // 2
    deltas = []
    for i in ids[:half]:
        det.update([i])
        deltas.append(det.take_delta())
    det._stream = FailingStream()
    for i in ids[half:]:
        det.update([i])
        deltas.append(det.take_delta())
    deltas.append(det.take_delta(final=True))
    assert det._stream is None
    assert "".join(deltas) == text


def test_tokenizer_without_rust_backend_uses_its_decode(byte_level):
    class DecodeOnly:  # e.g. a slow (pure Python) tokenizer
        def decode(self, ids, skip_special_tokens=False):
            return byte_level.decode(ids, skip_special_tokens=skip_special_tokens)

    text = MULTIBYTE_TEXTS[0]
    det = IncrementalDetokenizer(DecodeOnly(), [], SamplingParams())
    deltas, _ = stream(det, encode(byte_level, text))
    assert det._stream is None
    assert "".join(deltas) == text


# ---------------------------------------------------------------- special tokens


def test_skip_special_tokens_true_drops_special_tokens(byte_level, use_decode_stream):
    ids = encode(byte_level, "hi") + [byte_level.eos_token_id] + encode(byte_level, " yo")
    params = SamplingParams(skip_special_tokens=True)
    det = IncrementalDetokenizer(byte_level, [], params, use_decode_stream=use_decode_stream)
    deltas, _ = stream(det, ids)
    assert "".join(deltas) == det.output_text == "hi yo"


def test_skip_special_tokens_false_keeps_special_tokens_in_text(tokenizer, use_decode_stream):
    ids = encode(tokenizer, "hi") + [tokenizer.eos_token_id] + encode(tokenizer, " yo")
    params = SamplingParams(skip_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, [], params, use_decode_stream=use_decode_stream)
    deltas, _ = stream(det, ids)
    assert tokenizer.eos_token in det.output_text
    assert "".join(deltas) == det.output_text == tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- stop strings

KENOBI = "hello there, general kenobi. STOP here."


def test_stop_string_is_removed_and_reported(byte_level, use_decode_stream):
    ids = encode(byte_level, KENOBI)
    params = SamplingParams(stop=["STOP"])
    det = IncrementalDetokenizer(byte_level, [], params, use_decode_stream=use_decode_stream)
    deltas, stops = stream(det, ids)
    assert [s for s in stops if s is not None] == ["STOP"]
    assert det.stop_reason == "STOP"
    assert det.output_text == "hello there, general kenobi. "
    assert "".join(deltas) == det.output_text


def test_stop_string_spanning_two_tokens_is_detected(byte_level, use_decode_stream):
    ids = encode(byte_level, "hello world")
    stop = "o w"
    assert not any(stop in byte_level.decode([i]) for i in ids)  # precondition: split over tokens
    params = SamplingParams(stop=[stop])
    det = IncrementalDetokenizer(byte_level, [], params, use_decode_stream=use_decode_stream)
    deltas, stops = stream(det, ids)
    assert stop in stops
    assert det.output_text == "hell"
    assert "".join(deltas) == "hell"


def test_stop_string_made_of_byte_fallback_tokens_is_detected(metaspace, use_decode_stream):
    ids = encode(metaspace, "naïve Ω≈ç 🚀")
    params = SamplingParams(stop=["≈"])
    det = IncrementalDetokenizer(metaspace, [], params, use_decode_stream=use_decode_stream)
    deltas, stops = stream(det, ids)
    assert "≈" in stops
    assert det.output_text == "naïve Ω"
    assert "".join(deltas) == "naïve Ω"


def test_include_stop_str_in_output_keeps_stop_string(byte_level, use_decode_stream):
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    det = IncrementalDetokenizer(byte_level, [], params, use_decode_stream=use_decode_stream)
    deltas, stops = stream(det, encode(byte_level, KENOBI))
    assert "STOP" in stops
    assert det.output_text == "hello there, general kenobi. STOP"
    assert "".join(deltas) == det.output_text


def test_earliest_stop_string_wins_within_one_update(byte_level):
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["kenobi", "there"]))
    assert det.update(encode(byte_level, KENOBI)) == "there"
    assert det.output_text == "hello "


def test_updates_after_stop_are_ignored(byte_level):
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["there"]))
    assert det.update(encode(byte_level, "hello there")) == "there"
    assert det.update(encode(byte_level, " more")) is None
    assert det.output_text == "hello "


def test_take_delta_holds_back_partial_stop_prefix_and_releases_it_when_not_a_stop(byte_level):
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["STOP"]))
    assert det.update(encode(byte_level, "hello ST")) is None
    assert det.take_delta() == "hello "
    assert det.output_text == "hello ST"
    assert det.update(encode(byte_level, "ale")) is None
    assert det.take_delta() == "STale"


def test_take_delta_holds_back_the_longest_prefix_of_any_stop(byte_level):
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["xyz", "abcd"]))
    det.update(encode(byte_level, "q abc"))
    assert det.take_delta() == "q "


def test_take_delta_final_releases_held_back_text(byte_level):
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["STOP"]))
    det.update(encode(byte_level, "hello ST"))
    assert det.take_delta() == "hello "
    assert det.take_delta(final=True) == "ST"
    assert det.take_delta(final=True) == ""


def test_stop_string_completed_over_several_updates_is_found(byte_level, use_decode_stream):
    # Each piece is encoded on its own, so the stop arrives split over separate updates.
    pieces = ["well gen", "er", "al kenobi"]
    params = SamplingParams(stop=["general"])
    det = IncrementalDetokenizer(byte_level, [], params, use_decode_stream=use_decode_stream)
    results, deltas = [], []
    for piece in pieces:
        results.append(det.update(encode(byte_level, piece)))
        deltas.append(det.take_delta())
    assert results == [None, None, "general"]
    assert deltas == ["well ", "", ""]
    assert det.output_text == "well "
