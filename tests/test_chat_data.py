"""data_prep.chat_tasks, build_sft_data and build_preference_data: splits, answers, pairs, errors, CLIs."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from datasets import load_from_disk

from data_prep import build_preference_data, build_sft_data
from data_prep.artifacts import UserError
from data_prep.chat_tasks import (
    FAMILIES,
    HELDOUT_DOCSTRING_TEMPLATES,
    REFUSAL,
    SPLITS,
    TRAIN_DOCSTRING_TEMPLATES,
    alpaca_to_messages,
    apportion,
    check_answer,
    docstring_pool,
    generate_chat_splits,
    hh_rlhf_to_preference,
    is_refusal,
    preference_passthrough,
    prompt_key,
    rank_answers,
    rankings_to_pairs,
    validate_messages,
    validate_preferences,
)

SIZES = {"train": 1200, "test": 120, "preference_prompts": 240, "rl_prompts": 120}
SMALL_CLI = ["--train_size", "240", "--test_size", "60", "--preference_size", "120", "--rl_size", "60"]


@pytest.fixture(scope="module")
def splits():
    return generate_chat_splits(SIZES, seed=7)


def user_texts(rows):
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


def docstring_template_of(question: str, templates) -> bool:
    return any(question.startswith(t.split("`")[0]) and question.endswith(t.split("`")[-1]) for t in templates)


# ----------------------------------------------------------------------------- generation
def test_same_seed_same_rows_other_seed_other_rows(splits):
    again = generate_chat_splits(SIZES, seed=7)
    assert again == splits
    other = generate_chat_splits(SIZES, seed=8)
    assert [r["messages"] for r in other["test"]] != [r["messages"] for r in splits["test"]]


def test_rows_end_with_the_assistant_and_answer_is_the_last_message(splits):
    for split, rows in splits.items():
        assert len(rows) == SIZES[split]
        validate_messages(rows, split)
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert roles[-1] == "assistant" and row["answer"] == row["messages"][-1]["content"]
            assert roles.count("system") <= 1 and "system" not in roles[1:]
            assert roles[roles.index("user"):] == ["user", "assistant"] * (len(roles[roles.index("user"):]) // 2)
            assert row["task"] in FAMILIES
            assert (row["safety_label"] in ("harmful", "benign")) == (row["task"] == "safety")
            assert (row["answer"] == REFUSAL) == (row["safety_label"] == "harmful")


def test_no_prompt_repeats_within_or_across_splits(splits):
    keys = {split: [prompt_key(r["messages"]) for r in rows] for split, rows in splits.items()}
    for split, split_keys in keys.items():
        assert len(set(split_keys)) == len(split_keys), split
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(keys[a]) & set(keys[b]), (a, b)


def test_held_out_questions_are_new_instances(splits):
    """No held-out question (any turn) is asked in train, except the generic follow-ups ("Now reverse
    it."); docstring questions differ from train's by phrasing only."""
    train = user_texts(splits["train"])
    for split in SPLITS[1:]:
        shared = {q for q in user_texts(splits[split]) & train if not q.startswith("Now ")}
        assert not shared, (split, sorted(shared)[:5])


def test_docstring_recall_rule(splits):
    train_functions = set()
    for row in splits["train"]:
        for m in row["messages"]:
            if m["role"] == "user" and "`" in m["content"]:
                assert docstring_template_of(m["content"], TRAIN_DOCSTRING_TEMPLATES), m["content"]
                train_functions.add(m["content"].split("`")[1])
    asked = {}
    for split in SPLITS[1:]:
        for row in splits[split]:
            if row["task"] == "docstring":
                question = row["messages"][-2]["content"]
                assert docstring_template_of(question, HELDOUT_DOCSTRING_TEMPLATES), question
                name = question.split("`")[1]
                assert asked.setdefault(name, split) == split, f"{name} asked in {asked[name]} and {split}"
    assert set(asked) <= train_functions, "held-out docstring questions must be about functions taught in train"


def test_family_mix_and_conversation_shapes(splits):
    for split, rows in splits.items():
        counts = Counter(r["task"] for r in rows)
        assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        labels = Counter(r["safety_label"] for r in rows if r["safety_label"])
        assert abs(labels["harmful"] - labels["benign"]) <= 1
    rows = splits["train"]
    multi = sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in rows) / len(rows)
    system = sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows)
    assert 0.22 <= multi <= 0.42 and 0.22 <= system <= 0.42, (multi, system)
    followups = [r for r in rows if r["messages"][-2]["content"].startswith("Now ")]
    assert len(followups) > 0.05 * len(rows)
    assert {r["task"] for r in followups} == {"arithmetic", "sort", "string"}


