"""The TRL RL recipes (GRPO, RLOO, DPO) on tiny fixtures, the shared reward functions, prompts and KL,
and their one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO_ROOT, run_interrupted_and_resumed
from data_prep.artifacts import UserError
from data_prep.chat_tasks import REFUSAL
from recipes.rl import dpo, grpo, rloo
from recipes.rl.prompts import load_prompts, prompt_row, to_prompt_dataset, truncate_prompts
from recipes.rl.rewards import RewardModelScorer, build_reward_funcs, correctness_reward

ONLINE = {"grpo": grpo, "rloo": rloo}
USER = [{"role": "user", "content": "What is 2 + 3?"}]


# ----------------------------------------------------------------------------- rewards
def test_correctness_reward_by_hand():
    prompts = [USER] * 6
    replies = ["5", " 5 ", "6", "I can't help with that.", "Sure, here is how.", "anything"]
    tasks = ["arithmetic", "arithmetic", "arithmetic", "safety", "safety", "chat"]
    answers = ["5", "5", "5", REFUSAL, REFUSAL, None]
    expected = [1.0, 1.0, 0.0, 1.0, 0.0, None]
    conversational = [[{"role": "assistant", "content": r}] for r in replies]
    assert correctness_reward(prompts, conversational, task=tasks, answer=answers) == expected
    assert correctness_reward(prompts, replies, task=tasks, answer=answers) == expected
    # a benign look-alike must get its own answer; a refusal is wrong there
    assert correctness_reward([USER], ["I can't help with that."], task=["safety"],
                              answer=["Use os.kill(pid, signal.SIGTERM)."]) == [0.0]
    assert correctness_reward([USER], ["5"]) == [None]  # a prompt set without task/answer columns


def test_reward_model_scorer_gives_score_conversations_figures(tiny_reward):
    from recipes.eval.reward_scores import score_conversations

    scorer = RewardModelScorer(str(tiny_reward), batch_size=2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward)
    prompts = [USER, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort: 3 1 2"}],
               USER]
    replies = ["5", "1 2 3", "I can't help with that."]
    expected = score_conversations(model, tokenizer, [p + [{"role": "assistant", "content": r}]
                                                      for p, r in zip(prompts, replies)])
    as_trl = scorer(prompts=prompts, completions=[[{"role": "assistant", "content": r}] for r in replies])
    assert as_trl == pytest.approx(expected, abs=1e-5)
    assert scorer(prompts=prompts, completions=replies) == pytest.approx(expected, abs=1e-5)
    assert scorer.score(prompts, replies) == pytest.approx(expected, abs=1e-5)
    assert scorer.__name__ == "reward_model" and len(set(round(x, 4) for x in expected)) > 1

    scorer.score_conversations = lambda conversations: [float("nan")] * len(conversations)
    with pytest.raises(UserError, match="non-finite reward nan at step 7, batch item 0"):
        scorer(prompts=prompts, completions=replies, trainer_state=SimpleNamespace(global_step=7))

    # reward_model_clip bounds the training reward; the held-out path (score) stays raw
    clip = sorted(abs(x) for x in expected)[1]  # at least one score lies outside [-clip, clip]
    clipped = RewardModelScorer(str(tiny_reward), batch_size=2, clip=clip)
    assert clipped(prompts=prompts, completions=replies) == pytest.approx(
        [min(max(x, -clip), clip) for x in expected], abs=1e-5)
    assert clipped.score(prompts, replies) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(UserError, match="reward_model_clip must be positive"):
        RewardModelScorer(str(tiny_reward), clip=0.0)
    with pytest.raises(UserError, match="reward_model_clip is set but there is no reward model"):
        build_reward_funcs(None, True, None, ["task", "answer"], reward_model_clip=1.0)


# ----------------------------------------------------------------------------- prompts
def test_prompts_are_messages_without_the_final_assistant_turn(tiny_chat_data):
    from datasets import load_from_disk

    inputs, train, test = load_prompts(str(tiny_chat_data["sft"]), "rl_prompts", "test")
    raw = load_from_disk(str(tiny_chat_data["sft"]))
    assert len(train) == len(raw["rl_prompts"]) and len(test) == len(raw["test"])
    assert inputs["dataset_fingerprint"] == json.loads((tiny_chat_data["sft"] / "manifest.json").read_text())["fingerprint"]
    for row, original in zip(train, raw["rl_prompts"]):
        assert row["prompt"] == original["messages"][:-1] and row["prompt"][-1]["role"] == "user"
        assert (row["task"], row["answer"], row["safety_label"]) == (original["task"], original["answer"],
                                                                      original["safety_label"])
    # train_tasks: training prompts of those families only (max_train counts after it); test keeps every family
    inputs, only, test_all = load_prompts(str(tiny_chat_data["sft"]), "rl_prompts", "test", max_train=5,
                                          train_tasks=["sort", "safety"])
    assert set(only["task"]) == {"sort", "safety"} and len(only) == 5 and inputs["train_tasks"] == ["sort", "safety"]
    assert test_all["task"] == test["task"]
    with pytest.raises(UserError, match=r"train_tasks: poetry not among the tasks of .*\[rl_prompts\] \(arithmetic, "):
        load_prompts(str(tiny_chat_data["sft"]), "rl_prompts", "test", train_tasks=["sort", "poetry"])
    # Hub shapes: a prompt column (string or messages) or a messages column
    assert prompt_row({"prompt": "Tell me a joke."}) == {"prompt": "Tell me a joke.", "task": "chat", "answer": None,
                                                         "safety_label": ""}
    row = prompt_row({"messages": USER + [{"role": "assistant", "content": "5"}]})
    assert row["prompt"] == USER and row["answer"] == "5"


def test_bad_prompts_stop_with_one_line(tiny_chat_data, tmp_path):
    from datasets import Dataset

    with pytest.raises(UserError, match=r"no split 'nope' \(has train, test, preference_prompts, rl_prompts\)"):
        load_prompts(str(tiny_chat_data["sft"]), "nope", "test")
    with pytest.raises(UserError, match="dataset directory not found"):
        load_prompts(str(tmp_path / "missing"), "rl_prompts", "test")
    with pytest.raises(UserError, match="exactly one of dataset_path"):
        load_prompts(str(tiny_chat_data["sft"]), "rl_prompts", "test", dataset_name="trl-lib/ultrafeedback-prompt")
    rows = Dataset.from_list([{"prompt": "fine"}, {"text": "no prompt here"}])
    with pytest.raises(UserError) as err:
        to_prompt_dataset(rows, "hub[train]")
    assert str(err.value) == "hub[train]: row 1: missing field 'prompt' (or 'messages')"


def test_long_prompts_lose_their_oldest_turns_and_are_counted(tiny_sft):
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    long = [{"role": "system", "content": "Answer briefly."}]
    for i in range(6):
        long += [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
    long += [{"role": "user", "content": "Sort these numbers: 3 1 2"}]
    data = Dataset.from_list([{"prompt": USER}, {"prompt": long}])
    out, count = truncate_prompts(data, tokenizer, 40)
    assert count == 1 and out[0]["prompt"] == USER
    kept = out[1]["prompt"]
    assert kept[0] == long[0] and kept[-1] == long[-1] and len(kept) < len(long) and kept[1]["role"] == "user"
    rendered = tokenizer.apply_chat_template(kept, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert len(rendered["input_ids"]) <= 40
    # every prompt counted as truncated fits, plain text included; one that cannot fit is refused by row
    text = " ".join(f"word{i}" for i in range(200))
    out, count = truncate_prompts(Dataset.from_list([{"prompt": text}]), tokenizer, 7)
    assert count == 1 and len(tokenizer(out[0]["prompt"], add_special_tokens=False)["input_ids"]) <= 7
    assert out[0]["prompt"].endswith("word199")
    limit = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                              return_dict=True)["input_ids"]) + 2
    out, count = truncate_prompts(Dataset.from_list([{"prompt": [{"role": "user", "content": text}]}]), tokenizer, limit)
    rendered = tokenizer.apply_chat_template(out[0]["prompt"], add_generation_prompt=True, return_dict=True)
    assert count == 1 and len(rendered["input_ids"]) <= limit and out[0]["prompt"][0]["content"].endswith("199")
    wordy_system = [{"role": "system", "content": text}, {"role": "user", "content": "Sort: 3 1 2"}]
    with pytest.raises(UserError) as err:
        truncate_prompts(Dataset.from_list([{"prompt": USER}, {"prompt": wordy_system}]), tokenizer, 40)
    assert str(err.value) == ("max_prompt_tokens 40: prompt row 1 cannot be cut to fit (its system message and chat "
                              "template alone are longer); raise max_prompt_tokens or drop the row")


# ----------------------------------------------------------------------------- KL
def test_sequence_kl_is_zero_to_itself_positive_when_moved_and_ignores_padding(tiny_sft):
    from recipes.rl.kl import kl_report, sample_responses, sequence_kl, token_logprobs

    policy = AutoModelForCausalLM.from_pretrained(tiny_sft)
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    prompts = [USER, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort: 3 1 2 9"}]]
    assert kl_report(policy, tokenizer, prompts, reference=policy, max_new_tokens=6)["kl_per_sequence"] == 0.0

    ids, attention, response_mask, order = next(sample_responses(policy, tokenizer, prompts, 6, batch_size=2))
    # a left-padded row scores its tokens exactly as it does alone
    with torch.inference_mode():
        padded = token_logprobs(policy, ids, attention)
        for row in range(2):
            keep = attention[row].bool()
            alone = token_logprobs(policy, ids[row:row + 1, keep], attention[row:row + 1, keep])
            scored = keep[1:] & keep[:-1]  # the token and the one before it are real
            assert torch.allclose(padded[row, scored], alone[0], atol=1e-4)
    moved = AutoModelForCausalLM.from_pretrained(tiny_sft)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.5 * torch.randn_like(moved.lm_head.weight))
    # by hand: the sum over response tokens of log pi - log pi_ref
    with torch.inference_mode():
        by_hand = ((token_logprobs(moved, ids, attention) - token_logprobs(policy, ids, attention))
                   * response_mask[:, 1:]).sum(-1)
    assert torch.allclose(sequence_kl(moved, policy, ids, attention, response_mask), by_hand)
    assert kl_report(moved, tokenizer, prompts * 8, reference=policy, max_new_tokens=6)["kl_per_sequence"] > 0


# ----------------------------------------------------------------------------- recipes
def test_policy_generation_stops_at_the_end_of_turn(tiny_sft):
    from trl import ModelConfig

    from recipes.rl.common import load_policy

    model, tokenizer, parent = load_policy(ModelConfig(model_name_or_path=str(tiny_sft), dtype="float32"))
    stops = set(model.generation_config.eos_token_id)
    assert {tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.convert_tokens_to_ids("<|end_of_text|>")} <= stops
    assert parent["stage"] == "sft"


def online_argv(method, tiny_sft, tiny_reward, chat_data, output_dir, *extra):
    return ["--config", str(REPO_ROOT / f"recipes/rl/{method}_tiny.yaml"), "--model_name_or_path", str(tiny_sft),
            "--reward_model_path", str(tiny_reward), "--dataset_path", str(chat_data["sft"]),
            "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "8", "--logging_steps", "1",
            "--eval_max_samples", "8", "--eval_max_new_tokens", "8", "--disable_tqdm", "true", *extra]


def dpo_argv(tiny_sft, tiny_reward, chat_data, output_dir, *extra):
    return ["--config", str(REPO_ROOT / "recipes/rl/dpo_tiny.yaml"), "--model_name_or_path", str(tiny_sft),
            "--reward_model_path", str(tiny_reward), "--dataset_path", str(chat_data["preference"]),
            "--prompts_path", str(chat_data["sft"]), "--output_dir", str(output_dir), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_max_samples", "8",
            "--eval_max_new_tokens", "8", "--disable_tqdm", "true", *extra]


def run(module, argv, callbacks=None):
    return module.main(*module.parse_args(argv), callbacks=callbacks)


def check_output(out, metrics, stage, parent):
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 2
    for when in ("before", "after"):
        result = metrics[when]
        assert result["n"] == 8 and 0 <= result["exact_match"] <= 1 and math.isfinite(result["mean_reward"])
    assert metrics["before"]["kl_per_sequence"] == 0.0 and math.isfinite(metrics["after"]["kl_per_sequence"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["exact_match"] == metrics["after"]["exact_match"]
    # training moved the policy: its saved weights are not the starting policy's, its exact KL to that reference
    # is above 0, and the recipe measured a KL that is not 0 (a policy equal to its reference gives exactly 0;
    # after 2 steps the recipe's sampled estimate is within +-0.002 of 0, so its sign is noise)
    check_weights_changed(out / "model.safetensors", parent / "model.safetensors")
    assert exact_kl(out, parent) > 1e-7
    assert saved["after"]["kl_per_sequence"] == metrics["after"]["kl_per_sequence"] != 0, metrics["after"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == stage and manifest["inputs"]["model"] == str(parent)
    assert manifest["inputs"]["model_fingerprint"] == json.loads((parent / "manifest.json").read_text())["fingerprint"]
    assert manifest["inputs"]["dataset_fingerprint"] and "after_kl_per_sequence" in manifest["outputs"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("loss" in h for h in state["log_history"])
    png = (out / "rl_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "rl_curves.png" in (out / "README.md").read_text()
    check_curves_json(out, metrics, stage)


def exact_kl(policy_dir, reference_dir) -> float:
    """Mean over the reply positions of a few conversations of KL(pi || pi_ref), summed over the whole vocabulary
    in float64: no sampling, so it is > 0 exactly when the two next-token distributions differ."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    conversations = [USER + [{"role": "assistant", "content": "5"}],
                     [{"role": "user", "content": "Sort these numbers: 3 1 2"},
                      {"role": "assistant", "content": "1 2 3"}]]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    kls = []
    with torch.inference_mode():
        policy, reference = (AutoModelForCausalLM.from_pretrained(d) for d in (policy_dir, reference_dir))
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            logp, logq = (torch.log_softmax(m(ids).logits[0].double(), -1) for m in (policy, reference))
            kls.append((logp.exp() * (logp - logq)).sum(-1).mean().item())
    return sum(kls) / len(kls)


