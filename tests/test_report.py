"""The report: a table row per model stage in lineage order, real PNGs, lineage, eval results, bad input.

The outputs tree is fake but shaped like the recipes' own: manifests through data_prep.artifacts,
`metrics.json` as the pretrain/SFT/reward recipes write them, `trainer_state.json` log histories with
the keys TRL's trainers (GRPO, DPO) and our PPO log, and an eval recipe result.
"""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from data_prep.artifacts import UserError, build_manifest, write_manifest
from recipes.eval import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL_STAGES = ["pretrain_tiny", "sft_tiny", "reward_tiny", "grpo_tiny", "ppo_tiny", "dpo_tiny"]  # lineage order


def _stage(root, name, stage, inputs, options=None, outputs=None, metrics=None, history=None, created=0):
    directory = root / name
    directory.mkdir(parents=True)
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics))
    if history is not None:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": history[-1]["step"],
                                                                   "log_history": history}))
    manifest = build_manifest(stage, inputs, options or {}, outputs or {})
    manifest["created_unix"] += created
    write_manifest(directory, manifest)
    return manifest["fingerprint"]


def _history(steps, **curves):
    """One log entry per step with every curve's value, as Trainer logs at each logging step."""
    return [{"step": s, "epoch": s / steps[-1], **{k.replace("__", "/"): f(s) for k, f in curves.items()}}
            for s in steps]