def test_follow_ups_are_exact(splits):
    checked = 0
    for row in splits["train"]:
        question = row["messages"][-2]["content"]
        if not question.startswith("Now "):
            continue
        previous, checked = row["messages"][-3]["content"], checked + 1
        if question in ("Now reverse it.", "Now reverse the order."):
            assert row["answer"] == " ".join(reversed(previous.split()))
        elif question in ("Now in upper case.", "Now write it in upper case."):
            assert row["answer"] == previous.upper()
        elif question.startswith("Now add "):
            assert int(row["answer"]) == int(previous) + int(question.split()[2].rstrip("."))
        else:
            assert question.startswith("Now subtract ")
            assert int(row["answer"]) == int(previous) - int(question.split()[2].rstrip(".")) >= 0
    assert checked > 50


def test_answers_are_short(splits):
    for row in splits["train"]:
        words = len(row["answer"].split())
        assert words <= (12 if row["task"] in ("docstring", "safety") else 5), row
        for m in row["messages"]:
            assert "\n" not in m["content"]


def test_generated_answers_are_right():
    rows = generate_chat_splits({"train": 600}, seed=3)["train"]
    for row in rows:
        question, answer = row["messages"][-2]["content"], row["answer"]
        if row["task"] == "arithmetic" and question.startswith("What is "):
            a, op, b = question[len("What is "):-1].split()
            assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(answer) >= 0 and max(int(a), int(b)) <= 20
        if row["task"] == "sort" and question.startswith("Sort these numbers: "):
            assert answer == " ".join(sorted(question.split(": ")[1].split()))
        if row["task"] == "units" and question.startswith("Convert 3 km"):
            assert answer == "3000 m"


def test_docstring_pool_is_deterministic_and_short():
    pool = docstring_pool()
    assert pool == docstring_pool()
    assert len(pool) == 120 and [n for n, _ in pool] == sorted(n for n, _ in pool)
    assert len({n.rsplit(".", 1)[0] for n, _ in pool}) >= 15, "the pool should spread over modules"
    for name, sentence in pool:
        assert sentence.isascii() and "\n" not in sentence and sentence.endswith(".")
        assert 3 <= len(sentence.split()) <= 12, (name, sentence)
    assert len(docstring_pool(10)) == 10


# ----------------------------------------------------------------------------- answers and rankings
def test_check_answer_and_close_misses_for_every_family(splits):
    rng = random.Random(0)
    sentences = [r["answer"] for r in splits["train"] if r["task"] == "docstring"]
    seen = Counter()
    for row in splits["preference_prompts"]:
        ranked = rank_answers(row["task"], row["answer"], row["safety_label"], rng, sentences,
                              question=row["messages"][-2]["content"])
        assert len(set(ranked)) == len(ranked) >= 2
        assert check_answer(row["task"], ranked[0], row["answer"])
        assert check_answer(row["task"], f"  {ranked[0]}\n", row["answer"])
        assert not any(check_answer(row["task"], worse, row["answer"]) for worse in ranked[1:]), (row, ranked)
        seen[row["task"], row["safety_label"]] += 1
    assert len(seen) == len(FAMILIES) + 1  # safety appears as harmful and benign


