"""data_prep.train_tokenizer: exact round trips, special tokens, the chat template's assistant mask, errors."""

from __future__ import annotations

import json
import os

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from data_prep.artifacts import UserError
from data_prep.train_tokenizer import (
    BOS,
    END_OF_TURN,
    EOS,
    PAD,
    ROLE_MARKERS,
    SPECIAL_TOKENS,
    TokenizerArguments,
    bytes_per_token,
    load_tokenizer,
    train_tokenizer,
)

KINDS = ["byte_level_bpe", "spm_unigram", "spm_bpe"]

ROUND_TRIP = (
    "Hello, 世界! 中文分词测试。 Emoji: 👩‍👩‍👧 👨🏽‍💻 🏳️‍🌈 👍\n"
    "def add(a,\tb):\n\treturn  a   +  b  # tabs and runs of spaces\n\n\n"
    "    indented = {'k': [1, 2, 3]}\r\n"
    "Привет, мир! Ёлка. Café, naïve, résumé, Ångström, e\u0301 (combining), ß, Æ, ñ.\n"
    "  leading and trailing spaces  "
)

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And in Chinese?"},
    {"role": "assistant", "content": "Answer: 四\n\tdone."},
]


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tiny_data, tmp_path_factory):
    """(kind, tokenizer dir, manifest): the shared byte-level BPE, plus SentencePiece unigram and BPE."""
    kind = request.param
    if kind == "byte_level_bpe":
        path = tiny_data["tokenizer"]
        manifest = json.loads((path / "manifest.json").read_text())
    else:
        path = tmp_path_factory.mktemp(kind) / "tokenizer"
        manifest = train_tokenizer(TokenizerArguments(
            corpus_dir=str(tiny_data["corpus"]), output_dir=str(path), kind="sentencepiece",
            spm_model_type=kind.removeprefix("spm_"), vocab_size=512, max_training_docs=20,
        ))
    return kind, path, manifest


@pytest.fixture(scope="module")
def tokenizer(trained):
    return AutoTokenizer.from_pretrained(str(trained[1]))


def masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_round_trip_is_exact(tokenizer):
    ids = tokenizer.encode(ROUND_TRIP, add_special_tokens=False)
    assert tokenizer.decode(ids) == ROUND_TRIP
    if tokenizer.unk_token_id is not None:
        assert tokenizer.unk_token_id not in ids, "byte fallback should leave nothing unknown"
    for line in ROUND_TRIP.split("\n"):
        assert tokenizer.decode(tokenizer.encode(line, add_special_tokens=False)) == line


def test_vocab_size_and_special_tokens(trained, tokenizer):
    _, _, manifest = trained
    assert len(tokenizer) == manifest["options"]["vocab_size"] == manifest["outputs"]["vocab_size"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    markers = [END_OF_TURN, *ROLE_MARKERS.values()]
    assert set(markers) == {"<|end|>", "<|system|>", "<|user|>", "<|assistant|>"}
    ids = {}
    for token in [BOS, EOS, PAD, *markers]:
        encoded = tokenizer.encode(f"x{token}y", add_special_tokens=False)
        ids[token] = tokenizer.convert_tokens_to_ids(token)
        assert encoded.count(ids[token]) == 1, f"{token} must be one id"
        assert tokenizer.added_tokens_decoder[ids[token]].special
        assert token in tokenizer.all_special_tokens
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    text = "a<|user|>b<|end|>c"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True) == "abc"


def test_byte_level_bpe_uses_gpt2_pre_tokenizer(tiny_data):
    spec = json.loads((tiny_data["tokenizer"] / "tokenizer.json").read_text())
    pre = spec["pre_tokenizer"]
    assert pre["type"] == "ByteLevel" and pre["use_regex"] is True and pre["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    backend = AutoTokenizer.from_pretrained(str(tiny_data["tokenizer"])).backend_tokenizer
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str("Hello world's  test 123")]
    assert words == ["Hello", "Ġworld", "'s", "Ġ", "Ġtest", "Ġ123"]  # GPT-2's split, no prefix space


def test_chat_template_masks_exactly_the_assistant_turns(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == rendered
    assert ids[0] == tokenizer.bos_token_id
    assistant = [m["content"] + END_OF_TURN for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in masked_runs(ids, mask)] == assistant
    # Everything outside the mask is the prompt side: system/user turns and the role headers.
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    prompt_side = rendered
    for text in assistant:
        prompt_side = prompt_side.replace(text, "", 1)
    assert unmasked == prompt_side
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in unmasked


def test_assistant_mask_when_reply_starts_outside_the_vocab(trained, tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "👩‍👩‍👧 世界"}]
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    runs = masked_runs(out["input_ids"], out["assistant_masks"])
    assert [tokenizer.decode(run) for run in runs] == ["👩‍👩‍👧 世界" + END_OF_TURN]


