"""PPO (recipes/rl/ppo_trainer.py and recipes/rl/ppo.py): each piece against a hand computation, then
short runs on the tiny fixtures that show the KL penalty and the clipping at work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from conftest import REPO_ROOT, StepsTrained, pushed_when_finished
from data_prep.artifacts import UserError
from recipes.rl.ppo_trainer import (AdaptiveKLController, PPOTrainer, clipped_policy_loss, clipped_value_loss, compute_gae,
                                    first_true_index, kl_shaped_rewards, masked_whiten)


def test_gae_matches_a_hand_computed_four_step_example():
    # Row 0, gamma 0.9, lambda 0.5, rewards [0, 0, 0.5, 1], values [0.2, 0.4, 0.6, 0.8]:
    #   deltas  d3 = 1 - 0.8 = 0.2          d2 = 0.5 + 0.9*0.8 - 0.6 = 0.62
    #           d1 = 0.9*0.6 - 0.4 = 0.14    d0 = 0.9*0.4 - 0.2 = 0.16
    #   A3 = 0.2, A2 = 0.62 + 0.45*0.2 = 0.71, A1 = 0.14 + 0.45*0.71 = 0.4595, A0 = 0.16 + 0.45*0.4595 = 0.366775
    # Row 1 ends after 2 tokens (the rest is padding with junk values that must not leak in):
    #   d1 = 1 - 0.5 = 0.5, d0 = 0.9*0.5 - 0.5 = -0.05, A1 = 0.5, A0 = -0.05 + 0.45*0.5 = 0.175
    rewards = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 1.0, 7.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.5, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.366775, 0.4595, 0.71, 0.2], [0.175, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.566775, 0.8595, 1.31, 1.0], [0.675, 1.0, 0.0, 0.0]]))


def test_kl_shaping_matches_a_hand_computation():
    # kl_t = logp - ref_logp = [0.5, -1.0, 0.0]; rewards = -0.1 * kl_t, plus the score on the last valid token.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0, 3.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.05, 3.1, 0.0]]))


def test_clipping_bounds_the_policy_ratio():
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios 2.0, 0.5, 2.0, 0.5 with advantages +1, +1, -1, -1
    new = torch.log(torch.tensor([[2.0, 0.5, 2.0, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    per_token = []
    for i in range(4):
        m = torch.zeros(1, 4)
        m[0, i] = 1
        loss, _ = clipped_policy_loss(new, old, advantages, m, eps)
        grad, = torch.autograd.grad(loss, new)
        per_token.append((loss.item(), grad[0, i].item()))
    # A > 0, ratio above 1 + eps: the objective is capped at (1 + eps) * A and gives no gradient.
    assert per_token[0] == pytest.approx((-1.2, 0.0))
    # A > 0, ratio below 1 - eps: the pessimistic (unclipped) term keeps its gradient, pulling back up.
    assert per_token[1][0] == pytest.approx(-0.5) and per_token[1][1] != 0
    # A < 0, ratio above 1 + eps: unclipped, gradient pushes the ratio down.
    assert per_token[2][0] == pytest.approx(2.0) and per_token[2][1] > 0
    # A < 0, ratio below 1 - eps: capped at (1 - eps) * |A| with no gradient.
    assert per_token[3] == pytest.approx((0.8, 0.0))
    _, stats = clipped_policy_loss(new, old, advantages, torch.ones(1, 4), eps)
    assert stats["clipfrac"].item() == pytest.approx(0.5)

    # The value loss takes the larger of the clipped and unclipped errors.
    loss, clipfrac = clipped_value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                        torch.ones(1, 1), cliprange_value=0.5)
    assert loss.item() == pytest.approx(0.5 * max((2 - 1) ** 2, (0.5 - 1) ** 2)) and clipfrac.item() == 0.0
    loss, clipfrac = clipped_value_loss(torch.tensor([[0.9]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                        torch.ones(1, 1), cliprange_value=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.25) and clipfrac.item() == 1.0


@pytest.mark.parametrize("separately", [False, True])
def test_gradient_clipping_of_policy_and_critic_jointly_or_separately(separately):
    """Policy gradient norm 0.6 (over two tensors), critic 4.0, max_grad_norm 1: joint clipping scales both by
    1 / |(0.6, 4.0)|; separate clipping leaves the policy alone and brings the critic to norm 1."""
    from types import SimpleNamespace

    policy, value_model = torch.nn.Linear(2, 1, bias=True), torch.nn.Linear(1, 1, bias=False)
    policy.weight.grad, policy.bias.grad = torch.tensor([[0.6, 0.0]]), torch.zeros(1)
    value_model.weight.grad = torch.tensor([[4.0]])
    fake = SimpleNamespace(args=SimpleNamespace(max_grad_norm=1.0, clip_critic_separately=separately),
                           is_deepspeed_enabled=False, is_fsdp_enabled=False,
                           accelerator=SimpleNamespace(unscale_gradients=lambda: None),
                           model=SimpleNamespace(policy=policy, value_model=value_model))
    sums = {}
    PPOTrainer._clip_gradients(fake, None, sums)
    assert sums == pytest.approx({"grad_norm/policy": 0.6, "grad_norm/critic": 4.0})
    joint = (0.6 ** 2 + 4.0 ** 2) ** 0.5
    policy_scale, critic_scale = (1.0, 1 / 4.0) if separately else (1 / joint, 1 / joint)
    assert policy.weight.grad[0, 0].item() == pytest.approx(0.6 * policy_scale, rel=1e-5)
    assert value_model.weight.grad.item() == pytest.approx(4.0 * critic_scale, rel=1e-5)


def test_adaptive_kl_controller_and_helpers():
    controller = AdaptiveKLController(0.1, target_kl=2.0, horizon=100)
    controller.update(current_kl=10.0, n_episodes=50)  # error clipped to +20%, half the horizon
    assert controller.value == pytest.approx(0.1 * 1.1)
    controller.update(current_kl=1.9, n_episodes=100)  # -5%
    assert controller.value == pytest.approx(0.1 * 1.1 * 0.95)
    assert first_true_index(torch.tensor([[False, True, True], [False, False, False]])).tolist() == [1, 3]
    whitened = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert whitened[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and whitened[0, 3] == 0


# ---------------------------------------------------------------------------- runs on the tiny fixtures

def ppo_argv(sft_dir, reward_dir, chat_data, output_dir, *extra: str) -> list[str]:
    return ["--config", str(REPO_ROOT / "recipes/rl/ppo_tiny.yaml"), "--model_name_or_path", str(sft_dir),
            "--reward_model_path", str(reward_dir), "--dataset_path", str(chat_data["sft"]),
            "--output_dir", str(output_dir), "--total_episodes", "16", "--per_device_train_batch_size", "4",
            "--num_mini_batches", "2", "--response_length", "12", "--logging_steps", "1", "--disable_tqdm", "true",
            "--eval_max_samples", "12", *extra]


def run_ppo(argv, callbacks=None):
    from recipes.rl import ppo

    return ppo.main(*ppo.parse_args(argv), callbacks=callbacks)


def _trainer_logs(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_ppo_recipe_trains_saves_and_reports(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out))
    assert metrics["updates"] == 2
    for stage in ("before", "after"):
        assert set(metrics[stage]) >= {"mean_reward", "exact_match", "kl_per_sequence", "by_task", "samples"}
    logs = _trainer_logs(out)
    for key in ("reward", "kl", "entropy", "loss/value", "loss/policy", "clipfrac", "approxkl", "response_length",
                "rewards/correctness_reward/mean"):
        assert all(key in row and row[key] == row[key] for row in logs), key
    assert (out / "rl_curves.png").stat().st_size > 1000
    curves = json.loads((out / "rl_curves.json").read_text())  # the figures the PNG draws
    assert curves["stage"] == "ppo" and curves["steps"] == 2 and curves["settings"]["kl_coef"] == 0.05
    # PPO's `reward` is the reward model's mean, so the PNG draws it once, under that name.
    assert "reward" not in curves["reward"]
    assert curves["reward"]["rewards/reward_model/mean"] == [[row["step"], row["reward"]] for row in logs]
    assert curves["kl"]["KL per sequence (training)"] == [[row["step"], row["kl"]] for row in logs]
    assert curves["held_out"]["after"]["kl_per_sequence"] == metrics["after"]["kl_per_sequence"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "ppo" and manifest["inputs"]["model"] == str(tiny_sft)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_steps_sets_the_number_of_updates(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """As in Trainer, a positive max_steps overrides the episode count: here 3 updates of 8 rollouts, not 16/8."""
    metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "run", "--max_steps", "3",
                               "--dataset_test_split", "none"))
    assert metrics["updates"] == 3
    assert [row["episode"] for row in _trainer_logs(tmp_path / "run")] == [8, 16, 24]


def test_periodic_evaluation_is_refused_not_ignored(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    from recipes.rl import ppo

    with pytest.raises(UserError, match=r'^eval_strategy: PPO evaluates .* \(got "steps"\)$'):  # while parsing
        ppo.parse_args(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "run", "--eval_strategy", "steps",
                                "--eval_steps", "1"))


def test_push_to_hub_uploads_the_finished_policy_only(fake_hub, tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """A PPO checkpoint (policy and critic in one file) is not pushed; the finished policy is."""
    out = tmp_path / "pushed"
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, "--save_strategy", "steps", "--save_steps", "1",
                     "--push_to_hub", "true", "--hub_model_id", "me/ppo-tiny", "--dataset_test_split", "none"))
    assert (out / "checkpoint-2").is_dir()
    pushed_when_finished(fake_hub, out, "me/ppo-tiny", "PPO policy")


def test_zero_learning_rate_keeps_the_ratio_at_one(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """Rollout log-probabilities and the training forward agree: with no update the ratio is exactly 1."""
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "lr0", "--learning_rate", "0",
                     "--dataset_test_split", "none"))
    for row in _trainer_logs(tmp_path / "lr0"):
        assert row["ratio"] == pytest.approx(1.0, abs=1e-5) and row["clipfrac"] == 0.0
        assert row["approxkl"] == pytest.approx(0.0, abs=1e-8)


class CheckpointingDuringSteps(TrainerCallback):
    """Whether the policy and the critic recompute activations while PPO takes its optimizer steps."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append((model.policy.is_activation_checkpointing, model.value_model.is_activation_checkpointing))


