"""data_prep.build_corpus and its pipeline steps: normalisation, dedup, split, readers, errors, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from datasets import load_from_disk

from conftest import REPO_ROOT
from data_prep.artifacts import UserError
from data_prep.build_corpus import CorpusArguments, build_corpus, main
from data_prep.steps import (
    Document,
    ExactDedup,
    LocalFileReader,
    Normalizer,
    PipelineStep,
    normalize_text,
    run_pipeline,
)


def local_args(tmp_path, inputs, **overrides) -> CorpusArguments:
    options = {"output_dir": str(tmp_path / "corpus"), "source": "local",
               "input_paths": [str(p) for p in inputs], "min_chars": 1, **overrides}
    return CorpusArguments(**options)


def all_rows(corpus_dir) -> dict[str, dict]:
    corpus = load_from_disk(str(corpus_dir))
    return {row["id"]: row for split in corpus.values() for row in split}


def leftovers(parent, name: str) -> list[str]:
    """Temporary siblings that atomic_output_dir would leave behind after a failure."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------- normalize_text
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\ufb01le \ufb02ow", "file flow"),                       # ligatures fi/fl -> ASCII (NFKC)
        ("\uff11\uff12\uff13 \uff21\uff22", "123 AB"),             # full-width digits and letters
        ("a\r\nb\rc\n", "a\nb\nc"),                               # CRLF and lone CR -> LF
        ("code  \t\nmore\u00a0\nend   ", "code\nmore\nend"),       # trailing blanks on every line
        ("a\n\n\n\n\nb", "a\n\nb"),                               # blank-line runs -> one blank line
        ("a\n\nb", "a\n\nb"),                                     # a single blank line is kept
        ("def f():\n    x = 1\n\tif x:\n\t\treturn  x", "def f():\n    x = 1\n\tif x:\n\t\treturn  x"),
        ("\n\n  indented first line\n\n", "  indented first line"),  # outer newlines go, indent stays
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected
    assert normalize_text(expected) == expected  # idempotent


# ----------------------------------------------------------------------------- steps
def test_normalizer_drops_short_documents_after_normalising():
    docs = [Document("tiny", "a"), Document("long enough  \r\n", "b"), Document("ab   \n\n\n\n", "c"),
            Document("\ufb01ne and dandy", "d")]
    step = Normalizer(min_chars=5)
    kept = list(step.run(docs))
    assert [(d.id, d.text) for d in kept] == [("b", "long enough"), ("d", "fine and dandy")]
    assert step.stats == {"kept": 2, "dropped_short": 2}


def test_exact_dedup_drops_and_counts_duplicates():
    docs = [Document(t, str(i)) for i, t in enumerate(["A", "B", "A", "A", "C", "B"])]
    step = ExactDedup()
    kept = list(step.run(docs))
    assert [(d.id, d.text) for d in kept] == [("0", "A"), ("1", "B"), ("4", "C")]
    assert step.stats == {"kept": 3, "duplicates": 3}


def test_pipeline_dedups_on_normalised_text():
    docs = [Document("same text  \r\n", "1"), Document("same text", "2"), Document("other text", "3")]

    class ListReader(PipelineStep):  # a reader ignores its input and yields documents
        def run(self, data=None, rank=0, world_size=1):
            yield from docs

    dedup = ExactDedup()
    kept = list(run_pipeline([ListReader(), Normalizer(min_chars=1), dedup]))
    assert [d.id for d in kept] == ["1", "3"]
    assert dedup.stats["duplicates"] == 1


# ----------------------------------------------------------------------------- stdlib corpus
def test_stdlib_corpus_split_and_manifest(tiny_data):
    corpus = load_from_disk(str(tiny_data["corpus"]))
    manifest = json.loads((tiny_data["corpus"] / "manifest.json").read_text())
    assert set(corpus) == {"train", "validation"}
    n_train, n_val = len(corpus["train"]), len(corpus["validation"])
    total = n_train + n_val
    assert total >= 40, "the stdlib corpus should hold code and prose documents"
    assert abs(n_val - 0.1 * total) <= 1
    train_ids, val_ids = set(corpus["train"]["id"]), set(corpus["validation"]["id"])
    assert len(train_ids) == n_train and len(val_ids) == n_val
    assert not train_ids & val_ids
    assert set(corpus["train"]["source"]) | set(corpus["validation"]["source"]) == {"code", "prose"}

    out = manifest["outputs"]
    for split, ds in corpus.items():
        assert out[split]["documents"] == len(ds)
        assert out[split]["bytes"] == sum(len(t.encode("utf-8")) for t in ds["text"])
    assert out["steps"]["exact_dedup"]["kept"] == total
    assert manifest["stage"] == "corpus"
    assert manifest["inputs"]["source"] == "stdlib"
    assert len(manifest["fingerprint"]) == 16 and int(manifest["fingerprint"], 16) >= 0
    # Every stored text is already normalised.
    for text in corpus["validation"]["text"]:
        assert normalize_text(text) == text