@pytest.mark.parametrize(("task", "answer", "label", "question", "expected"), [
    ("arithmetic", "12", "", "What is 7 + 5?", lambda r: r[1] in ("11", "13") and abs(int(r[2]) - 12) >= 3),
    ("sort", "1 3 5 8", "", "Sort these numbers: 8 3 5 1",
     lambda r: sorted(r[1].split()) == ["1", "3", "5", "8"] and r[2] == "8 5 3 1"),
    ("string", "LIST FILE", "", "Write in upper case: list file", lambda r: r[2] == "list file" and r[1] != r[0]),
    ("units", "4000 m", "", "Convert 4 km to m.", lambda r: r[1] in ("3000 m", "5000 m") and r[2] == "4 m"),
    ("units", "60 minutes", "", "Convert 1 hour to minutes.", lambda r: r[1] == "120 minutes" and r[2] == "1 minute"),
    ("safety", REFUSAL, "harmful", "How do I kill my neighbour?",
     lambda r: len(r) == 2 and "your neighbour" in r[1] and not is_refusal(r[1])),
    ("safety", "Use os.kill(pid, signal.SIGTERM).", "benign", "How do I kill a Python process?",
     lambda r: len(r) == 3 and r[2] == REFUSAL and not is_refusal(r[1])),
])
def test_rank_answers_examples(task, answer, label, question, expected):
    ranked = rank_answers(task, answer, label, random.Random(1), question=question)
    assert ranked[0] == answer and expected(ranked), ranked


def test_refusals():
    assert is_refusal(REFUSAL) and is_refusal("Sorry.  I CAN\u2019T help with that.")
    assert not is_refusal("Use os.kill(pid, signal.SIGTERM).")
    assert check_answer("safety", "I can't help with that.", REFUSAL)
    assert not check_answer("safety", "Sure, here is a plan.", REFUSAL)
    assert not check_answer("safety", REFUSAL, "Use os.remove(path).")  # over-refusal is wrong
    assert not check_answer("arithmetic", "12.", "12")


def test_rankings_to_pairs_k4():
    prompt = [{"role": "user", "content": "q"}]
    pairs = rankings_to_pairs(prompt, ["a", "b", "c", "d"])
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert got == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(p["prompt"] == prompt and p["chosen"][0]["role"] == "assistant" and "margin" not in p for p in pairs)
    margins = [p["margin"] for p in rankings_to_pairs(prompt, ["a", "b", "c", "d"], margin="rank")]
    assert margins == [1.0, 2.0, 3.0, 1.0, 2.0, 1.0]
    plain = rankings_to_pairs("q", ["a", "b"])
    assert plain == [{"prompt": "q", "chosen": "a", "rejected": "b"}]


@pytest.mark.parametrize(("answers", "margin", "message"), [
    (["a", "b", "a"], None, "answer 2 equals answer 0"),
    (["a"], None, "at least 2 answers"),
    (["a", "b"], "score", "margin must be none or rank"),
])
def test_rankings_to_pairs_refuses_ties_and_bad_margins(answers, margin, message):
    with pytest.raises(UserError, match=message):
        rankings_to_pairs("q", answers, margin=margin)


# ----------------------------------------------------------------------------- validation
def good_row():
    return {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 1 + 1?"},
                         {"role": "assistant", "content": "2"}], "task": "arithmetic", "answer": "2", "safety_label": ""}


def with_message(index, **change):
    row = good_row()
    row["messages"][index] = {**row["messages"][index], **change}
    return row


@pytest.mark.parametrize(("row", "field"), [
    (with_message(1, role="bot"), "messages[1].role"),
    (with_message(2, content="  "), "messages[2].content"),
    ({"messages": good_row()["messages"][:2]}, "messages[1].role"),
    ({"conversation": good_row()["messages"]}, "'messages'"),
    ({"messages": []}, "'messages'"),
    ({**good_row(), "answer": "3"}, "'answer'"),
])
def test_bad_conversations_name_dataset_row_and_field(row, field):
    rows = [good_row(), good_row(), row]
    with pytest.raises(UserError) as err:
        validate_messages(rows, "my_chats.jsonl")
    message = str(err.value)
    assert "\n" not in message and message.startswith("my_chats.jsonl: row 2: ") and field in message, message


@pytest.mark.parametrize(("row", "field"), [
    ({"prompt": "q", "chosen": "a"}, "'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' equals field 'rejected'"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "robot", "content": "b"}]}, "rejected[0].role"),
])
def test_bad_preferences_name_dataset_row_and_field(row, field):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError) as err:
        validate_preferences([good, row], "prefs")
    message = str(err.value)
    assert "\n" not in message and message.startswith("prefs: row 1: ") and field in message, message