LORA_POLICY = ("--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj",
               "v_proj")


@pytest.mark.parametrize("policy", [pytest.param((), id="full"), pytest.param(LORA_POLICY, id="lora")])
def test_activation_checkpointing_is_applied_and_changes_no_figure(policy, tiny_sft, tiny_reward, tiny_chat_data,
                                                                    tmp_path):
    """PPO's own train() must switch on what Trainer.train() would (the 360M preset asks for it), for both
    networks, and back on after each generate(); recomputing activations must not change a logged figure."""
    from safetensors.torch import load_file

    seen = CheckpointingDuringSteps()
    common = (*policy, "--total_episodes", "16", "--dataset_test_split", "none")
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "plain", *common))
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "recompute", *common,
                     "--activation_checkpointing", "true"), callbacks=[seen])
    assert seen.seen == [(True, True)] * 2  # both updates, after each rollout's generate()
    plain, recompute = _trainer_logs(tmp_path / "plain"), _trainer_logs(tmp_path / "recompute")
    for row_plain, row_recompute in zip(plain, recompute, strict=True):
        for key, value in row_plain.items():
            if not key.startswith("time/") and key != "elapsed_s":  # wall times
                assert row_recompute[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (row_plain["step"], key)
    weights = "adapter_model.safetensors" if policy else "model.safetensors"
    saved_plain, saved_recompute = (load_file(tmp_path / run / weights) for run in ("plain", "recompute"))
    assert all(torch.allclose(saved_plain[k], saved_recompute[k], atol=1e-6) for k in saved_plain)


RESUMABLE = ("--total_episodes", "32", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
             "--dataset_test_split", "none")  # 4 updates of 8 rollouts, a checkpoint after updates 2 and 4


@pytest.mark.parametrize("policy", [pytest.param((), id="full"), pytest.param(LORA_POLICY, id="lora")])
def test_resume_after_interruption_matches_the_uninterrupted_run(policy, tiny_sft, tiny_reward, tiny_chat_data,
                                                                 tmp_path):
    """A run stopped after checkpoint-2 and resumed from it rolls out the same replies and ends with the same
    weights as the run that went straight through: policy, critic, optimizer, schedule, KL coefficient, random
    state and prompt order all come back."""
    import shutil

    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, straight, *policy, *RESUMABLE, "--adaptive_kl", "true",
                     "--target_kl", "0.01", "--kl_horizon", "16"))  # the KL coefficient moves, so it must be restored
    checkpoint = straight / "checkpoint-2"
    assert json.loads((checkpoint / "ppo_state.json").read_text())["update"] == 2
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")  # what an interrupted run leaves behind
    trained = StepsTrained()
    metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, resumed, *policy, *RESUMABLE, "--adaptive_kl",
                               "true", "--target_kl", "0.01", "--kl_horizon", "16", "--resume_from_checkpoint", "true"),
                      callbacks=[trained])
    assert metrics["updates"] == 4 and trained.steps == [3, 4]  # it went on from the checkpoint
    logs_straight, logs_resumed = _trainer_logs(straight), _trainer_logs(resumed)
    assert [row["episode"] for row in logs_resumed] == [8, 16, 24, 32]  # the restored log goes on
    assert logs_straight[-1]["kl_coef"] != 0.05
    for row_straight, row_resumed in zip(logs_straight, logs_resumed):
        for key in ("reward", "kl", "kl_coef", "loss/policy", "loss/value", "response_length", "learning_rate"):
            assert row_resumed[key] == row_straight[key], (row_straight["episode"], key)
    weights = "adapter_model.safetensors" if policy else "model.safetensors"
    final_straight, final_resumed = load_file(straight / weights), load_file(resumed / weights)
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["inputs"]["resumed_from"] == str(resumed / "checkpoint-2")