def test_stdlib_rebuild_with_same_seed_is_identical(tiny_data, tmp_path):
    reference = load_from_disk(str(tiny_data["corpus"]))
    ref_manifest = json.loads((tiny_data["corpus"] / "manifest.json").read_text())
    options = ref_manifest["options"]
    same = build_corpus(CorpusArguments(output_dir=str(tmp_path / "same"), max_stdlib_files=options["max_stdlib_files"],
                                        min_chars=options["min_chars"], seed=options["seed"]))
    again = load_from_disk(str(tmp_path / "same"))
    for split in ("train", "validation"):
        assert again[split]["id"] == reference[split]["id"]
        assert again[split]["text"] == reference[split]["text"]
    assert same["fingerprint"] == ref_manifest["fingerprint"]


def test_different_seed_gives_a_different_split(tmp_path):
    # The split is source-independent; a local corpus keeps this fast (a stdlib build walks site-packages).
    data = tmp_path / "data"
    data.mkdir()
    for i in range(60):
        (data / f"doc{i:02d}.txt").write_text(f"document {i}: " + "words " * (i + 5))
    splits = {}
    for seed in (1, 1, 2):
        manifest = build_corpus(local_args(tmp_path, [data], output_dir=str(tmp_path / f"seed{seed}"), seed=seed))
        corpus = load_from_disk(str(tmp_path / f"seed{seed}"))
        splits.setdefault(seed, []).append((corpus["train"]["id"], corpus["validation"]["id"], manifest["fingerprint"]))
    assert splits[1][0] == splits[1][1]
    (train1, val1, fp1), (train2, val2, fp2) = splits[1][0], splits[2][0]
    assert len(val1) == len(val2) == 6
    assert set(val1) != set(val2)
    assert set(train1) | set(val1) == set(train2) | set(val2)
    assert fp1 != fp2


def test_fingerprint_follows_options(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i:02d}.txt").write_text(f"document number {i} " * (i + 1))
    first = build_corpus(local_args(tmp_path, [data], output_dir=str(tmp_path / "a")))
    repeat = build_corpus(local_args(tmp_path, [data], output_dir=str(tmp_path / "b")))
    stricter = build_corpus(local_args(tmp_path, [data], output_dir=str(tmp_path / "c"), min_chars=30))
    assert first["fingerprint"] == repeat["fingerprint"]
    assert stricter["fingerprint"] != first["fingerprint"]
    # Only "document number 0" (17 characters) is shorter than 30.
    assert stricter["outputs"]["steps"]["normalizer"]["dropped_short"] == 1
    (data / "doc00.txt").write_text("changed input contents, same options")
    changed = build_corpus(local_args(tmp_path, [data], output_dir=str(tmp_path / "d")))
    assert changed["fingerprint"] != first["fingerprint"]