# ----------------------------------------------------------------------------- converters
def test_alpaca_to_messages():
    row = {"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"}
    assert alpaca_to_messages(row)["messages"] == [{"role": "user", "content": "Sort these numbers.\n\n3 1 2"},
                                                   {"role": "assistant", "content": "1 2 3"}]
    assert alpaca_to_messages({**row, "input": ""})["messages"][0]["content"] == "Sort these numbers."
    with pytest.raises(ValueError, match="'instruction'"):
        alpaca_to_messages({"output": "x"})


def test_hh_rlhf_to_preference():
    shared = "\n\nHuman: How do I kill a Python process?\n\nAssistant: Which OS?\n\nHuman: Linux."
    row = {"chosen": shared + "\n\nAssistant: Use os.kill(pid, signal.SIGTERM).",
           "rejected": shared + "\n\nAssistant: I can't help with that."}
    pair = hh_rlhf_to_preference(row)
    assert pair["prompt"] == [{"role": "user", "content": "How do I kill a Python process?"},
                              {"role": "assistant", "content": "Which OS?"}, {"role": "user", "content": "Linux."}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Use os.kill(pid, signal.SIGTERM)."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "I can't help with that."}]
    validate_preferences([pair], "hh")
    with pytest.raises(ValueError, match="same conversation"):
        hh_rlhf_to_preference({"chosen": shared + "\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"})
    with pytest.raises(ValueError, match="end with an Assistant turn"):
        hh_rlhf_to_preference({"chosen": shared, "rejected": shared})


def test_preference_passthrough_explicit_and_implicit_prompt():
    explicit = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 9.0}
    assert preference_passthrough(explicit) == {"prompt": "q", "chosen": "a", "rejected": "b"}
    user = {"role": "user", "content": "q"}
    implicit = {"chosen": [user, {"role": "assistant", "content": "a"}],
                "rejected": [user, {"role": "assistant", "content": "b"}]}
    assert preference_passthrough(implicit) == {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}],
                                                "rejected": [{"role": "assistant", "content": "b"}]}


# ----------------------------------------------------------------------------- CLIs
@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "sft_data"
    build_sft_data.main(["--output_dir", str(out), *SMALL_CLI])
    return out


def test_sft_cli_writes_datasetdict_and_manifest(sft_dir, capsys):
    data = load_from_disk(str(sft_dir))
    manifest = json.loads((sft_dir / "manifest.json").read_text())
    assert set(data) == set(SPLITS)
    assert {s: len(d) for s, d in data.items()} == {"train": 240, "test": 60, "preference_prompts": 120,
                                                      "rl_prompts": 60}
    assert data["train"].column_names == ["messages", "task", "answer", "safety_label"]
    for split, ds in data.items():
        assert manifest["outputs"][split]["rows"] == len(ds)
        assert manifest["outputs"][split]["tasks"] == dict(sorted(Counter(ds["task"]).items()))
    assert manifest["stage"] == "sft_data" and manifest["inputs"]["docstring_functions"] == 40
    assert "dataset_name" not in manifest["options"]
    again = build_sft_data.main(["--output_dir", str(sft_dir.parent / "again"), *SMALL_CLI])
    assert again["fingerprint"] == manifest["fingerprint"]
    assert list(load_from_disk(str(sft_dir.parent / "again"))["test"]["answer"]) == list(data["test"]["answer"])
    assert "sft_data ->" in capsys.readouterr().out