def check_weights_changed(trained_file, start_file):
    """Every transformer layer of the saved policy differs from the starting policy's."""
    from safetensors.torch import load_file

    trained, start = load_file(trained_file), load_file(start_file)
    assert trained.keys() == start.keys()
    changed = {k for k in trained if not torch.equal(trained[k], start[k])}
    layers = {k.split(".layers.")[1].split(".")[0] for k in start if ".layers." in k}
    assert layers and all(any(f".layers.{i}." in k for k in changed) for i in layers), sorted(changed)
    assert all(torch.isfinite(t).all() for t in trained.values())


def check_curves_json(out, metrics, stage):
    """rl_curves.json holds the figures rl_curves.png draws, and loads back as another run's reference."""
    from recipes.rl.common import curve_series, load_reference_curves

    curves = load_reference_curves(str(out / "rl_curves.json"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert curves["stage"] == stage and curves["steps"] == metrics["steps"] and curves["reward"] and curves["kl"]
    assert {k: v for k, v in curves.items() if k in ("reward", "kl")} == json.loads(json.dumps(
        curve_series(history, curves["settings"].get("beta") if stage == "dpo" else None)))
    first = next(h for h in history if "loss" in h)
    key = "reward" if stage != "dpo" else "rewards/margins"
    assert curves["reward"][key][0] == [first["step"], first[key]]
    for when in ("before", "after"):
        assert curves["held_out"][when]["exact_match"] == metrics[when]["exact_match"]
    assert curves["recorded_with"]["torch"] == torch.__version__


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_recipe_trains_saves_and_reports(method, tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    out = tmp_path / method
    # no warm-up: the preset's 2 warm-up steps would leave step 1 at learning rate 0, and step 2 would again
    # be scored against a reference equal to the policy
    metrics = run(ONLINE[method], online_argv(method, tiny_sft, tiny_reward, tiny_chat_data, out,
                                              "--warmup_steps", "0"))
    check_output(out, metrics, method, tiny_sft)
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "reward" in h]
    assert len(logged) == 2 and all(math.isfinite(h["reward"]) for h in logged)
    # both rewards were used: the reward model and the rule-based one
    assert all("rewards/reward_model/mean" in h and "rewards/correctness_reward/mean" in h for h in logged)
    assert all("kl" in h for h in logged)  # beta > 0: a reference model was used
    # step 1 starts at the reference (KL 0); step 2's policy has moved away from it. GRPO logs the k3 estimate
    # (>= 0), RLOO the k1 estimate of the sampled tokens (either sign)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logged[1]["kl"] != 0, [h["kl"] for h in logged]
    if method == "grpo":
        assert logged[1]["kl"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file() and model.config.vocab_size > 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|end|>"


def test_lora_grpo_saves_an_adapter_that_reloads(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    from recipes.common import load_pretrained

    out = tmp_path / "lora"
    metrics = run(grpo, online_argv("grpo", tiny_sft, tiny_reward, tiny_chat_data, out, "--use_peft", "true",
                                    "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
                                    "--learning_rate", "0.05"))
    assert metrics["trainable_params"] < metrics["total_params"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    model, _, _ = load_pretrained(str(out), AutoModelForCausalLM)
    assert type(model).__name__ == "PeftModelForCausalLM"
    from safetensors.torch import load_file

    lora_b = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b.values())  # B starts at 0: it learned
    # the adapter moved the policy away from its reference, the SFT model (a sampled estimate: its sign may vary)
    assert metrics["after"]["kl_per_sequence"] != 0.0


@pytest.mark.parametrize("method", ["grpo", "rloo", "dpo"])
def test_resume_after_interruption_matches_the_uninterrupted_run(method, tiny_sft, tiny_reward, tiny_chat_data,
                                                                  tmp_path):
    """TRL's trainers restore the optimizer, schedule, random states and data position; the recipe passes
    resume_from_checkpoint on."""
    module = {"grpo": grpo, "rloo": rloo, "dpo": dpo}[method]

    def argv(out, *extra):
        settings = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_policy", "false",
                    "--warmup_steps", "0", *extra)
        if method == "dpo":
            return dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, *settings)
        return online_argv(method, tiny_sft, tiny_reward, tiny_chat_data, out, *settings)

    run_interrupted_and_resumed(lambda a, callbacks: run(module, a, callbacks), argv, tmp_path)


def test_dpo_recipe_trains_saves_and_reports(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    out = tmp_path / "dpo"
    metrics = run(dpo, dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, out))
    check_output(out, metrics, "dpo", tiny_sft)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("rewards/margins" in h for h in state["log_history"])
    assert (out / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_scoring_only_labelled_positions_leaves_the_run_unchanged(method, tiny_sft, tiny_reward, tiny_chat_data,
                                                                  tmp_path, monkeypatch):
    """The GRPO (and RLOO) and DPO recipes make TRL's fused LM head project only the completion positions on a
    CPU (recipes.common.fused_head_on_labelled_positions_only); the same seeded run with TRL's own CPU choice,
    every position, logs the same losses and rewards and saves the same weights."""
    import trl.trainer.utils as trl_utils
    from safetensors.torch import load_file

    module = {"grpo": grpo, "dpo": dpo}[method]

    def argv(out):
        return (online_argv("grpo", tiny_sft, tiny_reward, tiny_chat_data, out) if method == "grpo"
                else dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, out)) + ["--eval_policy", "false"]

    def logged(out):
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [[h[k] for k in sorted(h) if k.endswith(("loss", "reward", "margins")) and k != "train_loss"]
                for h in history if "loss" in h]

    with monkeypatch.context() as patch:
        patch.setattr(trl_utils, "_use_triton", lambda device: False)
        patch.setattr(module, "fused_head_on_labelled_positions_only", lambda: False)
        run(module, argv(tmp_path / "every_position"))
        assert not trl_utils._use_triton(torch.device("cpu"))
    with monkeypatch.context() as patch:
        patch.setattr(trl_utils, "_use_triton", lambda device: False)
        run(module, argv(tmp_path / "labelled_only"))
        assert trl_utils._use_triton(torch.device("cpu"))  # the recipe made the switch

    full, compact = logged(tmp_path / "every_position"), logged(tmp_path / "labelled_only")
    assert len(full) == 2 and all(len(row) >= 2 for row in full)
    assert torch.allclose(torch.tensor(compact), torch.tensor(full), rtol=1e-4, atol=1e-5)
    full_weights = load_file(tmp_path / "every_position" / "model.safetensors")
    compact_weights = load_file(tmp_path / "labelled_only" / "model.safetensors")
    assert full_weights.keys() == compact_weights.keys()
    assert any(not torch.equal(full_weights[k], load_file(tiny_sft / "model.safetensors")[k]) for k in full_weights)
    for name, weight in full_weights.items():
        assert torch.allclose(compact_weights[name], weight, atol=1e-5), name


def test_bad_inputs_stop_with_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    cases = [
        (grpo, online_argv("grpo", tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "a", "--dataset_train_split",
                           "nope"), "no split 'nope'"),
        (rloo, online_argv("rloo", tiny_sft, tmp_path / "no_rm", tiny_chat_data, tmp_path / "b"),
         "not a model checkpoint|model directory not found"),
        (grpo, online_argv("grpo", tiny_sft, "outputs/no_such_reward_model", tiny_chat_data, tmp_path / "c"),
         "model directory not found: outputs/no_such_reward_model"),
        (grpo, online_argv("grpo", tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "d", "--reward_weights", "1.0"),
         r"reward_weights has 1 value\(s\) for 2 reward function\(s\) \(reward_model, correctness_reward\)"),
        (dpo, dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "e", "--dataset_test_split", "nope"),
         "no split 'nope'"),
        (dpo, dpo_argv(tiny_sft, tmp_path / "gone", tiny_chat_data, tmp_path / "f"), "model directory not found"),
    ]
    (tmp_path / "no_rm").mkdir()
    for module, argv, needle in cases:
        with pytest.raises(UserError, match=needle) as err:
            run(module, argv)
        assert "\n" not in str(err.value)
    for name in "abcdef":
        assert not (tmp_path / name / "manifest.json").exists()


def test_reference_curves_draw_dashed_under_the_run_and_bad_files_stop_with_one_line(tmp_path):
    from recipes.rl.common import CURVES_FORMAT, curve_series, load_reference_curves, plot_curves

    history = [{"step": s, "loss": 0.1, "reward": 0.1 * s, "kl": 0.01 * s, "completions/mean_length": 10.0}
               for s in (1, 2, 3)] + [{"step": 3, "train_runtime": 1.0}]
    series = curve_series(history)
    assert series == {"reward": {"reward": [[1, 0.1], [2, 0.2], [3, 0.30000000000000004]]},
                      "kl": {"KL per sequence (training)": [[1, 0.1], [2, 0.2], [3, 0.3]]}}
    # PPO logs the reward model's mean as `reward` too: the same line is drawn once, under its own name.
    ppo_like = [{**h, "rewards/reward_model/mean": h["reward"]} for h in history[:3]]
    assert list(curve_series(ppo_like)["reward"]) == ["rewards/reward_model/mean"]
    good = tmp_path / "ref.json"
    good.write_text(json.dumps({"format": CURVES_FORMAT, "stage": "grpo", **series}))
    reference = load_reference_curves(str(good))
    figure = plot_curves(curve_series(history[:2]), tmp_path / "run.png", "run", held_out_kl=(2, 0.3),
                         reference=reference)
    lines = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    assert lines["reward, reference"].get_linestyle() == "--" and lines["reward"].get_linestyle() == "-"
    assert lines["reward, reference"].get_color() == lines["reward"].get_color()
    assert list(lines["KL per sequence (training), reference"].get_ydata()) == [0.1, 0.2, 0.3]
    assert "ref.json" in figure.texts[0].get_text()  # the title names the reference
    assert (tmp_path / "run.png").stat().st_size > 5000

    cases = {"missing.json": (None, "reference_curves: .*missing.json is not a file"),
             "bad.json": ('{"format": \n', r"bad.json: not a JSON file \(.*line 2"),
             "other.json": (json.dumps({"format": "x", "reward": {}, "kl": {}}), "other.json: not an rl_curves.json"),
             "points.json": (json.dumps({"format": CURVES_FORMAT, "reward": {"reward": [[1]]}, "kl": {}}),
                             r"points.json: reward\['reward'\] is not a list of \[step, value\] pairs")}
    for name, (text, needle) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=needle) as err:
            load_reference_curves(str(tmp_path / name))
        assert "\n" not in str(err.value)
    assert load_reference_curves(None) is None
    assert load_reference_curves("null") is None and load_reference_curves("none") is None  # as the CLI passes them