# ----------------------------------------------------------------------------- local reader
def test_local_reader_all_formats_with_custom_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    (data / "a.txt").write_text("plain \ufb01le text   \r\nsecond line\r\n", encoding="utf-8")
    (data / "nested" / "b.md").write_text("# Title\n\n\n\n\nBody with \uff11\uff12 full-width.  \n", encoding="utf-8")
    rows = [{"body": "jsonl row one\t\n", "other": 1},
            {"body": "jsonl row two: \u4e2d\u6587 \U0001F469\u200d\U0001F469\u200d\U0001F467"}]
    (data / "c.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    (data / "d.json").write_text(json.dumps([{"body": "json item zero"}, {"body": "json item one  \n\n\n\nend"}]))
    pq.write_table(pa.table({"body": ["parquet row zero", "parquet \u0430\u0431\u0432  row one"], "n": [0, 1]}),
                   data / "e.parquet")
    (data / "ignored.csv").write_text("body\nnot read\n")

    reader = LocalFileReader([str(data)], text_field="body")
    assert [p.name for p in reader.files()] == ["a.txt", "c.jsonl", "d.json", "e.parquet", "b.md"]
    raw = {d.id: d.text for d in reader.run(None)}
    assert raw[f"{data}/c.jsonl#1"] == "jsonl row one\t\n"
    assert raw[f"{data}/c.jsonl#2"] == rows[1]["body"]
    assert raw[f"{data}/e.parquet#1"] == "parquet \u0430\u0431\u0432  row one"
    assert reader.stats["files"] == 5

    build_corpus(local_args(tmp_path, [data], text_field="body"))
    texts = {doc_id: row["text"] for doc_id, row in all_rows(tmp_path / "corpus").items()}
    assert texts == {
        f"{data}/a.txt": "plain file text\nsecond line",
        f"{data}/nested/b.md": "# Title\n\nBody with 12 full-width.",
        f"{data}/c.jsonl#1": "jsonl row one",
        f"{data}/c.jsonl#2": rows[1]["body"],
        f"{data}/d.json#0": "json item zero",
        f"{data}/d.json#1": "json item one\n\nend",
        f"{data}/e.parquet#0": "parquet row zero",
        f"{data}/e.parquet#1": "parquet \u0430\u0431\u0432  row one",
    }


# ----------------------------------------------------------------------------- bad input
def test_empty_corpus_is_a_user_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "short.txt").write_text("too short")
    with pytest.raises(UserError, match="empty corpus") as err:
        build_corpus(local_args(tmp_path, [data], min_chars=32))
    assert str(data) in str(err.value)


def test_non_utf8_file_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"first line is fine\nsecond too\ncaf\xe9 is latin-1\n")
    with pytest.raises(UserError, match="not valid UTF-8") as err:
        build_corpus(local_args(tmp_path, [bad]))
    assert f"{bad}:3:" in str(err.value)


def test_jsonl_line_that_is_not_json(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "row one is fine"}\n\n{"text": "row three is fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match="not valid JSON") as err:
        build_corpus(local_args(tmp_path, [bad]))
    assert f"{bad}:4:" in str(err.value)


def test_jsonl_row_missing_text_field(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"content": "fine"}\n{"body": "wrong field"}\n')
    with pytest.raises(UserError, match="missing text field 'content'") as err:
        build_corpus(local_args(tmp_path, [bad], text_field="content"))
    assert f"{bad}:2:" in str(err.value)


def test_corrupt_parquet_names_the_file(tmp_path):
    from data_prep.build_sft_data import read_local_rows

    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(UserError) as err:
        build_corpus(local_args(tmp_path, [bad]))
    assert str(err.value).startswith(f"{bad}: not a valid Parquet file (Parquet magic bytes not found")
    with pytest.raises(UserError) as err:
        read_local_rows(str(bad))  # build_sft_data and build_preference_data read local files with it
    assert str(err.value).startswith(f"{bad}: not a valid Parquet file (")
    assert not (tmp_path / "corpus").exists()


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: {tmp_path / 'corpus'}\nmax_stdlib_files: 5\nvalidation_fractoin: 0.2\n")
    with pytest.raises(UserError, match="validation_fractoin") as err:
        main(["--config", str(config)])
    assert str(config) in str(err.value)
    assert not (tmp_path / "corpus").exists()


def test_cli_reports_bad_config_in_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: {tmp_path / 'corpus'}\nbogus_key: 3\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "data_prep.build_corpus", "--config", str(config)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "bogus_key" in lines[0] and str(config) in lines[0]
    assert not (tmp_path / "corpus").exists()


def test_jsonl_with_unicode_line_separator_inside_a_string(tmp_path):
    rows = tmp_path / "rows.jsonl"
    texts = ["first\u2028paragraph separator inside", "second row"]
    rows.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert [d.text for d in LocalFileReader([str(rows)]).run(None)] == texts


def test_unknown_yaml_key_with_string_value_names_only_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("bogus_key: some_value\n")
    with pytest.raises(UserError) as err:
        main(["--config", str(config)])
    assert str(err.value) == f"{config}: unknown key(s) bogus_key"


# ----------------------------------------------------------------------------- atomicity
def good_input(tmp_path):
    data = tmp_path / "good"
    data.mkdir(exist_ok=True)
    for i in range(10):
        (data / f"{i}.txt").write_text(f"good document {i} with enough characters to be kept")
    return data


def test_failed_build_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    out = tmp_path / "out" / "corpus"
    with pytest.raises(UserError):
        build_corpus(local_args(tmp_path, [bad], output_dir=str(out)))
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent, "corpus") == []