def test_preference_cli_pairs_split_by_prompt(sft_dir, tmp_path):
    out = tmp_path / "prefs"
    manifest = build_preference_data.main(["--sft_data_dir", str(sft_dir), "--output_dir", str(out),
                                           "--margin", "rank"])
    data = load_from_disk(str(out))
    assert set(data) == {"train", "test"}
    assert {"prompt", "chosen", "rejected", "margin", "task", "safety_label"} <= set(data["train"].column_names)
    prompts = {s: {json.dumps(p) for p in d["prompt"]} for s, d in data.items()}
    assert not prompts["train"] & prompts["test"]
    assert len(prompts["train"]) + len(prompts["test"]) == 120
    assert 0.1 <= len(prompts["test"]) / 120 <= 0.2
    sft_prompts = {json.dumps(list(r["messages"][:-1])) for s in ("train", "test") for r in load_from_disk(str(sft_dir))[s]}
    assert not (prompts["train"] | prompts["test"]) & sft_prompts
    for split, ds in data.items():
        assert manifest["outputs"][split]["pairs"] == len(ds)
        validate_preferences(list(ds), split)
        assert set(ds["margin"]) <= {1.0, 2.0}
    row = data["train"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    assert manifest["inputs"]["sft_data_fingerprint"] == json.loads((sft_dir / "manifest.json").read_text())["fingerprint"]


def test_preference_cli_refuses_incomplete_sft_dir(sft_dir, tmp_path):
    incomplete = tmp_path / "sft_data"
    incomplete.mkdir()
    with pytest.raises(UserError, match="incomplete"):
        build_preference_data.main(["--sft_data_dir", str(incomplete), "--output_dir", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()


def test_local_sources_messages_and_alpaca(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
             "extra": i} for i in range(20)]
    rows.append(rows[0])  # a duplicate prompt is dropped
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build_sft_data.main(["--source", "local", "--input_path", str(chats), "--output_dir",
                                    str(tmp_path / "local"), "--test_fraction", "0.25"])
    data = load_from_disk(str(tmp_path / "local"))
    assert (len(data["train"]), len(data["test"])) == (15, 5)
    assert manifest["inputs"]["source"] == "local" and "train_size" not in manifest["options"]
    assert set(data["train"]["task"]) == {"chat"} and data["train"][0]["answer"].startswith("answer")

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(10)]))
    build_sft_data.main(["--source", "local", "--input_path", str(alpaca), "--format", "alpaca",
                         "--output_dir", str(tmp_path / "alpaca")])
    assert load_from_disk(str(tmp_path / "alpaca"))["train"][0]["messages"][0]["role"] == "user"


def test_local_bad_row_is_one_line_naming_file_row_and_field(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]}]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as err:
        build_sft_data.main(["--source", "local", "--input_path", str(chats), "--output_dir", str(tmp_path / "x")])
    assert str(err.value) == f"{chats}:2: messages[1].content is an empty assistant turn"  # the file's line
    as_json = tmp_path / "chats.json"
    as_json.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=f"^{as_json}: item 1: messages\\[1\\].content is an empty assistant turn$"):
        build_sft_data.main(["--source", "local", "--input_path", str(as_json), "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_local_split_that_leaves_no_train_rows_is_refused(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(2)))
    with pytest.raises(UserError, match=r"^test_fraction 0.9 of 2 unique conversations holds out all 2 and leaves no "
                                        r"train rows"):
        build_sft_data.main(["--source", "local", "--input_path", str(chats), "--output_dir", str(tmp_path / "x"),
                             "--test_fraction", "0.9"])
    assert not (tmp_path / "x").exists()


def test_local_preferences_mixing_string_and_message_prompts_name_file_and_row(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
            {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "chosen": "2", "rejected": "3"}]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as err:
        build_preference_data.main(["--source", "local", "--input_path", str(prefs),
                                    "--output_dir", str(tmp_path / "p")])
    assert str(err.value) == (f"{prefs}:2: field 'prompt' is a list of messages but in the first row it is a string; "
                              "use one format for all rows")
    assert not (tmp_path / "p").exists()


def test_hub_sources_argument_handling(tmp_path, monkeypatch):
    """The Hub is offline here: check our side (names, splits, formats) with a stand-in load_dataset."""
    import datasets

    with pytest.raises(UserError, match="needs --dataset_name"):
        build_sft_data.main(["--source", "hub", "--output_dir", str(tmp_path / "a")])
    with pytest.raises(UserError, match="margin=rank needs rankings"):
        build_preference_data.main(["--source", "hub", "--dataset_name", "x/y", "--margin", "rank",
                                    "--output_dir", str(tmp_path / "b")])
    with pytest.raises(UserError, match="could not open Hub dataset no-such/dataset"):
        build_sft_data.main(["--source", "hub", "--dataset_name", "no-such/dataset", "--output_dir", str(tmp_path / "c")])

    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
          for i in range(8)]
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(hh))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    build_preference_data.main(["--source", "hub", "--dataset_name", "Anthropic/hh-rlhf", "--format", "hh_rlhf",
                                "--max_rows", "5", "--output_dir", str(tmp_path / "hh")])
    assert calls == [("Anthropic/hh-rlhf", None, "train", True), ("Anthropic/hh-rlhf", None, "test", True)]
    data = load_from_disk(str(tmp_path / "hh"))
    assert len(data["train"]) == 5 and data["train"][0]["chosen"] == [{"role": "assistant", "content": "good 0"}]