def test_bad_checkpoints_stop_with_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    import shutil


    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "run", *RESUMABLE, "--total_episodes", "16"))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with pytest.raises(UserError, match=r"rollouts_per_update was 8 in the checkpointed run and is 16 now"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "other", *RESUMABLE,
                         "--per_device_train_batch_size", "8", "--resume_from_checkpoint", str(checkpoint)))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(checkpoint, interrupted)
    (interrupted / "ppo_state.json").unlink()  # the save died before its last file
    with pytest.raises(UserError, match="has no ppo_state.json"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "x", *RESUMABLE,
                         "--resume_from_checkpoint", str(interrupted)))
    from recipes.common import resolve_resume
    from recipes.rl.ppo_trainer import PPO_STATE_NAME

    shutil.copytree(interrupted, tmp_path / "run" / "checkpoint-3")  # newer, but its save never finished
    assert resolve_resume("true", str(tmp_path / "run"), PPO_STATE_NAME) == str(checkpoint)
    with pytest.raises(UserError, match="no checkpoint-\\* directory"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "empty", *RESUMABLE,
                         "--resume_from_checkpoint", "true"))
    assert not (tmp_path / "other" / "manifest.json").exists() and not (tmp_path / "x" / "manifest.json").exists()


def test_critic_warmup_freezes_the_policy_and_then_lets_it_learn(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """During critic_warmup_updates the policy keeps the SFT weights exactly (ratio 1) while the critic trains;
    after them the policy moves."""
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(tiny_sft).state_dict()
    changed = {}
    for warmup in ("2", "1"):  # the run has 2 updates: all warm-up, then one of each
        out = tmp_path / f"warmup{warmup}"
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, "--critic_warmup_updates", warmup,
                         "--learning_rate", "1e-2", "--dataset_test_split", "none"))
        logs = [row for row in _trainer_logs(out) if "ratio" in row]
        assert logs[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and logs[0]["approxkl"] == pytest.approx(0, abs=1e-10)
        assert logs[0]["loss/value"] > 0
        policy = AutoModelForCausalLM.from_pretrained(out).state_dict()
        changed[warmup] = [k for k in sft if not torch.equal(sft[k], policy[k])]
        if warmup == "1":
            assert logs[1]["approxkl"] > 0
    assert changed["2"] == [] and changed["1"], changed


@pytest.mark.parametrize("head", ["reward_model", "zero"])
def test_value_head_init_keeps_the_reward_models_backbone_and_zero_starts_every_value_at_0(
        head, tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from recipes.rl import ppo
    from recipes.rl.ppo_trainer import PPOTrainer
    from recipes.rl.rewards import correctness_reward

    argv = ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / head, "--value_head_init", head,
                    "--reward_weights", "1.0", "--correctness_reward", "false")  # one weight, one reward function
    args = ppo.parse_args(argv)[1]
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_reward)
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_reward)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "task": "arithmetic",
                                  "answer": str(a + 1)} for a in range(8)])
    trainer = PPOTrainer(args=args, processing_class=AutoTokenizer.from_pretrained(tiny_sft),
                         model=AutoModelForCausalLM.from_pretrained(tiny_sft),
                         ref_model=AutoModelForCausalLM.from_pretrained(tiny_sft), value_model=critic,
                         reward_funcs=[correctness_reward], train_dataset=prompts)
    backbone, reference = trainer.model.critic_backbone.state_dict(), reward_model.model.state_dict()
    assert all(torch.equal(backbone[k], reference[k]) for k in reference)
    values = trainer._rollout(*next(trainer._prompt_batches()))["values"]
    if head == "zero":
        assert torch.count_nonzero(trainer.model.value_model.score.weight) == 0 and torch.all(values == 0)
    else:
        assert torch.equal(trainer.model.value_model.score.weight, reward_model.score.weight)
        assert torch.count_nonzero(values) > 0