def test_failed_rebuild_keeps_previous_output(tmp_path):
    out = tmp_path / "corpus"
    build_corpus(local_args(tmp_path, [good_input(tmp_path)]))
    before = (out / "manifest.json").read_text()
    ids_before = set(all_rows(out))

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(UserError):
        build_corpus(local_args(tmp_path, [bad]))
    assert (out / "manifest.json").read_text() == before
    assert set(all_rows(out)) == ids_before
    assert leftovers(tmp_path, "corpus") == []


def test_failure_while_writing_keeps_previous_output(tmp_path, monkeypatch):
    import data_prep.build_corpus as module

    out = tmp_path / "corpus"
    build_corpus(local_args(tmp_path, [good_input(tmp_path)]))
    before = (out / "manifest.json").read_text()

    def crash(directory, manifest):
        assert (directory / "dataset_dict.json").is_file()  # the data was written to the temp dir first
        raise RuntimeError("disk full")

    monkeypatch.setattr(module, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus(local_args(tmp_path, [good_input(tmp_path)], seed=7))
    assert (out / "manifest.json").read_text() == before
    assert leftovers(tmp_path, "corpus") == []


# ----------------------------------------------------------------------------- Hub source
def test_hub_source_streams_named_dataset_with_text_field(tmp_path, monkeypatch):
    """The Hub is unreachable here, so `load_dataset` is replaced by a local streaming dataset;
    what is checked is our side: streaming=True, the config/split passed on, text_field, max_docs."""
    import datasets

    rows = [{"content": f"document number {i} " * 5, "url": f"u{i}"} for i in range(50)]
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    manifest = build_corpus(CorpusArguments(source="hub", hub_dataset="HuggingFaceFW/fineweb-edu",
                                            hub_config="sample-10BT", text_field="content", max_docs=30,
                                            output_dir=str(tmp_path / "hub")))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert manifest["outputs"]["train"]["documents"] + manifest["outputs"]["validation"]["documents"] == 30
    assert manifest["inputs"] == {**manifest["inputs"], "source": "hub", "dataset": "HuggingFaceFW/fineweb-edu"}
    corpus = load_from_disk(str(tmp_path / "hub"))
    assert all(text.startswith("document number") for text in corpus["train"]["text"])


def test_hub_source_without_network_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="could not open Hub dataset no-such/dataset"):
        build_corpus(CorpusArguments(source="hub", hub_dataset="no-such/dataset", output_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("line, message", [
    ("validation_fraction: [0.1, 0.2]", "key validation_fraction: expected a number, got [0.1, 0.2]"),
    ("max_stdlib_files: 1.5", "key max_stdlib_files: expected an integer, got 1.5"),
    ("min_chars: {a: 1}", "key min_chars: expected an integer, got {'a': 1}"),
    ("overwrite: maybe", "key overwrite: expected true or false, got 'maybe'"),
])
def test_yaml_value_of_the_wrong_type_names_file_line_and_key(tmp_path, line, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: {tmp_path / 'corpus'}\n{line}\n")
    with pytest.raises(UserError) as err:
        main(["--config", str(config)])
    assert str(err.value) == f"{config}:2: {message}"
    assert not (tmp_path / "corpus").exists()


def test_yaml_string_for_a_list_key_is_one_item_not_its_characters(tmp_path):
    from data_prep.artifacts import parse_config

    config = tmp_path / "one.yaml"
    config.write_text("source: local\ninput_paths: notes.txt\n")
    (args,) = parse_config([CorpusArguments], ["--config", str(config)])
    assert args.input_paths == ["notes.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--max_stdlib_files", "3", "--config"], "--config needs a YAML file after it"),
    (["--config", "a.yaml", "--config", "b.yaml"], "--config is given twice"),
])
def test_config_flag_misuse_is_one_line(argv, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        main(argv)


def test_yaml_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("output_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{config}: not UTF-8 text \(byte 15\)$"):
        main(["--config", str(config)])


def test_output_dir_under_a_file_is_one_line(tmp_path):
    from data_prep.artifacts import atomic_output_dir

    (tmp_path / "taken").write_text("a file, not a directory")
    for output_dir, message in [(tmp_path / "taken" / "corpus", "a parent of it is a file"),
                                (tmp_path / "taken", "is a file")]:
        with pytest.raises(UserError, match=message), atomic_output_dir(output_dir):
            pass


def test_output_that_overlaps_an_input_is_refused_and_the_input_kept(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a document long enough to keep")
    for output, where in ((data, "is"), (data / "corpus", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(UserError) as err:
            build_corpus(local_args(tmp_path, [data], output_dir=str(output)))
        assert str(err.value).startswith(f"output_dir {output} {where} input {data}: a stage replaces its whole")
    assert (data / "a.txt").read_text() == "a document long enough to keep" and os.listdir(data) == ["a.txt"]


def test_an_output_dir_that_is_not_an_earlier_output_of_the_stage_is_refused_and_kept(tmp_path, monkeypatch):
    """A stage replaces its output directory whole: any folder given as output_dir was deleted, a forgotten
    `/corpus` (`--output_dir outputs`) every stage's outputs with it."""
    from data_prep import build_mc_benchmark, train_tokenizer

    build_corpus(local_args(tmp_path, [good_input(tmp_path)]))  # tmp_path/corpus, an earlier corpus
    users = tmp_path / "project"
    (users / "src").mkdir(parents=True)
    (users / "src" / "main.py").write_text("print('mine')\n")
    with pytest.raises(UserError) as err:
        build_corpus(local_args(tmp_path, [good_input(tmp_path)], output_dir=str(users)))
    assert str(err.value) == (f"output_dir {users} is not an earlier corpus output (it has no manifest.json) and "
                              "holds src, which this corpus stage would delete; choose another output_dir or empty it")
    assert (users / "src" / "main.py").read_text() == "print('mine')\n" and leftovers(tmp_path, "project") == []
    build_corpus(local_args(tmp_path, [good_input(tmp_path)], seed=3))  # its own earlier output: replaced
    with pytest.raises(UserError) as err:  # another stage's output, before the tokenizer is trained
        train_tokenizer.main(["--corpus_dir", str(tmp_path / "corpus"), "--output_dir", str(tmp_path / "good")])
    assert str(err.value).startswith(f"output_dir {tmp_path / 'good'} is not an earlier tokenizer output")
    corpus_copy = tmp_path / "corpus_copy"
    shutil.copytree(tmp_path / "corpus", corpus_copy)
    with pytest.raises(UserError) as err:
        build_mc_benchmark.main(["--output_dir", str(corpus_copy)])
    assert str(err.value) == (f"output_dir {corpus_copy} holds the output of stage 'corpus', which this mc_benchmark "
                              "stage would replace; choose another output_dir")
    assert (corpus_copy / "manifest.json").is_file()
    monkeypatch.chdir(users)
    for output_dir, message in ((".", "output_dir . is or holds the current directory"),
                                ("..", "output_dir .. is or holds the current directory"),
                                ("", "output_dir is empty; name a directory")):
        with pytest.raises(UserError, match=f"^{message}"):
            build_mc_benchmark.main(["--output_dir", output_dir])
    assert sorted(os.listdir(users)) == ["src"] and leftovers(tmp_path, "project") == []


@pytest.mark.parametrize("overrides, message", [
    ({"validation_fraction": 0.99}, "validation_fraction 0.99 of 3 documents from .* leaves no train document"),
    ({"max_docs": 0}, r"max_docs must be >= 1 \(or unset, for everything\), got 0"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"max_stdlib_files": 5}, "max_stdlib_files is only read with --source stdlib, but source is local"),
])
def test_corpus_options_that_cannot_work_are_one_line(tmp_path, overrides, message):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.txt").write_text(f"document number {i}")
    with pytest.raises(UserError, match=f"^{message}"):
        build_corpus(local_args(tmp_path, [data], **overrides))
    assert not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"max_stdlib_files": -1}, "max_stdlib_files must be >= 1"),  # paths[:-1] would drop one file without a word
    ({"input_paths": ["notes/"]}, "input_paths is only read with --source local, but source is stdlib"),
    ({"hub_dataset": "HuggingFaceFW/fineweb-edu"}, "hub_dataset is only read with --source hub, but source is stdlib"),
])
def test_stdlib_options_that_cannot_work_are_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=f"^{message}"):
        build_corpus(CorpusArguments(output_dir=str(tmp_path / "corpus"), **overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"text_field": "body"}, "text_field is only read with --source local or hub, but source is stdlib"),
    ({"source": "local", "input_paths": ["x"], "hub_split": "validation"},
     "hub_split is only read with --source hub, but source is local"),
    ({"source": "local", "input_paths": ["x"], "max_stdlib_files": 3},
     "max_stdlib_files is only read with --source stdlib, but source is local"),
])
def test_a_corpus_option_the_chosen_source_never_reads_is_refused(tmp_path, overrides, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        build_corpus(CorpusArguments(output_dir=str(tmp_path / "c"), **overrides))
    assert not (tmp_path / "c").exists()


def test_a_lone_surrogate_a_folder_without_inputs_and_min_chars_below_one_are_one_line(tmp_path):
    """json.loads keeps an escaped half of a UTF-16 pair, which dedup's UTF-8 hash failed on with a traceback;
    a folder of unsupported files added nothing without a word; min_chars 0 kept empty documents."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a document long enough to be kept"}\n{"text": "half a pair \\ud800 in the text"}\n')
    with pytest.raises(UserError) as err:
        build_corpus(local_args(tmp_path, [rows]))
    assert str(err.value) == (f"{rows}:2: text holds a lone UTF-16 surrogate ('\\ud800' escaped in the JSON), which "
                              "is not a character; fix or drop the row")
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=f"^{tmp_path / 'tables'}: no .txt, .md, .jsonl, .json, .parquet file in this "
                                        "folder$"):
        build_corpus(local_args(tmp_path, [tmp_path / "tables"]))
    with pytest.raises(UserError, match="^min_chars must be >= 1, got 0$"):
        build_corpus(local_args(tmp_path, [rows], min_chars=0))
    assert not (tmp_path / "corpus").exists()


def test_local_suffixes_are_matched_in_any_case(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "A.TXT").write_text("upper-case suffix document")
    (data / "b.JsonL").write_text('{"text": "mixed-case suffix row"}\n')
    (data / "c.txt").write_text("lower-case suffix document")
    manifest = build_corpus(local_args(tmp_path, [data], validation_fraction=0.34))
    assert manifest["inputs"]["files"] == 3
    assert set(all_rows(tmp_path / "corpus")) == {f"{data}/A.TXT", f"{data}/b.JsonL#1", f"{data}/c.txt"}


def test_hub_row_whose_text_is_not_a_string_names_the_row(tmp_path, monkeypatch):
    import datasets

    rows = [{"text": "a fine first document"}, {"text": None}]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split, streaming: datasets.IterableDataset.from_generator(lambda: iter(rows)))
    with pytest.raises(UserError, match=r"^org/data: row 1: field 'text' is not a string$"):
        build_corpus(CorpusArguments(source="hub", hub_dataset="org/data", output_dir=str(tmp_path / "hub")))
    assert not (tmp_path / "hub").exists()


def test_files_damaged_behind_a_valid_manifest_stop_in_one_line(tiny_data, tiny_chat_data, tmp_path):
    """A disk that filled or a copy cut short leaves a stage's manifest intact but its arrow files or
    tokenizer.json truncated; the next stage names the directory instead of a pyarrow or JSON traceback."""
    from data_prep import build_preference_data, pack_dataset, train_tokenizer
    from recipes.common import load_splits

    corpus, tokenizer, sft = tmp_path / "corpus", tmp_path / "tokenizer", tmp_path / "sft"
    for source, copy in ((tiny_data["corpus"], corpus), (tiny_data["tokenizer"], tokenizer),
                         (tiny_chat_data["sft"], sft)):
        shutil.copytree(source, copy)
    for arrow in [*corpus.glob("*/*.arrow"), *sft.glob("*/*.arrow")]:
        arrow.write_bytes(arrow.read_bytes()[:1000])
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "trunc')

    with pytest.raises(UserError, match=f"^{corpus}: a damaged saved dataset \\("):
        train_tokenizer.main(["--corpus_dir", str(corpus), "--output_dir", str(tmp_path / "t")])
    with pytest.raises(UserError, match=f"^{tokenizer}: a damaged tokenizer \\("):
        pack_dataset.main(["--corpus_dir", str(tiny_data["corpus"]), "--tokenizer_dir", str(tokenizer),
                           "--output_dir", str(tmp_path / "p")])
    with pytest.raises(UserError, match=f"^{sft}: a damaged saved dataset \\("):
        build_preference_data.main(["--sft_data_dir", str(sft), "--output_dir", str(tmp_path / "pairs")])
    with pytest.raises(UserError, match=f"^{sft}: a damaged saved dataset \\("):
        load_splits(str(sft), "train", "test", lambda rows, name: None)  # what SFT and reward read
    assert not any((tmp_path / name).exists() for name in ("t", "p", "pairs"))