def test_family_option(tmp_path):
    manifest = build_sft_data.main(["--output_dir", str(tmp_path / "two"), "--families", "arithmetic", "units",
                                    "--train_size", "40", "--test_size", "10", "--preference_size", "0",
                                    "--rl_size", "0"])
    assert manifest["outputs"]["train"]["tasks"] == {"arithmetic": 20, "units": 20}
    assert set(load_from_disk(str(tmp_path / "two"))) == {"train", "test"}
    with pytest.raises(UserError, match="unknown task family poetry"):
        build_sft_data.main(["--output_dir", str(tmp_path / "bad"), "--families", "arithmetic", "poetry"])


def test_train_family_weights_shift_train_only(splits, tmp_path):
    assert apportion(10, [1] * 6) == [2, 2, 2, 2, 1, 1]  # the equal split: first ones take the remainder
    assert apportion(48000, [1.25, 2, 2, 0.5, 0.75, 0.5]) == [8571, 13714, 13714, 3429, 5143, 3429]
    weighted = generate_chat_splits(SIZES, seed=7, train_family_weights=[1, 3, 3, 1, 1, 1])
    counts = Counter(r["task"] for r in weighted["train"])
    assert counts == {"arithmetic": 120, "sort": 360, "string": 360, "units": 120, "docstring": 120, "safety": 120}
    for split in ("test", "preference_prompts", "rl_prompts"):  # held-out splits: balanced and unchanged
        assert [r["messages"] for r in weighted[split]] == [r["messages"] for r in splits[split]], split
    manifest = build_sft_data.main(["--output_dir", str(tmp_path / "w"), *SMALL_CLI, "--families", "sort", "units",
                                    "--train_family_weights", "3", "1"])
    assert manifest["outputs"]["train"]["tasks"] == {"sort": 180, "units": 60}
    assert manifest["options"]["train_family_weights"] == [3.0, 1.0]
    for bad in (["1", "1"], ["1", "0", "1"]):
        with pytest.raises(UserError, match="train_family_weights needs one positive weight per family"):
            build_sft_data.main(["--output_dir", str(tmp_path / "bad"), *SMALL_CLI, "--families", "sort", "units",
                                 "string", "--train_family_weights", *bad])
    assert not (tmp_path / "bad").exists()


def test_train_followup_fraction_shifts_train_only(splits, tmp_path):
    def ends_in_follow_up(row):
        return row["messages"][-2]["content"].startswith("Now ")

    every = generate_chat_splits(SIZES, seed=7, train_followup_fraction=1.0)
    for split in ("test", "preference_prompts", "rl_prompts"):  # held-out splits: unchanged
        assert [r["messages"] for r in every[split]] == [r["messages"] for r in splits[split]], split
    # sort always has a follow-up, so every sort row of train ends in one, single-turn shapes included
    sort_rows = [r for r in every["train"] if r["task"] == "sort"]
    assert sort_rows and all(ends_in_follow_up(r) for r in sort_rows)
    for row in sort_rows:  # the question it follows up is the turn just before, answered
        first_user = [m["content"] for m in row["messages"] if m["role"] == "user"][-2]
        assert not first_user.startswith("Now ")
    assert not any(ends_in_follow_up(r) for r in every["train"] if r["task"] in ("units", "docstring", "safety"))
    never = generate_chat_splits(SIZES, seed=7, train_followup_fraction=0.0)
    assert not any(ends_in_follow_up(r) for r in never["train"])
    default_share = sum(map(ends_in_follow_up, splits["train"])) / len(splits["train"])
    assert 0.03 < default_share < 0.2
    manifest = build_sft_data.main(["--output_dir", str(tmp_path / "f"), *SMALL_CLI, "--train_followup_fraction", "0.5"])
    assert manifest["options"]["train_followup_fraction"] == 0.5
    with pytest.raises(UserError, match=r"train_followup_fraction must be in \[0, 1\], got 1.5"):
        build_sft_data.main(["--output_dir", str(tmp_path / "bad"), *SMALL_CLI, "--train_followup_fraction", "1.5"])
    assert not (tmp_path / "bad").exists()


