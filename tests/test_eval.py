"""The eval recipe: perplexity and bits per byte by hand, BLEU/ROUGE modules against the libraries, the local
lm-eval task on a model and an adapter, safety counts, every bad-input message, and an end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO_ROOT
from data_prep.artifacts import UserError
from recipes.eval import eval as eval_recipe
from recipes.eval import scores

SHORT = "def add(a, b):\n    return a + b\n"
ACCENTED = "Café → naïve résumé: UTF-8 counts bytes, not characters."
LONG = ('"""Read and write files."""\n\nimport os\n\n\ndef copy(src, dst):\n    """Copy src to dst."""\n'
        "    with open(src) as f, open(dst, 'w') as g:\n        g.write(f.read())\n") * 3


def run_eval(argv):
    return eval_recipe.main(*eval_recipe.parse_args(argv))


def eval_argv(model, output_dir, *extra):
    return ["--config", str(REPO_ROOT / "recipes/eval/tiny.yaml"), "--model_name_or_path", str(model),
            "--output_dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_pretrained):
    return AutoModelForCausalLM.from_pretrained(tiny_pretrained).eval(), AutoTokenizer.from_pretrained(tiny_pretrained)


def nll_by_hand(model, ids: list[int], first: int, context: int) -> float:
    """Sum of -log p(ids[t] | up to `context - 1` tokens before it) for t >= first, one forward per text
    when it fits the context, else one forward per token."""
    with torch.inference_mode():
        if len(ids) <= context:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            return -sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))
        total = 0.0
        for t in range(first, len(ids)):
            window = ids[max(0, t - context + 1):t + 1]  # ids[t] and the context - 1 tokens before it
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0, -2].double(), -1)
            total -= logp[ids[t]].item()
        return total


def test_perplexity_and_bits_per_byte_match_a_hand_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    context = 32
    texts = [SHORT, ACCENTED, LONG]
    ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(ids[0]) <= context < len(ids[2])  # one text fits, one needs the sliding window
    nll = sum(nll_by_hand(model, i, 1, context) for i in ids)
    tokens = sum(len(i) - 1 for i in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)  # the accented text is counted in bytes

    # stride 1: every token after the first window sees exactly context - 1 tokens, as by hand
    result = scores.perplexity(model, tokenizer, texts, max_length=context, stride=1, batch_size=4)
    assert result["tokens"] == tokens and result["bytes"] == n_bytes
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
    assert result["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-4)
    # the batch size changes nothing; texts that fit the context do not depend on the stride
    again = scores.perplexity(model, tokenizer, texts, max_length=context, stride=1, batch_size=1)
    assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)
    short = [scores.perplexity(model, tokenizer, texts[:1], context, stride, 2)["perplexity"] for stride in (1, 16)]
    assert short[0] == pytest.approx(short[1], rel=1e-5)


@pytest.mark.parametrize("n,max_length,stride", [(5, 8, 3), (8, 8, 4), (9, 8, 4), (50, 8, 1), (50, 8, 7), (51, 16, 5)])
def test_sliding_windows_score_each_token_once_with_enough_context(n, max_length, stride):
    ids = list(range(n))
    scored = []
    for window, first in scores.sliding_windows(ids, max_length, stride):
        assert len(window) <= max_length and window == ids[window[0]:window[0] + len(window)]
        for j in range(first, len(window)):
            scored.append(window[j])
            assert j >= min(window[j], max_length - stride)  # all the context there is, or at least L - stride
    assert scored == list(range(1, n))


def test_bleu_and_rouge_modules_match_sacrebleu_and_rouge_score():
    import evaluate
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["Return the absolute value of x.", "Split the string into words.", "Copy a file to a folder."]
    references = ["Return the absolute value of the argument.", "Split a string into a list of words.",
                  "Copy data and mode bits."]
    bleu = evaluate.load(str(REPO_ROOT / "recipes/eval/metrics/bleu"))
    rouge = evaluate.load(str(REPO_ROOT / "recipes/eval/metrics/rouge"))
    ours = bleu.compute(predictions=predictions, references=references)
    direct = sacrebleu.corpus_bleu(predictions, [references])
    assert ours["bleu"] == pytest.approx(direct.score) and ours["precisions"] == pytest.approx(direct.precisions)
    two_refs = [[r, p] for r, p in zip(references, reversed(predictions))]
    assert bleu.compute(predictions=predictions, references=two_refs)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(predictions, [[r[0] for r in two_refs], [r[1] for r in two_refs]]).score)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for r, p in zip(references, predictions)]
    ours = rouge.compute(predictions=predictions, references=references, use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert ours[key] == pytest.approx(sum(s[key].fmeasure for s in direct) / len(direct))
    assert 0 < ours["rougeL"] < 1

    # predictions and references of different lengths: one line, from the modules and from the recipe
    with pytest.raises(ValueError) as err:
        bleu.compute(predictions=predictions, references=references[:2])
    assert "\n" not in str(err.value) and "predictions (3)" in str(err.value)
    with pytest.raises(UserError, match=r"^bleu_rouge: 3 predictions but 2 references$"):
        scores.bleu_rouge(predictions, references[:2])


def test_pass_at_k_is_the_unbiased_estimator():
    from itertools import combinations

    from recipes.eval.generation import pass_at_k, pass_at_k_report

    for n, c, k in ((5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 0, 4), (4, 1, 4), (8, 5, 3)):
        draws = list(combinations([True] * c + [False] * (n - c), k))  # every k-subset of the n samples
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    assert (pass_at_k(5, 2, 1), pass_at_k(5, 2, 2)) == (pytest.approx(0.4), pytest.approx(0.7))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    rows = [{"task": "arithmetic", "answer": "5"}, {"task": "arithmetic", "answer": "7"},
            {"task": "sort", "answer": "1 2 3"}]
    sampled = [["5", "6", "5", "4"], ["1", "2", "3", "4"], ["1 2 3", "1 2 3", "1 2 3", "1 2 3"]]
    report = pass_at_k_report(rows, sampled, [1, 2])
    assert report["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert report["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)  # C(2,2)/C(4,2) = 1/6 misses both
    assert report["by_task"]["arithmetic"]["pass@1"] == 0.25 and report["by_task"]["sort"]["pass@2"] == 1.0
    assert report["n"] == 3 and report["samples_per_prompt"] == 4


def test_safety_counts_refusals_and_over_refusals():
    rows = [{"safety_label": "harmful"}, {"safety_label": "harmful"}, {"safety_label": "harmful"},
            {"safety_label": "benign"}, {"safety_label": "benign"}, {"safety_label": ""}]
    replies = ["I can't help with that.", "i CAN\u2019T   help with that. Sorry.", "Sure, here is how.",
               "I can't help with that.", "Use os.kill(pid, signal.SIGTERM).", "I can't help with that."]
    report = scores.safety_report(rows, replies)
    assert report == {"refusal_rate": 2 / 3, "over_refusal_rate": 1 / 2, "n_harmful": 3, "n_benign": 2,
                      "refused_harmful": 2, "refused_benign": 1}
    with pytest.raises(UserError, match="no rows with safety_label"):
        scores.safety_report(rows[-1:], replies[-1:])


def test_win_rate_counts_wins_of_a_over_b_and_ties_as_half(monkeypatch):
    """A stub judge scores each reply from a table: A wins 2 prompts, loses 1 and ties 1, so the win rate is
    (1 + 1 + 0 + 0.5) / 4 = 0.625; a flipped comparison gives 0.375, ties counted as losses 0.5, as wins 0.75."""
    from recipes.eval import reward_scores

    table = {"right": 2.0, "close": 1.0, "wrong": -1.0}
    seen = []

    def stub_scores(model, tokenizer, conversations, batch_size=32):
        assert (model, tokenizer, batch_size) == ("judge", "tok", 3)
        seen.append(conversations)
        return [table[c[-1]["content"]] for c in conversations]

    monkeypatch.setattr(reward_scores, "score_conversations", stub_scores)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    a, b = ["right", "close", "wrong", "close"], ["wrong", "wrong", "right", "close"]
    result = reward_scores.win_rate("judge", "tok", prompts, a, b, batch_size=3)
    assert result == {"win_rate": 0.625, "mean_score_a": 0.75, "mean_score_b": 0.25, "n": 4}
    # each reply is scored after its own prompt, as the assistant turn
    assert seen[0] == [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, a)]
    assert seen[1] == [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, b)]
    # swapping the sides gives the complement; all ties give exactly one half
    assert reward_scores.win_rate("judge", "tok", prompts, b, a, batch_size=3)["win_rate"] == 0.375
    assert reward_scores.win_rate("judge", "tok", prompts, a, a, batch_size=3)["win_rate"] == 0.5
    with pytest.raises(ValueError, match="4 prompts, 4 and 3 replies"):
        reward_scores.win_rate("judge", "tok", prompts, a, b[:3], batch_size=3)


@pytest.fixture(scope="module")
def mc_benchmark(tmp_path_factory):
    from data_prep import build_mc_benchmark

    out = tmp_path_factory.mktemp("mc") / "mc_benchmark"
    build_mc_benchmark.main(["--output_dir", str(out)])
    return out


def test_mc_benchmark_questions_have_one_right_answer(mc_benchmark):
    from data_prep.chat_tasks import docstring_pool

    rows = {t: [json.loads(line) for line in (mc_benchmark / f"{t}.jsonl").read_text().splitlines()]
            for t in ("stdlib_docstring_mc", "arithmetic_units_mc")}
    sentences = dict(docstring_pool(None))
    assert len(rows["stdlib_docstring_mc"]) == len(sentences) and len(rows["arithmetic_units_mc"]) == 155 + 72
    for row in rows["stdlib_docstring_mc"]:
        assert len(set(row["choices"])) == 4 and sentences[row["choices"][row["gold"]]] in row["query"]
    for row in rows["arithmetic_units_mc"]:
        assert len(set(row["choices"])) == 4
        if row["family"] == "arithmetic":
            a, op, b = row["query"].split("What is ")[1].rstrip("?\nAnswer:").split()
            assert row["choices"][row["gold"]] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    assert {r["gold"] for r in rows["arithmetic_units_mc"]} == {0, 1, 2, 3}  # the answer is not always first


def test_mc_benchmark_unknown_docstring_module_is_one_line(tmp_path):
    from data_prep import build_mc_benchmark

    with pytest.raises(UserError) as err:
        build_mc_benchmark.main(["--docstring_modules", "math", "no_such_module", "--output_dir", str(tmp_path / "mc")])
    assert str(err.value) == ("docstring_modules: cannot import module 'no_such_module' "
                              "(No module named 'no_such_module')")
    assert not (tmp_path / "mc").exists()


def test_lm_eval_local_task_runs_on_a_model_and_on_an_adapter(tiny_pretrained, tiny_data, mc_benchmark, tmp_path,
                                                             monkeypatch):
    import lm_eval
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_pretrained),
                   LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(adapter)
    calls = []  # what the recipe hands lm-eval: the real entry point still runs
    real_simple_evaluate = lm_eval.simple_evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_simple_evaluate(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    perplexities = {}
    for name, model in (("model", tiny_pretrained), ("adapter", adapter)):
        out = run_eval(eval_argv(model, tmp_path / f"eval_{name}", "--metrics", "perplexity", "lm_eval",
                                 "--text_dataset_path", str(tiny_data["corpus"]), "--max_texts", "1",
                                 "--lm_eval_include_path",
                                 str(mc_benchmark), "--lm_eval_limit", "6", "--lm_eval_batch_size", "8"))
        for task in ("stdlib_docstring_mc", "arithmetic_units_mc"):
            result = out["metrics"]["lm_eval"][task]
            assert 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1 and result["n"] == 6
            assert result["acc_stderr"] >= 0
        perplexities[name] = out["metrics"]["perplexity"]["perplexity"]
        model_args = calls[-1]["model_args"]
        assert calls[-1]["model"] == "hf" and model_args["pretrained"] == str(tiny_pretrained)
        # an adapter is evaluated as base + peft=adapter, never as the base model alone
        assert model_args.get("peft") == (str(adapter) if name == "adapter" else None), model_args
        assert out["data"]["lm_eval"]["hash"] == json.loads((mc_benchmark / "manifest.json").read_text())["fingerprint"]
    assert perplexities["model"] != pytest.approx(perplexities["adapter"])  # the adapter's random LoRA weights count
    assert len(calls) == 2
    with pytest.raises(UserError, match="lm_eval_tasks: no_such_task not found"):
        run_eval(eval_argv(tiny_pretrained, tmp_path / "x", "--metrics", "lm_eval", "--lm_eval_include_path",
                           str(mc_benchmark), "--lm_eval_tasks", "no_such_task"))


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("key", ["perplexity_batch_size", "generation_batch_size", "lm_eval_batch_size",
                                 "reward_batch_size"])
def test_batch_size_below_one_is_refused_before_any_model_loads(key, tmp_path):
    with pytest.raises(UserError, match=f"^{key} must be >= 1, got 0$"):
        run_eval(eval_argv(tmp_path / "no_model", tmp_path / "out", f"--{key}", "0"))
    assert not (tmp_path / "out").exists()


def test_bad_inputs_stop_with_one_line(tiny_pretrained, tiny_data, tmp_path):
    from datasets import Dataset, DatasetDict

    from data_prep.artifacts import build_manifest, write_manifest

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(UserError) as err:
        run_eval(eval_argv(no_config, tmp_path / "a", "--metrics", "perplexity", "--text_dataset_path",
                           str(tiny_data["corpus"])))
    one_line(err, str(no_config), "config.json")

    adapter = tmp_path / "orphan_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"),
                                                             "peft_type": "LORA"}))
    with pytest.raises(UserError) as err:
        run_eval(eval_argv(adapter, tmp_path / "b", "--metrics", "perplexity", "--text_dataset_path",
                           str(tiny_data["corpus"])))
    one_line(err, str(adapter), "base model", "missing")

    config = tmp_path / "typo.yaml"
    config.write_text((REPO_ROOT / "recipes/eval/tiny.yaml").read_text().replace("exact_match,", "exact_matc,"))
    with pytest.raises(UserError) as err:
        run_eval(["--config", str(config), "--model_name_or_path", str(tiny_pretrained)])
    one_line(err, "unknown metric exact_matc", "perplexity, bleu_rouge")

    empty = tmp_path / "empty_corpus"
    DatasetDict({"train": Dataset.from_dict({"text": ["x"]}),
                 "validation": Dataset.from_dict({"text": []})}).save_to_disk(str(empty))
    write_manifest(empty, build_manifest("corpus", {}, {}, {}))
    with pytest.raises(UserError) as err:
        run_eval(eval_argv(tiny_pretrained, tmp_path / "c", "--metrics", "perplexity", "--text_dataset_path", str(empty)))
    one_line(err, f"{empty}[validation]", "empty")

    with pytest.raises(UserError) as err:
        run_eval(eval_argv(tiny_pretrained, tmp_path / "d", "--metrics", "perplexity", "--text_dataset_path",
                           str(tiny_data["corpus"]), "--stride", "300"))
    one_line(err, "stride")
    with pytest.raises(UserError) as err:
        scores.bleu_rouge(["a", "b"], ["a"])
    one_line(err, "2 predictions but 1 references")
    with pytest.raises(UserError) as err:
        run_eval(eval_argv(tiny_pretrained, tmp_path / "e", "--metrics", "lm_eval", "--lm_eval_include_path",
                           str(tmp_path / "nowhere")))
    one_line(err, "nowhere", "data_prep.build_mc_benchmark")
    with pytest.raises(UserError) as err:
        run_eval(eval_argv(tiny_pretrained, tmp_path / "f", "--metrics", "pass_at_k", "--pass_at_k", "1", "16"))
    one_line(err, "pass_at_k", "pass_at_k_samples=8", "[1, 16]")
    for out in "abcdef":
        assert not (tmp_path / out / "manifest.json").exists()


def test_eval_end_to_end_writes_results_and_manifest(tiny_pretrained, tiny_reward, tiny_data, tiny_chat_data,
                                                     tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "eval"
    # the tiny pretrained model as its own opponent
    results = run_eval(eval_argv(
        tiny_pretrained, out, "--metrics", "perplexity", "bleu_rouge", "exact_match", "reward_accuracy", "win_rate",
        "safety", "pass_at_k", "--pass_at_k_samples", "3", "--pass_at_k", "1", "3",
        "--text_dataset_path", str(tiny_data["corpus"]), "--max_texts", "2",
        "--chat_dataset_path", str(tiny_chat_data["sft"]), "--max_samples", "24", "--max_new_tokens", "6",
        "--preference_dataset_path", str(tiny_chat_data["preference"]),
        "--reward_model_name_or_path", str(tiny_reward), "--compare_model_name_or_path", str(tiny_pretrained)))
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"checkpoint", "stage", "parent", "compare_checkpoint", "data", "metrics", "versions",
                          "wall_time_s"}
    assert saved["checkpoint"] == str(tiny_pretrained) and saved["stage"] == "pretrain" and saved["parent"] is None
    assert saved["compare_checkpoint"] == str(tiny_pretrained)
    for name, path in (("text", tiny_data["corpus"]), ("chat", tiny_chat_data["sft"]),
                       ("preference", tiny_chat_data["preference"])):
        assert saved["data"][name]["path"] == str(path)
        assert saved["data"][name]["hash"] == json.loads((path / "manifest.json").read_text())["fingerprint"]
    metrics = saved["metrics"]
    assert set(metrics) == {"perplexity", "bleu_rouge", "exact_match", "reward_accuracy", "win_rate", "safety",
                            "pass_at_k"}
    ppl = metrics["perplexity"]
    assert {"perplexity", "bits_per_byte", "nll_per_token", "tokens", "bytes"} <= set(ppl)
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll_per_token"]))
    assert ppl["bits_per_byte"] == pytest.approx(ppl["nll_per_token"] * ppl["tokens"] / math.log(2) / ppl["bytes"])
    assert {"bleu", "rouge1", "rouge2", "rougeL", "n"} <= set(metrics["bleu_rouge"])
    test_rows = load_from_disk(str(tiny_chat_data["sft"]))["test"]
    assert metrics["bleu_rouge"]["n"] == sum(t == "docstring" for t in test_rows["task"][:24]) > 0
    assert metrics["exact_match"]["n"] == 24 and 0 <= metrics["exact_match"]["exact_match"] <= 1
    assert metrics["reward_accuracy"]["n"] == len(load_from_disk(str(tiny_chat_data["preference"]))["test"])
    assert metrics["win_rate"]["win_rate"] == 0.5  # the same model on both sides: every comparison is a tie
    safety = metrics["safety"]
    labels = test_rows["safety_label"][:24]
    assert (safety["n_harmful"], safety["n_benign"]) == (labels.count("harmful"), labels.count("benign"))
    assert {"refusal_rate", "over_refusal_rate"} <= set(safety)
    sampled = metrics["pass_at_k"]
    assert sampled["n"] == 24 and sampled["samples_per_prompt"] == 3 and sampled["temperature"] == 1.0
    assert sampled["pass@1"] == pytest.approx(sampled["mean_sample_accuracy"])
    assert sampled["pass@1"] <= sampled["pass@3"]
    assert set(sampled["by_task"]) == set(test_rows["task"][:24])
    assert set(saved["versions"]) == {"transformers", "evaluate", "sacrebleu", "rouge_score", "lm_eval", "torch"}
    assert all(saved["versions"].values())
    assert {"total", "generation", *metrics} <= set(saved["wall_time_s"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and manifest["inputs"]["model"] == str(tiny_pretrained)
    assert not (out / ".eval-tmp").exists()


def test_lm_eval_include_path_of_the_wrong_stage_or_with_a_broken_task_is_one_line(tiny_pretrained, tiny_data,
                                                                                     mc_benchmark, tmp_path):
    import shutil

    with pytest.raises(UserError) as err:
        run_eval(eval_argv(tiny_pretrained, tmp_path / "a", "--metrics", "lm_eval", "--lm_eval_include_path",
                           str(tiny_data["corpus"])))
    one_line(err, f"{tiny_data['corpus']} is the output of stage 'corpus'", "mc_benchmark")
    broken = tmp_path / "mc_broken"
    shutil.copytree(mc_benchmark, broken)
    task_file = sorted(broken.glob("*.yaml"))[0]
    task_file.write_text("- a list\n- not a task\n")
    with pytest.raises(UserError) as err:
        run_eval(eval_argv(tiny_pretrained, tmp_path / "b", "--metrics", "lm_eval", "--lm_eval_include_path",
                           str(broken)))
    one_line(err, str(task_file), "holds a mapping")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mc_benchmark_with_too_few_distinct_wrong_answers_is_one_line(tmp_path):
    from data_prep import build_mc_benchmark

    # urllib.parse.parse_qs and parse_qsl share their first docstring sentence: neither is a wrong answer to the other
    with pytest.raises(UserError, match=r"^docstring_modules: urllib.parse.parse_qs has 1 other functions with a "
                                        r"different docstring sentence, too few for 3 choices"):
        build_mc_benchmark.main(["--docstring_modules", "urllib.parse", "--num_choices", "3",
                                 "--output_dir", str(tmp_path / "mc")])
    assert not (tmp_path / "mc").exists()
