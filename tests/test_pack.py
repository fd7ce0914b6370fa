"""data_prep.pack_dataset: packing loses and repeats nothing, tails are padded and masked, errors."""

from __future__ import annotations

import json
import math

import pytest
from datasets import load_from_disk

from data_prep.artifacts import UserError
from data_prep.pack_dataset import PackArguments, pack_blocks, pack_dataset
from data_prep.train_tokenizer import load_tokenizer

BLOCK_SIZE = 48
BATCH = 7  # documents per packing batch: many batches, so many padded tails


def test_pack_blocks_by_hand():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    packed = pack_blocks(docs, block_size=4, pad_id=0)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert packed["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]

    exact = pack_blocks([[1, 2], [3, 4, 5, 6]], block_size=3, pad_id=-1)
    assert exact == {"input_ids": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1, 1, 1], [1, 1, 1]]}

    long = pack_blocks([list(range(1, 12))], block_size=5, pad_id=99)
    assert long["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 99, 99, 99, 99]]
    assert sum(map(sum, long["attention_mask"])) == 11

    assert pack_blocks([], block_size=4, pad_id=0) == {"input_ids": [], "attention_mask": []}


@pytest.fixture(scope="module")
def packed(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "packed"
    manifest = pack_dataset(PackArguments(
        corpus_dir=str(tiny_data["corpus"]), tokenizer_dir=str(tiny_data["tokenizer"]), output_dir=str(out),
        block_size=BLOCK_SIZE, num_proc=2, pack_batch_size=BATCH,
    ))
    return out, manifest


@pytest.mark.parametrize("split", ["train", "validation"])
def test_packing_preserves_every_document_token(tiny_data, packed, split):
    out, manifest = packed
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    docs = load_from_disk(str(tiny_data["corpus"]))[split]["text"]
    tokenizer.backend_tokenizer.encode_special_tokens = True  # as packing encodes: special-token text stays text
    encoded = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    expected = [tok for enc in encoded for tok in (bos, *enc.ids, eos)]

    blocks = load_from_disk(str(out))[split]
    assert blocks.column_names == ["input_ids", "attention_mask"]
    stream, tails = [], 0
    for ids, mask in zip(blocks["input_ids"], blocks["attention_mask"]):
        assert len(ids) == len(mask) == BLOCK_SIZE
        real = sum(mask)
        assert real > 0 and mask == [1] * real + [0] * (BLOCK_SIZE - real)  # padding only at the end
        assert ids[real:] == [pad] * (BLOCK_SIZE - real)
        tails += real < BLOCK_SIZE
        stream += ids[:real]
    assert stream == expected
    # At most one padded tail per packing batch; with num_proc=2 the two shards batch separately.
    assert 1 <= tails <= math.ceil(len(docs) / BATCH) + 1
    if split == "train":
        assert tails > 1, "several batches should each have left a padded tail"

    figures = manifest["outputs"][split]
    assert figures["tokens"] == len(expected)
    assert figures["blocks"] == len(blocks)
    assert figures["padding"] == len(blocks) * BLOCK_SIZE - len(expected)


def test_manifest_names_inputs_and_options(tiny_data, packed):
    out, manifest = packed
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    for stage in ("corpus", "tokenizer"):
        upstream = json.loads((tiny_data[stage] / "manifest.json").read_text())
        assert manifest["inputs"][f"{stage}_fingerprint"] == upstream["fingerprint"]
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    assert manifest["options"] == {"block_size": BLOCK_SIZE, "pack_batch_size": BATCH, "bos": tokenizer.bos_token_id,
                                   "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                                   "special_token_text": "encoded as text"}
    assert manifest["outputs"]["block_size"] == BLOCK_SIZE


# ----------------------------------------------------------------------------- bad input
def test_block_size_one_is_rejected(tiny_data, tmp_path):
    with pytest.raises(UserError, match="block_size must be at least 2, got 1"):
        pack_dataset(PackArguments(corpus_dir=str(tiny_data["corpus"]), tokenizer_dir=str(tiny_data["tokenizer"]),
                                   output_dir=str(tmp_path / "packed"), block_size=1))
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("num_proc", [0, -1])
def test_num_proc_below_one_is_rejected(tmp_path, num_proc):
    with pytest.raises(UserError, match=f"^num_proc must be >= 1, got {num_proc}$"):  # before any input is read
        pack_dataset(PackArguments(corpus_dir=str(tmp_path / "corpus"), tokenizer_dir=str(tmp_path / "tokenizer"),
                                   output_dir=str(tmp_path / "packed"), num_proc=num_proc))
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("stage", ["corpus", "tokenizer"])
def test_input_without_manifest_is_incomplete(tiny_data, tmp_path, stage):
    half_done = tmp_path / f"half_done_{stage}"
    half_done.mkdir()
    dirs = {"corpus": str(tiny_data["corpus"]), "tokenizer": str(tiny_data["tokenizer"]), stage: str(half_done)}
    with pytest.raises(UserError, match="incomplete") as err:
        pack_dataset(PackArguments(corpus_dir=dirs["corpus"], tokenizer_dir=dirs["tokenizer"],
                                   output_dir=str(tmp_path / "packed"), block_size=16))
    assert str(half_done) in str(err.value)
    assert not (tmp_path / "packed").exists()


def test_finished_output_of_the_wrong_stage_is_refused(tiny_data, tmp_path):
    with pytest.raises(UserError) as err:  # a packed dataset where the corpus belongs
        pack_dataset(PackArguments(corpus_dir=str(tiny_data["packed"]), tokenizer_dir=str(tiny_data["tokenizer"]),
                                   output_dir=str(tmp_path / "packed"), block_size=16))
    assert str(err.value) == f"{tiny_data['packed']} is the output of stage 'packed', not a corpus (corpus)"
    assert not (tmp_path / "packed").exists()


def test_corrupt_manifest_is_one_line_naming_file_and_line(tiny_data, tmp_path):
    import shutil

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_data["tokenizer"], tokenizer)
    (tokenizer / "manifest.json").write_text('{"stage": "tokenizer",\n  "inputs": \n')  # cut off mid-write
    with pytest.raises(UserError) as err:
        pack_dataset(PackArguments(corpus_dir=str(tiny_data["corpus"]), tokenizer_dir=str(tokenizer),
                                   output_dir=str(tmp_path / "packed"), block_size=16))
    assert str(err.value).startswith(f"{tokenizer / 'manifest.json'}:3: not a valid manifest")
    assert not (tmp_path / "packed").exists()
    # JSON, but without what every stage reads: a KeyError after the packing (or, in pretraining, after training)
    manifest = json.loads((tiny_data["tokenizer"] / "manifest.json").read_text())
    for change, problem in ((lambda m: m.pop("fingerprint"), "no 'fingerprint'"),
                            (lambda m: m.update(inputs=[1]), "'inputs' is not a mapping"),
                            (lambda m: m.update(stage=None), "'stage' is not a string")):
        damaged = dict(manifest)
        change(damaged)
        (tokenizer / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(UserError) as err:
            pack_dataset(PackArguments(corpus_dir=str(tiny_data["corpus"]), tokenizer_dir=str(tokenizer),
                                       output_dir=str(tmp_path / "packed"), block_size=16))
        assert str(err.value) == (f"{tokenizer / 'manifest.json'}: not a valid manifest ({problem}); rerun the stage "
                                  "that wrote it")
    assert not (tmp_path / "packed").exists()


def test_pack_batch_size_below_one_is_rejected(tiny_data, tmp_path):
    with pytest.raises(UserError, match="^pack_batch_size must be >= 1, got 0$"):
        pack_dataset(PackArguments(corpus_dir=str(tiny_data["corpus"]), tokenizer_dir=str(tiny_data["tokenizer"]),
                                   output_dir=str(tmp_path / "packed"), block_size=16, pack_batch_size=0))
    assert not (tmp_path / "packed").exists()


def test_packing_writes_nothing_into_its_inputs(tiny_data, packed):
    out, _ = packed
    corpus_files = sorted(p.relative_to(tiny_data["corpus"]).as_posix() for p in tiny_data["corpus"].rglob("*"))
    assert not [f for f in corpus_files if "cache" in f], corpus_files  # Dataset.map's cache goes elsewhere
    assert sorted(p.name for p in out.iterdir()) == ["dataset_dict.json", "manifest.json", "train", "validation"]


def test_output_dir_that_is_the_tokenizer_is_refused(tiny_data, tmp_path):
    tokenizer = tiny_data["tokenizer"]
    before = sorted(p.name for p in tokenizer.iterdir())
    with pytest.raises(UserError, match=f"^output_dir {tokenizer} is tokenizer_dir {tokenizer}: "):
        pack_dataset(PackArguments(corpus_dir=str(tiny_data["corpus"]), tokenizer_dir=str(tokenizer),
                                   output_dir=str(tokenizer)))
    assert sorted(p.name for p in tokenizer.iterdir()) == before


def test_text_that_spells_a_special_token_is_packed_as_text(tiny_data, tmp_path):
    """A document about tokenizers may contain "<|end_of_text|>": as the eos id it would end the document
    early and teach the model to stop there. Two processes, as workers get an unpickled tokenizer."""
    from data_prep.build_corpus import CorpusArguments, build_corpus

    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [f"document {i}: GPT-style models end a text with <|end_of_text|> and a chat turn with <|end|>; "
             f"<|user|> marks the user. Filler so that the document is kept: {'abc ' * i}" for i in range(12)]
    for i, text in enumerate(texts):
        (docs / f"{i:02d}.txt").write_text(text)
    build_corpus(CorpusArguments(source="local", input_paths=[str(docs)], output_dir=str(tmp_path / "corpus"),
                                 validation_fraction=0.25))
    pack_dataset(PackArguments(corpus_dir=str(tmp_path / "corpus"), tokenizer_dir=str(tiny_data["tokenizer"]),
                               output_dir=str(tmp_path / "packed"), block_size=BLOCK_SIZE, num_proc=2,
                               pack_batch_size=2))
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|user|>")}
    packed = load_from_disk(str(tmp_path / "packed"))
    for split in ("train", "validation"):
        stream = [t for ids, mask in zip(packed[split]["input_ids"], packed[split]["attention_mask"])
                  for t, m in zip(ids, mask) if m]
        # every document is exactly <bos> text <eos>: special ids only at the boundaries
        documents = tokenizer.decode(stream, skip_special_tokens=False).split("<|begin_of_text|>")[1:]
        assert sorted(d.removesuffix("<|end_of_text|>") for d in documents) == sorted(
            load_from_disk(str(tmp_path / "corpus"))[split]["text"])
        assert sum(t in special for t in stream) == 2 * len(documents)