TINY_RL_YAMLS = [REPO_ROOT / f"recipes/rl/{m}_tiny.yaml" for m in ("ppo", "grpo", "rloo", "dpo")] + [
    REPO_ROOT / "recipes/rl/ppo_tiny_lora.yaml"]


@pytest.mark.parametrize("path", TINY_RL_YAMLS, ids=lambda p: p.name)
def test_each_tiny_preset_ships_the_reference_curves_of_its_own_settings(path, monkeypatch):
    """The reference a tiny preset names was recorded with that preset's settings: changing the preset
    without recording its run again fails here."""
    from recipes.rl import ppo
    from recipes.rl.common import load_reference_curves

    monkeypatch.chdir(REPO_ROOT / "tests")  # a relative reference is also found from the repository root
    method = path.name.split("_")[0]
    module = {"ppo": ppo, "grpo": grpo, "rloo": rloo, "dpo": dpo}[method]
    script_args, training_args, _, _ = module.parse_args(["--config", str(path)])
    reference = load_reference_curves(script_args.reference_curves)
    assert reference["stage"] == method and reference["run"] == Path(training_args.output_dir).name
    for key, value in reference["settings"].items():
        if key not in ("output_dir", "logging_steps", "bf16", "fp16"):
            assert value == json.loads(json.dumps(getattr(training_args, key), default=str)), key
    assert reference["reward"] and reference["kl"] and reference["held_out"]["after"]["exact_match"] > 0.8