def make_outputs(root):
    """corpus -> {tokenizer, packed -> pretrain -> sft -> {reward, grpo, ppo (+ reward), dpo}}; sft_data -> pairs."""
    steps = list(range(10, 110, 10))
    fp = {"corpus": _stage(root, "corpus", "corpus", {"source": "stdlib", "files": 60, "hash": "47f5e898f4e0928b"},
                           {"seed": 42}, {"train": {"documents": 54, "bytes": 900_000},
                                          "validation": {"documents": 6, "bytes": 100_000}})}
    fp["tokenizer"] = _stage(root, "tokenizer", "tokenizer", {"corpus_dir": "outputs/corpus",
                                                              "corpus_fingerprint": fp["corpus"]},
                             {"vocab_size": 512}, {"vocab_size": 512, "bytes_per_token_validation": 3.1})
    fp["packed"] = _stage(root, "packed", "packed", {"corpus_dir": "outputs/corpus", "corpus_fingerprint": fp["corpus"],
                                                     "tokenizer_dir": "outputs/tokenizer",
                                                     "tokenizer_fingerprint": fp["tokenizer"]},
                          {"block_size": 64}, {"block_size": 64, "train": {"tokens": 90_000},
                                               "validation": {"tokens": 9_000}})
    # pretraining made before the recipe saved its final state: only checkpoints carry one
    fp["pretrain"] = _stage(root, "pretrain_tiny", "pretrain",
                            {"dataset_path": str(root / "packed"), "dataset_fingerprint": fp["packed"],
                             "tokenizer_path": str(root / "tokenizer"), "resumed_from": None},
                            {"architecture": {"model_type": "llama", "hidden_size": 32},
                             "training": {"learning_rate": 5e-3, "max_steps": 100}},
                            {"eval_loss": 4.2, "steps": 100},
                            metrics={"params": 40_000, "steps": 100, "train_loss": 5.1, "eval_loss": 4.2,
                                     "eval_perplexity": math.exp(4.2), "init_eval_loss": 6.3})
    for step in (50, 100):
        checkpoint = root / "pretrain_tiny" / f"checkpoint-{step}"
        checkpoint.mkdir()
        history = [{"step": 0, "eval_loss": 6.3}] + _history([s for s in steps if s <= step],
                                                              loss=lambda s: 6.0 * math.exp(-s / 60) + 3)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (root / "pretrain_tiny" / "config.json").write_text("{}")

    fp["sft_data"] = _stage(root, "sft_data", "sft_data", {"source": "embedded"}, {"seed": 42},
                            {"train": {"rows": 120}, "test": {"rows": 24}})
    fp["preference_data"] = _stage(root, "preference_data", "preference_data",
                                   {"sft_data_dir": "outputs/sft_data", "sft_data_fingerprint": fp["sft_data"]},
                                   {"margin": "rank"}, {"train": {"pairs": 50}, "test": {"pairs": 10}})
    exact = lambda v: {"exact_match": v, "n": 24, "by_task": {"sort": v, "arithmetic": v / 2},  # noqa: E731
                       "samples": [{"prompt": "p", "prediction": "x", "correct": False}]}
    fp["sft"] = _stage(root, "sft_tiny", "sft", {"model": "outputs/pretrain_tiny", "model_fingerprint": fp["pretrain"],
                                                 "dataset_path": "outputs/sft_data",
                                                 "dataset_fingerprint": fp["sft_data"]},
                       {"peft": None, "training": {"learning_rate": 3e-3, "assistant_only_loss": True}},
                       {"exact_match_before": 0.0, "exact_match_after": 0.5}, created=1,
                       metrics={"train_loss": 1.2, "steps": 100, "exact_match_before": exact(0.0),
                                "exact_match_after": exact(0.5)},
                       history=_history(steps, loss=lambda s: 3 - s / 50, mean_token_accuracy=lambda s: s / 120,
                                        entropy=lambda s: 2 - s / 100))
    pairwise = lambda a: {"accuracy": a, "mean_margin": 2 * a, "n": 10}  # noqa: E731
    _stage(root, "reward_tiny", "reward", {"model": str(root / "sft_tiny"), "model_fingerprint": "0123456789abcdef",
                                           "dataset_path": str(root / "preference_data"),
                                           "dataset_fingerprint": fp["preference_data"]},
           {"training": {"learning_rate": 1e-3}}, created=2,
           metrics={"train_loss": 0.4, "steps": 100, "pairwise_before": pairwise(0.5), "pairwise_after": pairwise(0.8)},
           history=_history(steps, loss=lambda s: 0.7 - s / 400, accuracy=lambda s: 0.5 + s / 400,
                            mean_reward=lambda s: s / 100, margin=lambda s: s / 50))
    # PPO writes before/after; GRPO, RLOO and DPO write eval_before/eval_after with nested figures
    ppo_metrics = {"before": {"mean_reward": 0.1, "exact_match": 0.5, "kl_per_sequence": 0.0},
                   "after": {"mean_reward": 0.7, "exact_match": 0.6, "kl_per_sequence": 1.5, "samples": []}}
    policy_eval = lambda score, kl: {"n": 24, "exact_match": exact(0.6), "reward_model_score": score,  # noqa: E731
                                     "reward_model_score_by_task": {"sort": score}, "kl": {"kl_per_sequence": kl}}
    grpo_metrics = {"eval_before": policy_eval(0.1, 0.0), "eval_after": policy_eval(0.9, 1.2), "steps": 100}
    _stage(root, "grpo_tiny", "grpo", {"model": str(root / "sft_tiny"), "dataset_path": str(root / "sft_data")},
           {"training": {"beta": 0.04}}, created=3, metrics=grpo_metrics,
           history=_history(steps, loss=lambda s: 0.01 * s, reward=lambda s: s / 100, reward_std=lambda s: 0.2,
                            kl=lambda s: s / 500, completions__mean_length=lambda s: 20 + s / 10,
                            rewards__exact_match_reward__mean=lambda s: s / 120, entropy=lambda s: 1 - s / 200))
    _stage(root, "ppo_tiny", "ppo", {"model": str(root / "sft_tiny"), "reward_model_path": str(root / "reward_tiny"),
                                     "dataset_path": str(root / "sft_data")},
           {"training": {"kl_coef": 0.05}}, created=4, metrics=ppo_metrics,
           history=_history(steps, reward=lambda s: s / 100, kl=lambda s: s / 300,
                            objective__rlhf_reward=lambda s: s / 100 - s / 6000, entropy=lambda s: 1.5 - s / 300,
                            loss__policy=lambda s: -0.01 * s, loss__value=lambda s: 1 / s, clipfrac=lambda s: 0.1,
                            approxkl=lambda s: 0.001 * s, response_length=lambda s: 24))
    _stage(root, "dpo_tiny", "dpo", {"model": str(root / "sft_tiny"), "dataset_path": str(root / "preference_data")},
           {"training": {"beta": 0.1}}, created=5, metrics={"train_loss": 0.6, "steps": 100},
           history=_history(steps, loss=lambda s: 0.69 - s / 500, rewards__chosen=lambda s: s / 200,
                            rewards__rejected=lambda s: -s / 200, rewards__margins=lambda s: s / 100,
                            rewards__accuracies=lambda s: 0.5 + s / 250))

    # the eval recipe's result for the SFT checkpoint, in its own output directory (with its own manifest)
    eval_dir = root / "eval_sft_tiny"
    eval_dir.mkdir()
    (eval_dir / "eval_results.json").write_text(json.dumps({
        "checkpoint": "outputs/sft_tiny", "stage": "sft", "parent": "outputs/pretrain_tiny",
        "compare_checkpoint": "outputs/pretrain_tiny",
        "data": {"sft_test": {"path": "outputs/sft_data", "split": "test", "hash": fp["sft_data"]}},
        "metrics": {"perplexity": {"perplexity": 12.5, "bits_per_byte": 1.1, "nll_per_token": 2.53, "tokens": 900,
                                   "bytes": 3000},
                    "bleu_rouge": {"bleu": 31.0, "rouge1": 0.5, "rouge2": 0.3, "rougeL": 0.45, "n": 24},
                    "exact_match": {"exact_match": 0.55, "n": 24, "by_task": {"sort": 0.6}},
                    "lm_eval": {"stdlib_mc": {"acc": 0.4, "acc_norm": 0.42}},
                    "reward_accuracy": {"accuracy": 0.85, "mean_margin": 1.5, "n": 10},  # reward_tiny's, as judge
                    "win_rate": {"win_rate": 0.75, "mean_score_a": 1.0, "mean_score_b": 0.2, "n": 24},
                    "safety": {"refusal_rate": 0.9, "over_refusal_rate": 0.1, "n_harmful": 10, "n_benign": 10}},
        "versions": {"sacrebleu": "2.5.1"}, "wall_time_s": {"perplexity": 1.5}}))
    eval_inputs = {"model": "outputs/sft_tiny", "reward_model": "outputs/reward_tiny"}
    write_manifest(eval_dir, build_manifest("eval", eval_inputs, {}, {}))
    # an evaluated checkpoint outside the root gets its own row
    (root / "eval_hub").mkdir()
    (root / "eval_hub" / "eval_results.json").write_text(json.dumps(
        {"checkpoint": "HuggingFaceTB/SmolLM2-135M", "stage": "hub", "parent": None,
         "metrics": {"perplexity": {"perplexity": 20.0}}}))
    write_manifest(root / "eval_hub", build_manifest("eval", {"checkpoint": "HuggingFaceTB/SmolLM2-135M"}, {}, {}))
    # an eval still running (its manifest comes last): its old or partial result is not read
    (root / "eval_running").mkdir()
    (root / "eval_running" / "eval_results.json").write_text(json.dumps(
        {"checkpoint": "outputs/sft_tiny", "metrics": {"exact_match": {"exact_match": 0.01}}}))
    # skipped: unfinished, notebooks, an earlier report
    (root / "sft_half_done").mkdir()
    (root / "sft_half_done" / "model.safetensors").write_bytes(b"")
    (root / "notebooks").mkdir()
    write_manifest(root / "notebooks", build_manifest("notebook", {}, {}, {}))
    return root


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(outputs root, report dir, summary), rendered into the usual place inside the root, as
    `python -m recipes.eval.report outputs --output_dir outputs/report` does."""
    outputs = make_outputs(tmp_path_factory.mktemp("lifecycle") / "outputs")
    summary = report.main([str(outputs), "--output_dir", str(outputs / "report")])
    return outputs, outputs / "report", summary


def _table_rows(markdown: str, section: str) -> list[list[str]]:
    body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("|")]
    return rows[2:]  # without header and rule


def test_report_has_a_row_per_stage_in_lineage_order_and_readable_pngs(rendered):
    outputs, out, summary = rendered
    markdown = (out / "report.md").read_text()

    rows = {row[0]: row for row in _table_rows(markdown, "Metrics across stages")}
    # parents first; siblings in lifecycle order, then by creation; the Hub checkpoint known from an eval last
    assert list(rows) == [*MODEL_STAGES, "HuggingFaceTB/SmolLM2-135M"]
    column = {name: i for i, name in enumerate(summary["table"]["header"])}
    # the eval recipe's value wins over the recipe's own; RL rows show the 'after' of metrics.json
    assert rows["sft_tiny"][column["exact match"]] == "0.550"
    assert rows["sft_tiny"][column["perplexity"]] == "12.500"
    assert rows["sft_tiny"][column["win rate"]] == "0.750 vs pretrain_tiny"
    assert rows["sft_tiny"][column["stdlib_mc acc"]] == "0.400"
    # pairwise accuracy describes the judging reward model: its row, not the evaluated SFT checkpoint's
    assert rows["reward_tiny"][column["pairwise acc"]] == "0.850" and rows["sft_tiny"][column["pairwise acc"]] == ""
    # a column mixing the eval recipe's values with a stage's own marks the stage's own
    assert rows["pretrain_tiny"][column["perplexity"]] == f"{math.exp(4.2):.3f}*"
    assert rows["ppo_tiny"][column["mean reward"]] == "0.700" and rows["ppo_tiny"][column["KL/seq (nats)"]] == "1.500"
    assert rows["grpo_tiny"][column["mean reward"]] == "0.900" and rows["grpo_tiny"][column["KL/seq (nats)"]] == "1.200"
    assert rows["grpo_tiny"][column["exact match"]] == "0.600*"  # its own; SFT's in this column is the eval's
    assert rows["pretrain_tiny"][column["val loss"]] == "4.200"
    data_rows = {row[0] for row in _table_rows(markdown, "Data")}
    assert data_rows == {"corpus", "tokenizer", "packed", "sft_data", "preference_data"}
    for skipped in ("eval_sft_tiny", "eval_hub", "eval_running", "notebooks", "sft_half_done", "report"):
        assert skipped not in rows and skipped not in data_rows
    assert "unfinished (no manifest.json): `eval_running`, `sft_half_done`" in markdown

    # loss curves where a loss is logged (our PPO logs loss/policy and loss/value only), RL curves only where
    # reward or KL keys are logged: not for SFT (entropy) nor the reward model (accuracy, mean_reward)
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == sorted([f"{n}_loss.png" for n in MODEL_STAGES if n != "ppo_tiny"]
                             + ["grpo_tiny_rl.png", "ppo_tiny_rl.png", "dpo_tiny_rl.png"])
    from matplotlib.image import imread

    for path in (out / "figures").glob("*.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert np.std(image[..., :3]) > 0.01, f"{path.name} is blank"
        assert f"](figures/{path.name})" in markdown
    # pretraining made before recipes saved trainer_state.json: the newest checkpoint's is used
    assert "pretrain_tiny/checkpoint-100/trainer_state.json" in markdown


def test_lineage_lists_parents_side_inputs_and_stale_fingerprints(rendered):
    outputs, out, summary = rendered
    stages = summary["stages"]
    assert stages["packed"]["parent"] == "corpus" and stages["pretrain_tiny"]["parent"] == "packed"
    assert stages["sft_tiny"]["parent"] == "pretrain_tiny"
    for rl in ("reward_tiny", "grpo_tiny", "ppo_tiny", "dpo_tiny"):
        assert stages[rl]["parent"] == "sft_tiny", rl
    assert stages["ppo_tiny"]["inputs"]["reward_model_path"] == "reward_tiny"  # a side input, not the parent
    assert stages["HuggingFaceTB/SmolLM2-135M"]["parent"] is None
    assert stages["sft_tiny"]["eval_results"] == [str(outputs / "eval_sft_tiny" / "eval_results.json")]
    markdown = (out / "report.md").read_text()
    assert "corpus -> {tokenizer, packed -> pretrain_tiny -> sft_tiny -> {" in markdown
    assert "sft_data -> preference_data" in markdown
    assert re.search(r"ppo_tiny +\[ppo\] +\+ .*reward_tiny", markdown)
    section = markdown.split("### `reward_tiny` (reward)", 1)[1].split("\n### ", 1)[0]
    assert "parent: `sft_tiny`" in section
    assert "`0123456789abcdef` recorded, but `sft_tiny` is now" in section  # sft was rebuilt after the reward model
    assert f"`{outputs / 'preference_data'}` -> `preference_data`" in section
    assert "learning_rate=0.001" in section  # its config
    assert "As the judging reward model in" in section and "| reward_accuracy.accuracy | 0.850 |" in section
    sft = markdown.split("### `sft_tiny` (sft)", 1)[1].split("\n### ", 1)[0]
    assert "`sft_test`: `outputs/sft_data` [test] hash" in sft and "exact_match_after.by_task.sort" in sft


def test_html_is_self_contained_and_the_report_has_its_own_manifest(rendered):
    outputs, out, summary = rendered
    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(list((out / "figures").glob("*.png"))) == 8
    assert 'src="figures/' not in page
    assert base64.b64decode(images[0])[:8] == PNG_MAGIC
    assert "<table>" in page and "<td class=num>0.550</td>" in page
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "report" and manifest["inputs"]["stages"]["sft_tiny"]
    assert not [p for p in outputs.iterdir() if p.name.startswith(".report")]  # no temporary directory left


def test_a_rerun_replaces_the_earlier_report_and_does_not_report_on_it(tmp_path):
    root = tmp_path / "outputs"
    _stage(root, "corpus", "corpus", {"source": "stdlib"})
    _stage(root, "sft_tiny", "sft", {"model": "HuggingFaceTB/SmolLM2-135M"}, metrics={"train_loss": 1.0})
    report.main([str(root), "--output_dir", str(root / "report")])
    (root / "report" / "stale.txt").write_text("from an earlier run")
    summary = report.main([str(root), "--output_dir", str(root / "report")])
    assert set(summary["stages"]) == {"corpus", "sft_tiny"}
    assert not (root / "report" / "stale.txt").exists() and (root / "report" / "report.html").is_file()
    assert summary["stages"]["sft_tiny"]["parent"] == "HuggingFaceTB/SmolLM2-135M"  # a Hub parent stays its id
    assert "HuggingFaceTB/SmolLM2-135M  (not under this root" in (root / "report" / "report.md").read_text()


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UserError, match="outputs directory not found"):
        report.main([str(tmp_path / "missing"), "--output_dir", str(tmp_path / "r")])
    (tmp_path / "empty" / "unfinished").mkdir(parents=True)
    with pytest.raises(UserError, match="no stage outputs"):
        report.main([str(tmp_path / "empty"), "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    make_outputs(tmp_path / "outputs")
    with pytest.raises(UserError, match="holds the output of stage 'sft', which this report stage would replace"):
        report.main([str(tmp_path / "outputs"), "--output_dir", str(tmp_path / "outputs" / "sft_tiny")])
    with pytest.raises(UserError, match="would replace the outputs"):
        report.main([str(tmp_path / "outputs"), "--output_dir", str(tmp_path)])
    (tmp_path / "outputs" / "sft_tiny" / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="sft_tiny/metrics.json: not readable JSON"):
        report.main([str(tmp_path / "outputs"), "--output_dir", str(tmp_path / "r")])
    (tmp_path / "outputs" / "sft_tiny" / "metrics.json").write_text("[1]")  # JSON, but not what a recipe writes
    with pytest.raises(UserError, match=r"sft_tiny/metrics.json: not a JSON object \(a list\)$"):
        report.main([str(tmp_path / "outputs"), "--output_dir", str(tmp_path / "r")])
    (tmp_path / "outputs" / "sft_tiny" / "metrics.json").unlink()
    state = next((tmp_path / "outputs").glob("*/trainer_state.json"))
    state.write_text(json.dumps({"log_history": {"loss": 1.0}}))
    with pytest.raises(UserError, match=f"^{state}: log_history is not a list of logged rows$"):
        report.main([str(tmp_path / "outputs"), "--output_dir", str(tmp_path / "r")])
    state.write_text("[]")
    with pytest.raises(UserError, match=f"^{state}: not a JSON object"):
        report.main([str(tmp_path / "outputs"), "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_command_line_error_is_one_line_with_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recipes.eval.report", str(tmp_path / "nope"), "--output_dir",
                             str(tmp_path / "r")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: outputs directory not found: {tmp_path / 'nope'}"]


def test_a_real_pretraining_output_reports_its_final_trainer_state(tiny_pretrained, tmp_path):
    """The pretraining recipe now saves trainer_state.json beside its model; the report plots that one."""
    state = json.loads((tiny_pretrained / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    summary = report.main([str(tiny_pretrained.parent), "--output_dir", str(tmp_path / "report")])
    assert summary["stages"]["pretrain"]["figures"] == ["figures/pretrain_loss.png"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"Curves from `{report._shown(tiny_pretrained / 'trainer_state.json')}`:" in markdown


def test_summary_prints_a_line_for_the_report_and_eval_outputs(rendered):
    from recipes import summary as stage_summary

    outputs, out, _ = rendered
    lines = {directory: figures for _, directory, figures in stage_summary.summarize(outputs)}
    assert lines[str(out)] == f"{json.loads((out / 'manifest.json').read_text())['outputs']['model_rows']} " \
                              "checkpoints in the metric table, 8 figures, report.html"
    eval_outputs = {"perplexity_perplexity": 38.85, "exact_match_exact_match": 0.7167, "bleu_rouge_bleu": 88.5,
                    "win_rate_win_rate": 0.77, "safety_refusal_rate": 1.0, "perplexity_tokens": 35518}
    assert stage_summary.KEY_FIGURES["eval"](eval_outputs) == ("perplexity 38.9, exact match 71.7%, BLEU 88.5, "
                                                               "win rate 0.77, refusal 1.00")


def test_an_eval_of_an_earlier_build_is_left_out_of_the_rebuilt_stage(tmp_path):
    """The eval's manifest records the fingerprint of the checkpoint it evaluated; once that directory holds
    another build, its figures describe a model that is gone."""
    outputs = make_outputs(tmp_path / "outputs")
    sft_fingerprint = json.loads((outputs / "sft_tiny" / "manifest.json").read_text())["fingerprint"]
    (outputs / "eval_old").mkdir()
    (outputs / "eval_old" / "eval_results.json").write_text(json.dumps(  # judged by the current reward_tiny
        {"checkpoint": "outputs/sft_tiny", "reward_model": "outputs/reward_tiny",
         "metrics": {"exact_match": {"exact_match": 0.01}, "reward_accuracy": {"accuracy": 0.33, "n": 10}}}))
    write_manifest(outputs / "eval_old", build_manifest("eval", {"model": "outputs/sft_tiny",
                                                                 "model_fingerprint": "0" * 16}, {}, {}))
    summary = report.main([str(outputs), "--output_dir", str(tmp_path / "r")])
    markdown = (tmp_path / "r" / "report.md").read_text()
    column = {name: i for i, name in enumerate(summary["table"]["header"])}
    rows = {row[0]: row for row in _table_rows(markdown, "Metrics across stages")}
    assert rows["sft_tiny"][column["exact match"]] == "0.550"
    # pairwise accuracy is the judge's, whichever checkpoint the eval evaluated: it stays with reward_tiny
    assert "eval_old/eval_results.json`: pairwise accuracy on held-out pairs" in markdown
    # the judge rebuilt since: its pairwise accuracy from that eval is not this reward model's
    (outputs / "eval_old_judge").mkdir()
    (outputs / "eval_old_judge" / "eval_results.json").write_text(json.dumps(
        {"checkpoint": "outputs/sft_tiny", "reward_model": "outputs/reward_tiny",
         "metrics": {"reward_accuracy": {"accuracy": 0.11, "n": 10}, "win_rate": {"win_rate": 0.01, "n": 8}}}))
    write_manifest(outputs / "eval_old_judge", build_manifest("eval", {
        "model": "outputs/sft_tiny", "model_fingerprint": sft_fingerprint, "reward_model": "outputs/reward_tiny",
        "reward_model_fingerprint": "1" * 16}, {}, {}))
    report.main([str(outputs), "--output_dir", str(tmp_path / "r2")])
    rebuilt = (tmp_path / "r2" / "report.md").read_text()
    rows = {row[0]: row for row in _table_rows(rebuilt, "Metrics across stages")}
    assert rows["reward_tiny"][column["pairwise acc"]] == "0.850"  # its current build's, from eval_sft_tiny
    assert rows["sft_tiny"][column["win rate"]] == "0.750 vs pretrain_tiny"  # the old judge's 0.01 is left out
    assert "As the judging reward model in `" in rebuilt and "eval_old_judge/eval_results.json`: pairwise" not in rebuilt
    assert (f"eval_old_judge/eval_results.json` judged with fingerprint `{'1' * 16}`, an earlier build of "
            "`reward_tiny`") in rebuilt
    assert (f"eval_old/eval_results.json` evaluated fingerprint `{'0' * 16}`, an "
            f"earlier build of `sft_tiny` (now `{sft_fingerprint}`)") in markdown


def test_summary_lists_a_damaged_manifest_and_goes_on(tmp_path):
    """A damaged manifest stopped the summary, the speedrun's last step, with a JSONDecodeError traceback."""
    from recipes import summary as stage_summary

    root = tmp_path / "outputs"
    make_outputs(root)
    damaged = {"truncated": '{"stage": "pretrain", "outputs": {}', "a_list": "[]", "no_stage": '{"outputs": []}'}
    for name, text in damaged.items():
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(text)
    rows = {Path(directory).name: (stage, figures) for stage, directory, figures in stage_summary.summarize(root)}
    assert rows["truncated"] == ("?", f"{root / 'truncated' / 'manifest.json'}:1: not a valid manifest (not JSON); "
                                      "rerun the stage that wrote it")
    assert rows["a_list"] == ("?", f"{root / 'a_list' / 'manifest.json'}: not a valid manifest (not a JSON object); "
                                   "rerun the stage that wrote it")
    assert rows["no_stage"] == ("?", f"{root / 'no_stage' / 'manifest.json'}: not a valid manifest (no 'stage'); "
                                     "rerun the stage that wrote it")
    assert rows["sft_tiny"][0] == "sft"  # the other stages are still listed
    result = subprocess.run([sys.executable, "-m", "recipes.summary", str(tmp_path / "missing")], capture_output=True,
                            text=True)
    assert (result.returncode, result.stderr) == (2, f"error: no outputs directory at {tmp_path / 'missing'}\n")