def test_generation_prompt_and_unknown_role(tokenizer):
    prompt = CONVERSATION[:2]
    plain = tokenizer.apply_chat_template(prompt, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert with_prompt == plain + "<|assistant|>\n"
    system, user = CONVERSATION[0]["content"], CONVERSATION[1]["content"]
    assert plain == f"{BOS}<|system|>\n{system}<|end|>\n<|user|>\n{user}<|end|>\n"
    with pytest.raises(Exception, match="unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_manifest_reports_compression(trained, tokenizer, tiny_data):
    _, _, manifest = trained
    validation = list(load_from_disk(str(tiny_data["corpus"]))["validation"]["text"])
    reported = manifest["outputs"]["bytes_per_token_validation"]
    assert reported > 1
    assert reported == pytest.approx(bytes_per_token(tokenizer, validation), abs=1e-4)
    corpus_manifest = json.loads((tiny_data["corpus"] / "manifest.json").read_text())
    assert manifest["inputs"]["corpus_fingerprint"] == corpus_manifest["fingerprint"]


# ----------------------------------------------------------------------------- bad input
def test_vocab_size_below_specials_plus_bytes(tiny_data, tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(UserError, match="vocab_size 262") as err:
        train_tokenizer(TokenizerArguments(corpus_dir=str(tiny_data["corpus"]), output_dir=str(out), vocab_size=262))
    assert str(len(SPECIAL_TOKENS) + 256) in str(err.value)
    assert not out.exists()


def test_sentencepiece_vocab_too_small_for_corpus_is_a_user_error(tiny_data, tmp_path):
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(TokenizerArguments(corpus_dir=str(tiny_data["corpus"]), output_dir=str(tmp_path / "t"),
                                           kind="sentencepiece", vocab_size=300, max_training_docs=20))


def test_missing_or_incomplete_corpus(tmp_path):
    out = tmp_path / "tok"
    missing = tmp_path / "no_corpus"
    with pytest.raises(UserError, match="not found") as err:
        train_tokenizer(TokenizerArguments(corpus_dir=str(missing), output_dir=str(out), vocab_size=512))
    assert str(missing) in str(err.value)
    missing.mkdir()
    with pytest.raises(UserError, match="incomplete"):
        train_tokenizer(TokenizerArguments(corpus_dir=str(missing), output_dir=str(out), vocab_size=512))
    assert not out.exists()


def test_unknown_kind(tiny_data, tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(TokenizerArguments(corpus_dir=str(tiny_data["corpus"]), output_dir=str(tmp_path / "t"),
                                           kind="wordpiece", vocab_size=512))
    assert not (tmp_path / "t").exists()


def test_load_tokenizer(tiny_data, tmp_path):
    with pytest.raises(UserError, match="not found or incomplete") as err:
        load_tokenizer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    assert tokenizer.decode(tokenizer.encode(ROUND_TRIP, add_special_tokens=False)) == ROUND_TRIP


@pytest.mark.parametrize("overrides, message", [
    ({"kind": "sentencepiece", "min_frequency": 3}, "min_frequency applies to byte_level_bpe only"),
    ({"min_frequency": 0}, "min_frequency must be >= 1, got 0"),
    ({"spm_model_type": "bpe"},  # byte-level BPE is BPE already; the option would change nothing
     "spm_model_type is only read with --kind sentencepiece, but kind is byte_level_bpe"),
    ({"max_training_docs": 0}, r"max_training_docs must be >= 1 \(or unset, for all\), got 0"),
    ({"model_max_length": 0}, "model_max_length must be >= 2, got 0"),
])
def test_tokenizer_options_that_cannot_work_are_one_line(tiny_data, tmp_path, overrides, message):
    with pytest.raises(UserError, match=f"^{message}"):
        train_tokenizer(TokenizerArguments(corpus_dir=str(tiny_data["corpus"]), output_dir=str(tmp_path / "t"),
                                           **overrides))
    assert not (tmp_path / "t").exists()


def test_output_dir_that_is_the_corpus_is_refused(tiny_data, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_data["corpus"], corpus)
    with pytest.raises(UserError, match=f"^output_dir {corpus} is corpus_dir {corpus}: a stage replaces its whole"):
        train_tokenizer(TokenizerArguments(corpus_dir=str(corpus), output_dir=str(corpus)))
    assert sorted(os.listdir(corpus)) == sorted(os.listdir(tiny_data["corpus"]))


def test_min_frequency_changes_the_byte_level_merges(tiny_data, tmp_path):
    vocabularies = []
    for min_frequency in (2, 100_000):  # no pair is that frequent in the tiny corpus: bytes and specials only
        manifest = train_tokenizer(TokenizerArguments(corpus_dir=str(tiny_data["corpus"]), vocab_size=400,
                                                      output_dir=str(tmp_path / f"t{min_frequency}"),
                                                      min_frequency=min_frequency, max_training_docs=20))
        vocabularies.append(manifest["outputs"]["vocab_size"])
        assert manifest["options"]["min_frequency"] == min_frequency
    assert vocabularies == [400, len(SPECIAL_TOKENS) + 256]


def test_a_vocabulary_the_corpus_cannot_fill_is_reported_and_an_absurd_one_refused(tmp_path, capsys):
    """Byte-level BPE stops when no pair is left to merge: the manifest recorded the smaller vocabulary, but
    nothing said so. A vocab_size of 2**31 or more was an OverflowError traceback."""
    from data_prep import build_corpus, train_tokenizer as train_tokenizer_module

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"a short document number {i}, with few distinct pairs to merge")
    build_corpus.main(["--source", "local", "--input_paths", str(docs), "--output_dir", str(tmp_path / "corpus"),
                       "--validation_fraction", "0.25"])
    manifest = train_tokenizer_module.main(["--corpus_dir", str(tmp_path / "corpus"), "--output_dir",
                                            str(tmp_path / "t"), "--vocab_size", "4096"])
    learned = manifest["outputs"]["vocab_size"]
    assert learned < 4096
    assert (f"vocab {learned} (vocab_size 4096 asked: this corpus has merges for only {learned} tokens; add text or "
            "lower vocab_size)") in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^vocab_size must be below 2\*\*31, got 4294967296$"):
        train_tokenizer_module.main(["--corpus_dir", str(tmp_path / "corpus"), "--output_dir", str(tmp_path / "t2"),
                                     "--vocab_size", str(2**32)])