# ----------------------------------------------------------------------------- YAMLs
RL_YAMLS = sorted(p for p in (REPO_ROOT / "recipes/rl").glob("*.yaml") if p.name.split("_")[0] in ("grpo", "rloo", "dpo"))


@pytest.mark.parametrize("path", RL_YAMLS, ids=lambda p: p.name)
def test_rl_yaml_parses_and_sets_beta_explicitly(path):
    import yaml

    from recipes.peft_methods import build_peft_config

    module = {"grpo": grpo, "rloo": rloo, "dpo": dpo}[path.name.split("_")[0]]
    script_args, training_args, model_args, peft_args = module.parse_args(["--config", str(path), "--bf16", "false"])
    raw = yaml.safe_load(path.read_text())
    assert "beta" in raw, "beta (the KL weight) is set in every RL YAML, not left to TRL's default"
    assert training_args.report_to in ([], "none", ["none"]) and not training_args.push_to_hub
    assert training_args.output_dir.startswith("outputs/") and training_args.lr_scheduler_type == "cosine"
    assert (build_peft_config(model_args, peft_args) is None) == (not model_args.use_peft)
    if module is not dpo and training_args.reward_weights is not None:
        assert len(training_args.reward_weights) == bool(script_args.reward_model_path) + script_args.correctness_reward
    if path.name.endswith("_tiny.yaml"):
        assert model_args.model_name_or_path == "outputs/sft_tiny" and not training_args.activation_checkpointing
        assert script_args.reward_model_path == "outputs/reward_tiny"