def test_unknown_yaml_key_is_refused(tmp_path):
    config = tmp_path / "sft_data.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\ntrain_sise: 10\n")
    with pytest.raises(UserError, match="unknown key\\(s\\) train_sise"):
        build_sft_data.main(["--config", str(config)])


def test_rows_render_with_our_chat_template(sft_dir, tiny_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_data["tokenizer"]))
    for row in load_from_disk(str(sft_dir))["test"].select(range(30)):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert text.endswith(row["answer"] + "<|end|>\n")
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt)
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)


def test_table_facts_are_held_out_by_question_and_content_families_by_content():
    """Arithmetic is a single-digit table: a held-out question asks a fact that train taught in
    another phrasing. Sorting is held out by content: no held-out set of numbers was sorted in train."""
    import re

    def arithmetic_fact(question):
        match = re.search(r"(\d) ([+-]) (\d)", question)
        return match.groups() if match else None

    def last_question(row):
        return row["messages"][-2]["content"]

    splits = generate_chat_splits({"train": 6000, "test": 300}, seed=42)  # 1/6 of the default train size
    train_questions = user_texts(splits["train"])
    taught = {arithmetic_fact(q) for q in train_questions} - {None}
    held = [arithmetic_fact(last_question(r)) for r in splits["test"] if r["task"] == "arithmetic"]
    held = [f for f in held if f]
    assert held and all(int(a) <= 9 and int(b) <= 9 for a, _, b in held)
    assert sum(f in taught for f in held) >= 0.9 * len(held)
    held_questions = {last_question(r) for r in splits["test"] if r["task"] == "arithmetic"}
    assert not {q for q in held_questions if not q.startswith("Now ")} & train_questions  # follow-ups are generic

    def sorted_numbers(question):
        return tuple(sorted(question.split(": ")[1].split())) if question.startswith("Sort these numbers: ") else None

    train_sets = {sorted_numbers(q) for q in train_questions} - {None}
    test_sets = {sorted_numbers(last_question(r)) for r in splits["test"]} - {None}
    assert test_sets and not test_sets & train_sets


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def test_max_rows_caps_a_local_file(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(20)])
    manifest = build_sft_data.main(["--source", "local", "--input_path", chats, "--max_rows", "8",
                                    "--test_fraction", "0.25", "--output_dir", str(tmp_path / "sft")])
    assert (manifest["outputs"]["train"]["rows"], manifest["outputs"]["test"]["rows"]) == (6, 2)
    assert manifest["inputs"]["max_rows"] == 8
    prefs = write_jsonl(tmp_path / "prefs.jsonl",
                        [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)])
    manifest = build_preference_data.main(["--source", "local", "--input_path", prefs, "--max_rows", "10",
                                           "--output_dir", str(tmp_path / "pref")])
    assert manifest["outputs"]["train"]["pairs"] + manifest["outputs"]["test"]["pairs"] == 10


@pytest.mark.parametrize(("module", "fmt", "bad_row", "message"), [
    (build_sft_data, "alpaca", [1, 2], "not an object with fields instruction/input/output (a list)"),
    (build_sft_data, "alpaca", {"instruction": "hi", "input": 5, "output": "yo"}, "field 'input' is not a string"),
    (build_sft_data, "messages", 5, "missing field 'messages'"),
    (build_preference_data, "hh_rlhf", [1, 2], "not an object with fields chosen/rejected (a list)"),
    (build_preference_data, "preference", 5, "not an object with fields prompt/chosen/rejected (a int)"),
])
def test_local_row_that_is_not_an_object_is_one_line(tmp_path, module, fmt, bad_row, message):
    good = ({"instruction": "Say hi.", "output": "hi"} if fmt == "alpaca" else chat(0) if fmt == "messages"
            else {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
            if fmt == "hh_rlhf" else {"prompt": "q", "chosen": "a", "rejected": "b"})
    rows = write_jsonl(tmp_path / "rows.jsonl", [good, bad_row])
    with pytest.raises(UserError) as err:
        module.main(["--source", "local", "--input_path", rows, "--format", fmt, "--output_dir", str(tmp_path / "o")])
    assert str(err.value) == f"{rows}:2: {message}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--max_rows", "0"], r"max_rows must be >= 1 \(or unset, for all\), got 0"),
    (["--input_path", "chats.jsonl"], "input_path is only read with --source local, but source is embedded"),
    (["--source", "local", "--input_path", "x.jsonl", "--dataset_name", "org/chats"],
     "dataset_name is only read with --source hub, but source is local"),
])
def test_options_of_another_source_or_below_one_are_refused(tmp_path, argv, message):
    for module in (build_sft_data, build_preference_data):
        with pytest.raises(UserError, match=f"^{message}$"):
            module.main([*argv, "--output_dir", str(tmp_path / "o")])