def test_critic_learning_rate_trains_the_critic_alone_when_the_policy_rate_is_0(
        tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """critic_learning_rate puts every critic parameter (and only those) in groups at its own rate: at policy
    learning rate 0 the policy keeps the SFT weights exactly while the critic moves."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from recipes.rl import ppo
    from recipes.rl.ppo_trainer import PPOTrainer
    from recipes.rl.rewards import correctness_reward

    argv = ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "critic_lr", "--learning_rate", "0",
                    "--critic_learning_rate", "1e-2", "--reward_weights", "1.0", "--total_episodes", "8",
                    "--correctness_reward", "false")  # one weight for the one reward function below
    args = ppo.parse_args(argv)[1]
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "task": "arithmetic",
                                  "answer": str(a + 1)} for a in range(8)])
    trainer = PPOTrainer(args=args, processing_class=AutoTokenizer.from_pretrained(tiny_sft),
                         model=AutoModelForCausalLM.from_pretrained(tiny_sft),
                         ref_model=AutoModelForCausalLM.from_pretrained(tiny_sft),
                         value_model=AutoModelForSequenceClassification.from_pretrained(tiny_reward),
                         reward_funcs=[correctness_reward], train_dataset=prompts)
    policy_before = {k: v.clone() for k, v in trainer.model.policy.state_dict().items()}
    critic_before = {k: v.clone() for k, v in trainer.model.value_model.state_dict().items()}
    optimizer = trainer.create_optimizer()
    critic_ids = {id(p) for p in trainer.model.value_model.parameters()}
    grouped = [(id(p), group["lr"]) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(i for i, _ in grouped) == sorted(id(p) for p in trainer.model.parameters() if p.requires_grad)
    assert all(lr == (1e-2 if i in critic_ids else 0.0) for i, lr in grouped)
    trainer.train()
    assert all(torch.equal(policy_before[k], v) for k, v in trainer.model.policy.state_dict().items())
    assert any(not torch.equal(critic_before[k], v) for k, v in trainer.model.value_model.state_dict().items())


def test_kl_penalty_keeps_the_policy_near_the_reference(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """Same seed, same data, same learning rate: lambda = 0 drifts further from the SFT model than lambda > 0."""
    kls = {}
    for kl_coef in ("0.0", "1.0"):
        metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / f"kl{kl_coef}",
                                   "--kl_coef", kl_coef, "--learning_rate", "1e-2", "--total_episodes", "96",
                                   "--num_ppo_epochs", "4", "--eval_max_samples", "24"))
        kls[kl_coef] = metrics["after"]["kl_per_sequence"]
    # Seen: 4.6 nats/sequence without the penalty, 0.7 with it.
    assert kls["0.0"] > 2 * kls["1.0"], kls


def test_lora_policy_uses_the_disabled_adapter_as_reference(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ppo_lora"
    metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, "--use_peft", "true", "--lora_r", "4",
                               "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--learning_rate",
                               "5e-2"))  # at 1e-3 the adapter barely moved (held-out KL -0.0000): nothing to check
    assert metrics["trainable_params"] < 0.05 * metrics["total_params"]
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["reference"] == "adapter disabled"
    # The reference really is a different policy once the adapter has learned: lora_B starts at 0, so the
    # first rollout's KL is exactly 0, and a later one is not (a policy that stayed equal to its reference,
    # or a "reference" that followed the adapter, would log 0 throughout).
    kls = [row["kl"] for row in _trainer_logs(out) if "kl" in row]
    assert len(kls) == metrics["updates"] == 2
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and any(kl != 0 for kl in kls[1:]), kls
    # The held-out KL in metrics.json is a sampled (k1) estimate on 12 prompts: measured, so not 0, but its sign
    # is noise at this scale (-0.02 here, while the exact KL along the same samples is +0.03). The exact KL
    # below, summed over the vocabulary in float64, is > 0 exactly when the policy differs from its reference.
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["kl_per_sequence"] == metrics["after"]["kl_per_sequence"] != 0, saved["after"]
    base = AutoModelForCausalLM.from_pretrained(tiny_sft)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_sft), out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"},
                                          {"role": "assistant", "content": "5"}], tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids).logits.double(), -1)
        with policy.disable_adapter():
            # disabling the adapter gives the reference ...
            torch.testing.assert_close(policy(ids).logits, base(ids).logits)
            logq = torch.log_softmax(policy(ids).logits.double(), -1)
    assert (logp.exp() * (logp - logq)).sum(-1).mean().item() > 1e-4  # ... from which the adapter moved the policy


def test_bad_inputs_stop_with_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):

    with pytest.raises(UserError, match="model directory not found"):
        run_ppo(ppo_argv(tiny_sft, tmp_path / "no_such_rm", tiny_chat_data, tmp_path / "a"))
    with pytest.raises(UserError, match="reward_weights"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "b", "--reward_weights", "1.0"))
    with pytest.raises(UserError, match="no split 'nope'"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "c", "--dataset_train_split", "nope"))
    with pytest.raises(UserError, match="fewer than one rollout batch"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "d", "--per_device_train_batch_size",
                         "64"))
    with pytest.raises(UserError, match="^local_rollout_forward_batch_size must be >= 1, got 0$"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "e", "--local_rollout_forward_batch_size",
                         "0"))
    assert not (tmp_path / "d" / "manifest.json").exists() and not (tmp_path / "e").exists()


def test_non_finite_rewards_stop_the_run_and_long_prompts_are_truncated(tiny_sft, tiny_reward, tiny_chat_data,
                                                                        tmp_path, monkeypatch):
    from recipes.rl import rewards

    metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "short", "--max_prompt_tokens", "32",
                               "--total_episodes", "8", "--dataset_test_split", "none"))
    assert metrics["prompts_truncated"] > 0  # counted and recorded in metrics.json
    assert json.loads((tmp_path / "short" / "metrics.json").read_text())["prompts_truncated"] == metrics["prompts_truncated"]

    def broken_correctness(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1) + [float("inf")]

    monkeypatch.setattr(rewards, "correctness_reward", broken_correctness)
    with pytest.raises(UserError, match=r"reward function broken_correctness: non-finite reward inf in update 1, "
                                        r"batch item 7 \(reply '"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "inf", "--dataset_test_split", "none"))
    monkeypatch.setattr(rewards.RewardModelScorer, "score_conversations", lambda self, c: [float("nan")] * len(c))
    with pytest.raises(UserError, match="reward model .*: non-finite reward nan at step 0, batch item 0"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "nan", "--dataset_test_split", "none"))
    assert not (tmp_path / "inf" / "manifest.json").exists() and not (tmp_path / "nan" / "manifest.json").exists()


PPO_YAMLS = sorted((REPO_ROOT / "recipes/rl").glob("ppo_*.yaml"))


@pytest.mark.parametrize("path", PPO_YAMLS, ids=lambda p: p.name)
def test_ppo_yaml_parses_and_sets_the_kl_coefficient(path):
    import yaml

    from recipes.peft_methods import build_peft_config
    from recipes.rl import ppo

    script_args, training_args, model_args, peft_args = ppo.parse_args(["--config", str(path), "--bf16", "false"])
    assert "kl_coef" in yaml.safe_load(path.read_text()), "lambda is set in every PPO YAML"
    assert training_args.report_to in ([], "none", ["none"]) and not training_args.push_to_hub
    assert training_args.output_dir.startswith("outputs/")
    assert (build_peft_config(model_args, peft_args) is None) == (not model_args.use_peft)
    if training_args.reward_weights is not None:
        assert len(training_args.reward_weights) == 1 + script_args.correctness_reward


def test_iteration_benchmark_times_each_phase_of_ppo_and_grpo(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    from recipes.rl import benchmark

    out = tmp_path / "bench.json"
    result = benchmark.main(["--policy", str(tiny_sft), "--reward_model", str(tiny_reward), "--dataset_path",
                             str(tiny_chat_data["sft"]), "--iterations", "2", "--replies", "8",
                             "--response_length", "8", "--output_json", str(out)])
    assert json.loads(out.read_text())["ratio"] == pytest.approx(result["ratio"])
    for method in ("ppo", "grpo"):
        assert len(result["iterations"][method]) == 2  # one timing per optimizer iteration, none lost or doubled
        for iteration in result["iterations"][method]:
            assert set(iteration) == {"generate", "score", "train"} and min(iteration.values()) > 0
        seconds = result["seconds"][method]
        assert seconds["total"] == pytest.approx(seconds["generate"] + seconds["score"] + seconds["train"])
    assert result["ratio"]["total"] == pytest.approx(result["seconds"]["ppo"]["total"] / result["seconds"]["grpo"]["total"])
    with pytest.raises(benchmark.UserError, match="--replies 6: must be even"):
        benchmark.main(["--replies", "6", "--num_generations", "4"])


# ---------------------------------------------------------------------------- settings and inputs it refuses or honours
@pytest.mark.parametrize("flag, value, message", [
    ("per_device_train_batch_size", "0", "per_device_train_batch_size must be >= 1, got 0"),
    ("gradient_accumulation_steps", "0", "gradient_accumulation_steps must be >= 1, got 0"),
    ("num_mini_batches", "-1", "num_mini_batches must be >= 1, got -1"),  # hung in the prompt batches
    ("num_ppo_epochs", "0", "num_ppo_epochs must be >= 1, got 0"),
    ("response_length", "0", "response_length must be >= 1, got 0"),
    ("temperature", "0", "temperature must be > 0, got 0.0"),
    ("target_kl", "0", "target_kl must be > 0, got 0.0"),
    ("kl_horizon", "0", "kl_horizon must be >= 1, got 0"),
    ("total_episodes", "-8", "total_episodes must be >= 1, got -8"),
    ("kl_coef", "-0.1", "kl_coef must be >= 0, got -0.1"),
    ("cliprange", "-0.2", "cliprange must be >= 0, got -0.2"),
    ("top_p", "1.5", "top_p must be <= 1, got 1.5"),
    ("max_prompt_tokens", "0", "max_prompt_tokens must be >= 1, got 0"),
    ("reward_model_clip", "0", "reward_model_clip must be > 0, got 0.0"),
    ("save_strategy", "best", 'save_strategy: "best" needs a periodic evaluation, which PPO has not; use "steps" '
                              'or "epoch"'),
])
def test_numbers_no_run_can_use_stop_while_parsing(flag, value, message):
    from recipes.rl import ppo

    with pytest.raises(UserError) as err:
        ppo.parse_args(["--config", str(REPO_ROOT / "recipes/rl/ppo_tiny.yaml"), f"--{flag}", value])
    assert str(err.value) == message


def test_a_critic_or_reference_with_another_tokenizer_is_refused_before_training(tiny_sft, tiny_reward,
                                                                                tiny_chat_data, tmp_path):
    """The critic and the reference read the policy's token ids: another vocabulary gave an IndexError deep in
    the rollout, or, when larger, a critic that read every token as a different one."""
    import shutil

    from transformers import AutoTokenizer

    from recipes.rl.ppo import _require_policy_tokenizer

    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_reward, other)
    policy_tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    retrained = policy_tokenizer.train_new_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300)
    retrained.save_pretrained(other)
    # tokens added after the policy's (a pad token, say) keep every policy id: accepted
    extended = AutoTokenizer.from_pretrained(tiny_sft)
    extended.add_tokens(["<|extra|>"])
    _require_policy_tokenizer("value_model_path", "extended", extended, str(tiny_sft), policy_tokenizer)
    for flag in ("--value_model_path", "--ref_model_path"):
        with pytest.raises(UserError) as err:
            run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "run", flag, str(other)))
        assert str(err.value).startswith(f"{flag[2:]}: {other} has another tokenizer than the policy {tiny_sft} (")
    with pytest.raises(UserError, match=r"^reward_model_path \(the critic's default start\): "):
        run_ppo(ppo_argv(tiny_sft, other, tiny_chat_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


class StopAtTrainBegin(TrainerCallback):
    """Records the dtypes of policy and critic as training begins, then stops the run."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.dtypes = (model.policy.dtype, model.value_model.dtype)
        raise KeyboardInterrupt


def test_model_dtype_and_attention_reach_policy_critic_and_reference(tiny_sft, tiny_reward, tiny_chat_data, tmp_path,
                                                                     monkeypatch):
    from recipes.rl import ppo_trainer

    seen = {}
    real_init = ppo_trainer.PPOTrainer.__init__

    def recording_init(self, *args, **kwargs):
        seen["reference"] = kwargs["ref_model"].dtype, kwargs["ref_model"].config._attn_implementation
        seen["attention"] = kwargs["model"].config._attn_implementation
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "__init__", recording_init)
    stop = StopAtTrainBegin()
    with pytest.raises(KeyboardInterrupt):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "run", "--dtype", "bfloat16",
                         "--attn_implementation", "eager", "--dataset_test_split", "none"), callbacks=[stop])
    assert stop.dtypes == (torch.bfloat16, torch.bfloat16)
    assert seen == {"reference": (torch.bfloat16, "eager"), "attention": "eager"}