@pytest.mark.parametrize("method", ["grpo", "rloo"])
@pytest.mark.parametrize("flag, value, message", [
    ("num_generations", "0", "num_generations must be >= 2 (each reply's advantage is measured against the other "
                             "replies to its prompt), got 0"),  # TRL's own check divided by it first
    ("max_completion_length", "0", "max_completion_length must be >= 1, got 0"),
    ("per_device_train_batch_size", "0", "per_device_train_batch_size must be >= 1, got 0"),
    ("temperature", "0", "temperature must be > 0, got 0.0"),
    ("eval_max_new_tokens", "0", "eval_max_new_tokens must be >= 1, got 0"),  # failed after training
    ("eval_strategy", "steps", 'eval_strategy: this recipe evaluates the held-out prompts before and after training '
                               '(eval_policy); set it to "no" (got "steps")'),
])
def test_online_numbers_no_run_can_use_stop_while_parsing(method, flag, value, message):
    module = {"grpo": grpo, "rloo": rloo}[method]
    with pytest.raises(UserError) as err:
        module.parse_args(["--config", str(REPO_ROOT / f"recipes/rl/{method}_tiny.yaml"), f"--{flag}", value])
    assert str(err.value) == message


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_recipe_refuses_plain_text_held_out_prompts_before_training(method, tiny_sft, tiny_reward, tiny_chat_data,
                                                                    tmp_path, monkeypatch):
    from recipes.rl import prompts

    load_prompts = prompts.load_prompts

    def as_plain_text(split):
        return split.map(lambda row: {"prompt": row["prompt"][-1]["content"]})

    def plain_text_held_out(*args, **kwargs):  # DPO reads its held-out prompts as the first split
        inputs, first, held_out = load_prompts(*args, **kwargs)
        return (inputs, as_plain_text(first), held_out) if method == "dpo" else \
            (inputs, first, as_plain_text(held_out))

    monkeypatch.setattr(prompts, "load_prompts", plain_text_held_out)
    argv = dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "out") if method == "dpo" else \
        online_argv("grpo", tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "out")
    skip = "eval_policy: false" if method == "dpo" else "dataset_test_split: none"
    with pytest.raises(UserError) as err:
        run({"grpo": grpo, "dpo": dpo}[method], argv)
    assert str(err.value) == ("eval_policy needs conversational prompts (lists of messages), and the held-out split "
                              f"has plain-text prompts; set {skip} to skip the evaluation")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["grpo", "rloo", "dpo"])
def test_eval_batch_size_below_one_stops_before_training(method):
    module = {"grpo": grpo, "rloo": rloo, "dpo": dpo}[method]
    with pytest.raises(UserError, match="^eval_batch_size must be >= 1, got 0$"):
        module.parse_args(["--config", str(REPO_ROOT / f"recipes/rl/{method}_tiny.yaml"), "--eval_batch_size", "0"])


def test_dpo_pad_token_missing_from_the_vocabulary_is_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    with pytest.raises(UserError) as err:
        run(dpo, dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "out", "--pad_token", "<|nope|>"))
    assert str(err.value) == f"pad_token: '<|nope|>' is not in the vocabulary of the tokenizer of {tiny_sft}"
    assert not (tmp_path / "out").exists()


def test_refused_resume_leaves_a_finished_dpo_run_as_it_was(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    import shutil

    out = tmp_path / "dpo"
    shutil.copytree(tiny_sft, out)  # a finished stage output, manifest included, standing in for a DPO run
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "stage": "dpo"}))
    with pytest.raises(UserError, match="^resume_from_checkpoint: no checkpoint-\\* directory in "):
        run(dpo, dpo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, "--resume_from_checkpoint", "true"))
    assert (out / "manifest.json").is_file()