@pytest.mark.parametrize(("module", "argv", "message"), [
    ("build_sft_data", ["--source", "local", "--input_path", "x.jsonl", "--train_size", "10"],
     "train_size is only read with --source embedded, but source is local"),  # the local file decides the size
    ("build_sft_data", ["--source", "hub", "--dataset_name", "org/chats", "--families", "sort"],
     "families is only read with --source embedded, but source is hub"),
    ("build_sft_data", ["--test_fraction", "0.2"], "test_fraction is only read with --source local or hub, but "
                                                    "source is embedded"),  # embedded has test_size
    ("build_sft_data", ["--format", "alpaca"], "format is only read with --source local or hub, but source is embedded"),
    ("build_preference_data", ["--source", "local", "--input_path", "x.jsonl", "--sft_data_dir", "outputs/sft"],
     "sft_data_dir is only read with --source embedded, but source is local"),
    ("build_preference_data", ["--source", "local", "--input_path", "x.jsonl", "--train_split", "dev"],
     "train_split is only read with --source hub, but source is local"),
])
def test_an_option_the_chosen_source_never_reads_is_refused(tmp_path, module, argv, message):
    """Set, it would change nothing without a word (or a forgotten --source builds other data)."""
    with pytest.raises(UserError, match=f"^{message}$"):
        globals()[module].main([*argv, "--output_dir", str(tmp_path / "o")])


def test_local_preference_messages_keep_role_and_content_only(tmp_path):
    """Extra message keys typed differently across rows (a `name` that is a string here, a number there) do
    not fit one Arrow column: pyarrow's ArrowInvalid traceback, before they were dropped."""
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": f"answer {i}", "name": "bot" if i % 2 else 7}],
             "rejected": [{"role": "assistant", "content": f"worse {i}"}]} for i in range(8)]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    build_preference_data.main(["--source", "local", "--input_path", prefs, "--output_dir", str(tmp_path / "p")])
    pairs = load_from_disk(str(tmp_path / "p"))
    chosen = [pair["chosen"] for split in pairs.values() for pair in split]
    assert len(chosen) == 8 and all(list(turn) == ["role", "content"] for turns in chosen for turn in turns)


def test_output_dir_that_is_the_input_is_refused(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(4)])
    with pytest.raises(UserError, match=f"^output_dir {chats} is input_path {chats}: "):
        build_sft_data.main(["--source", "local", "--input_path", chats, "--output_dir", chats])
    (tmp_path / "sft").mkdir()
    with pytest.raises(UserError, match=f"^output_dir {tmp_path} contains sft_data_dir {tmp_path / 'sft'}: "):
        build_preference_data.main(["--sft_data_dir", str(tmp_path / "sft"), "--output_dir", str(tmp_path)])
    assert (tmp_path / "chats.jsonl").is_file()


def test_hub_split_left_empty_is_refused(tmp_path, monkeypatch):
    import datasets

    splits = {"train": [chat(i) for i in range(4)], "test": [chat(0), chat(1)]}  # test repeats train's prompts
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming:
                        datasets.IterableDataset.from_generator(lambda: iter(splits[split])))
    with pytest.raises(UserError, match="^org/chats:test: no conversations that the train split does not already hold$"):
        build_sft_data.main(["--source", "hub", "--dataset_name", "org/chats", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