def test_bf16_autocast_covers_the_reference_so_kl_is_zero_at_learning_rate_zero(tiny_sft, tiny_reward,
                                                                                tiny_chat_data, tmp_path):
    """With the reference outside autocast, bf16 rounding of the policy alone showed up as KL at lr 0."""
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "bf16", "--learning_rate", "0", "--bf16",
                     "true", "--use_cpu", "true", "--dataset_test_split", "none"))
    assert [row["kl"] for row in _trainer_logs(tmp_path / "bf16")] == [0.0, 0.0]


def _as_plain_text(load_prompts, test: str):
    """load_prompts, with every prompt rendered to a string (a Hub set of plain-text prompts)."""
    def loader(*args, **kwargs):
        inputs, train, held_out = load_prompts(*args, **kwargs)
        def to_text(row):
            return {"prompt": "\n".join(m["content"] for m in row["prompt"])}
        return inputs, train.map(to_text), held_out.map(to_text) if test == "text" else None
    return loader


def test_plain_text_prompts_train_as_they_stand_and_a_plain_text_held_out_split_is_refused(
        tiny_sft, tiny_reward, tiny_chat_data, tmp_path, monkeypatch):
    from recipes.rl import prompts, rewards

    load_prompts = prompts.load_prompts
    monkeypatch.setattr(prompts, "load_prompts", _as_plain_text(load_prompts, test="text"))
    with pytest.raises(UserError, match=r"^PPO's held-out evaluation needs conversational prompts .* set "
                                        r"dataset_test_split: none to skip the evaluation$"):
        run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()

    seen = []
    real_correctness = rewards.correctness_reward

    def recording_correctness(prompts, completions, **kwargs):
        seen.append((prompts[0], completions[0]))
        return real_correctness(prompts, completions, **kwargs)

    monkeypatch.setattr(rewards, "correctness_reward", recording_correctness)
    monkeypatch.setattr(prompts, "load_prompts", _as_plain_text(load_prompts, test="none"))
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "text"))
    assert seen and all(isinstance(p, str) and isinstance(c, str) for p, c in seen)  # TRL's non-chat shapes
    assert all(row["reward"] == row["reward"] for row in _trainer_logs(tmp_path / "text"))


def test_logging_and_save_strategies_are_read_as_trainer_reads_them(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """20 prompts in rollout batches of 8: a pass over the prompts ("epoch") is 2 full batches, 2 updates."""
    out = tmp_path / "shares"
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, "--max_steps", "6", "--logging_steps", "0.5",
                     "--save_strategy", "epoch", "--dataset_test_split", "none"))
    assert [row["step"] for row in _trainer_logs(out)] == [1, 3, 6]  # half of 6 updates, and the first
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "epoch", "--max_steps", "5",
                     "--logging_strategy", "epoch", "--dataset_test_split", "none"))
    assert [row["step"] for row in _trainer_logs(tmp_path / "epoch")] == [1, 2, 4, 5]
    run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "quiet", "--logging_strategy", "no",
                     "--dataset_test_split", "none"))
    assert _trainer_logs(tmp_path / "quiet") == []


class FirstRollout(Exception):
    pass


def test_data_seed_orders_the_prompts_as_in_trainer(tiny_sft, tiny_reward, tiny_chat_data, tmp_path, monkeypatch):
    def first_prompts(*extra):
        def stop(self, batch, rows):
            raise FirstRollout([json.dumps(r["prompt"]) for r in rows])
        monkeypatch.setattr(PPOTrainer, "_rollout", stop)
        with pytest.raises(FirstRollout) as caught:
            run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "order", "--dataset_test_split",
                             "none", *extra))
        return caught.value.args[0]

    by_seed = first_prompts("--seed", "3")
    assert first_prompts("--seed", "3", "--data_seed", "3") == by_seed
    assert first_prompts("--seed", "3", "--data_seed", "4") != by_seed


def test_adaptive_kl_logs_the_coefficient_each_update_was_shaped_with(tiny_sft, tiny_reward, tiny_chat_data,
                                                                      tmp_path):
    metrics = run_ppo(ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, tmp_path / "adaptive", "--adaptive_kl", "true",
                               "--target_kl", "0.01", "--kl_horizon", "16", "--dataset_test_split", "none"))
    logs = _trainer_logs(tmp_path / "adaptive")
    assert logs[0]["kl_coef"] == 0.05 and logs[1]["kl_coef"] != 0.05 and metrics["final_kl_coef"] != logs[1]["kl_coef"]
    for row in logs:
        assert row["objective/non_score_reward"] == pytest.approx(-row["kl_coef"] * row["kl"], rel=1e-5, abs=1e-9)
