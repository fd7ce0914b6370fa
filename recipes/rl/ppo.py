"""RLHF with PPO: the SFT policy learns from the reward model, a KL penalty keeps it near the SFT model.

    # the tiny SFT model against the tiny reward model, on the embedded RL prompts, CPU
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/ppo.py --config recipes/rl/ppo_tiny.yaml

    # with a LoRA policy (its reference is the same model with the adapter disabled: no second copy)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/ppo.py --config recipes/rl/ppo_tiny_lora.yaml

    # SmolLM2-360M-Instruct with its UltraFeedback reward model, 8 GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/rl/ppo.py \
        --config recipes/rl/ppo_smollm2_360m.yaml

    # a policy too large to train whole on each GPU: ZeRO-3 partitions it (gathered for each rollout)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/rl/ppo.py \
        --config recipes/rl/ppo_smollm2_360m.yaml

Input: the SFT output (policy and reference), the reward-model output (reward, and the critic's
initial weights) and prompts (`rl_prompts` of data_prep.build_sft_data, or a Hub prompt set).
Output (`output_dir`): the policy (or its adapter), tokenizer, `metrics.json` with held-out reward,
exact match and KL before and after, `trainer_state.json`, `rl_curves.png`, a model card and
`manifest.json`, written last. The trainer itself is recipes/rl/ppo_trainer.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trl import ModelConfig

from data_prep.artifacts import UserError, parse_config, run_cli
from recipes.common import (claim_run_dir, load_pretrained, mark_incomplete, no_zero3_init, resolve_resume,
                            training_summary, with_cpu_process_group)
from recipes.peft_methods import PeftMethodArguments, build_peft_config, check_peft_settings, trainable_parameters
from recipes.rl.common import (ReferenceCurveArguments, RLShapingArguments, check_settings, finish_run,
                              load_reference_curves, model_load_kwargs, require_conversational, summary_line)
from recipes.rl.ppo_trainer import PPO_STATE_NAME, PPOConfig
from recipes.rl.rewards import check_reward_settings


@dataclass
class ScriptArguments(RLShapingArguments, ReferenceCurveArguments):
    dataset_path: str | None = field(default="outputs/sft_data", metadata={"help": "Output of data_prep.build_sft_data."})
    dataset_name: str | None = field(default=None, metadata={"help": "Or a Hub prompt set (prompt or messages column)."})
    dataset_config: str | None = field(default=None)
    dataset_train_split: str = field(default="rl_prompts")
    dataset_test_split: str | None = field(default="test", metadata={"help": "Held-out prompts; none to skip."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many training prompts."})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "help": "Longer prompts lose their oldest turns (then their first tokens); the count is reported."})
    reward_model_path: str = field(default="outputs/reward_tiny", metadata={"help": "Output of recipes/reward."})
    value_model_path: str | None = field(default=None, metadata={"help": "Critic's initial weights (default: the reward model)."})
    ref_model_path: str | None = field(default=None, metadata={"help": "Reference (default: the policy's start; unused with PEFT)."})
    correctness_reward: bool = field(default=False, metadata={"help": "Add the rule-based exact-match reward (weights: reward_weights)."})
    eval_max_samples: int | None = field(default=None, metadata={"help": "Held-out prompts to evaluate before and after."})

    def __post_init__(self):
        check_settings(self, at_least_1=("max_prompts", "max_prompt_tokens", "eval_max_samples"),
                       positive=("reward_model_clip",))


def main(script_args, training_args, model_args, peft_args, callbacks=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from recipes.rl.prompts import load_prompts, truncate_prompts
    from recipes.rl.ppo_trainer import PPOTrainer
    from recipes.rl.rewards import build_reward_funcs

    started = time.time()
    claim_run_dir(training_args.output_dir, "ppo", {
        "model_name_or_path": model_args.model_name_or_path, "dataset_path": script_args.dataset_path,
        "reward_model_path": script_args.reward_model_path, "value_model_path": script_args.value_model_path,
        "ref_model_path": script_args.ref_model_path})
    # checked before loading; a PPO checkpoint's save writes ppo_state.json last
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, PPO_STATE_NAME)
    reference_curves = load_reference_curves(script_args.reference_curves)
    # ------------------------------------------------------------------ data
    data_inputs, train_prompts, test_prompts = load_prompts(
        script_args.dataset_path, script_args.dataset_train_split, script_args.dataset_test_split,
        script_args.dataset_name, script_args.dataset_config, script_args.max_prompts, script_args.eval_max_samples,
        script_args.train_tasks)
    require_conversational(test_prompts, "PPO's held-out evaluation")

    # ------------------------------------------------------------------ models
    # Policy and critic are built after the training arguments, so that ZeRO-3 partitions them; the frozen
    # reference and reward model are whole copies on every process.
    set_seed(training_args.seed)
    policy_path = model_args.model_name_or_path
    trust, load_kwargs = training_args.trust_remote_code, model_load_kwargs(model_args)
    policy, tokenizer, parent = load_pretrained(policy_path, AutoModelForCausalLM, trust_remote_code=trust,
                                                for_training=True, **load_kwargs)
    if not tokenizer.chat_template:  # the rollouts render every prompt with it, after all four models load
        raise UserError(f"{policy_path}: the tokenizer has no chat template (RL starts from a chat model)")
    positions = getattr(policy.config, "max_position_embeddings", None)
    room = training_args.response_length + (script_args.max_prompt_tokens or 1)
    if positions is not None and room > positions:  # replies past the context the policy was trained on
        raise UserError(f"response_length {training_args.response_length}"
                        + (f" plus max_prompt_tokens {script_args.max_prompt_tokens}" if script_args.max_prompt_tokens
                           else " and a prompt") + f" do not fit max_position_embeddings {positions} of {policy_path}")
    train_prompts, truncated = truncate_prompts(train_prompts, tokenizer, script_args.max_prompt_tokens)
    value_path = script_args.value_model_path or script_args.reward_model_path
    value_model, value_tokenizer, _ = load_pretrained(value_path, AutoModelForSequenceClassification,
                                                      trust_remote_code=trust, for_training=True, num_labels=1,
                                                      **load_kwargs)
    _require_policy_tokenizer("value_model_path" if script_args.value_model_path else "reward_model_path (the critic's "
                              "default start)", value_path, value_tokenizer, policy_path, tokenizer)
    peft_config = build_peft_config(model_args, peft_args, policy)
    with no_zero3_init():
        reward_funcs = build_reward_funcs(script_args.reward_model_path, script_args.correctness_reward,
                                          training_args.reward_weights, train_prompts.column_names, trust,
                                          script_args.reward_model_clip)
        ref_model = None
        if peft_config is None:
            ref_path = script_args.ref_model_path or policy_path
            ref_model, ref_tokenizer, _ = load_pretrained(ref_path, AutoModelForCausalLM, trust_remote_code=trust,
                                                          **load_kwargs)
            _require_policy_tokenizer("ref_model_path", ref_path, ref_tokenizer, policy_path, tokenizer)
    if peft_config is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config)
    scorer = reward_funcs[0] if script_args.reward_model_path else None

    # ------------------------------------------------------------------ trainer
    trainer = PPOTrainer(args=training_args, processing_class=tokenizer, model=policy, ref_model=ref_model,
                         value_model=value_model, reward_funcs=reward_funcs, train_dataset=train_prompts,
                         callbacks=callbacks)
    if trainer.is_world_process_zero():
        mark_incomplete(training_args.output_dir)
    trainable, total = trainable_parameters(policy)
    state = trainer.accelerator.state
    zero_stage = state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None
    _log(trainer, f"{state.distributed_type.value}{f' ZeRO-{zero_stage}' if zero_stage else ''} on "
                  f"{trainer.world_size} process(es)")
    _log(trainer, f"policy {type(policy).__name__}: {trainable:,} of {total:,} parameters trainable; "
                  f"{len(train_prompts)} prompts"
                  f"{f' ({truncated} truncated to {script_args.max_prompt_tokens} tokens)' if truncated else ''}; "
                  f"{trainer.num_updates} updates of {trainer.rollout_batch_size * trainer.world_size} rollouts; "
                  f"reference: {'adapter disabled' if ref_model is None else script_args.ref_model_path or policy_path}")

    # ------------------------------------------------------------------ eval before
    metrics: dict = {"trainable_params": trainable, "total_params": total, "prompts_truncated": truncated}
    if test_prompts is not None and scorer is not None and trainer.is_world_process_zero():
        with no_zero3_init():
            start_policy, _, _ = load_pretrained(policy_path, AutoModelForCausalLM, trust_remote_code=trust,
                                                 **load_kwargs)
        metrics["before"] = _evaluate(start_policy, tokenizer, test_prompts, scorer, None, training_args, measure_kl=False)
        metrics["before"]["kl_per_sequence"] = 0.0  # the starting policy is the reference
        del start_policy

    # ------------------------------------------------------------------ train
    train_started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    metrics.update(updates=trainer.state.global_step, train_runtime_s=round(time.time() - train_started, 1),
                   final_kl_coef=trainer.kl_controller.value)

    # ------------------------------------------------------------------ save
    staging = Path(training_args.output_dir) / ".final-tmp"
    trainer.save_model(str(staging))  # every rank joins: ZeRO-3 gathers the full weights here
    if trainer.is_world_process_zero():
        # -------------------------------------------------------------- eval after
        if "before" in metrics:
            with no_zero3_init():
                trained, _, _ = load_pretrained(str(staging), AutoModelForCausalLM, trust_remote_code=trust,
                                                **load_kwargs)
            metrics["after"] = _evaluate(trained, tokenizer, test_prompts, scorer, ref_model, training_args)
            _log(trainer, summary_line(metrics["before"], metrics["after"]))
        metrics["wall_time_s"] = round(time.time() - started, 1)
        inputs = {"model": policy_path, "model_fingerprint": parent.get("fingerprint"),
                  "reward_model": script_args.reward_model_path, "value_model": value_path,
                  "reference": "adapter disabled" if ref_model is None else script_args.ref_model_path or policy_path,
                  "resumed_from": resume, **data_inputs}
        options = {"peft": peft_config.to_dict() if peft_config else None, "peft_method": asdict(peft_args),
                   "correctness_reward": script_args.correctness_reward,
                   "reward_model_clip": script_args.reward_model_clip,
                   "training": training_summary(training_args, PPO_KEYS)}
        finish_run(trainer, staging, "ppo", inputs, options, metrics, title="PPO policy",
                   summary="A chat policy trained with PPO (clipped policy and value losses, GAE, a per-token KL "
                           "penalty to the reference) against a learned reward model, by this repository's RL recipe.",
                   reference=reference_curves)
    trainer.accelerator.wait_for_everyone()
    return metrics


PPO_KEYS = ("total_episodes", "num_ppo_epochs", "num_mini_batches", "response_length", "temperature", "top_p",
            "kl_coef", "adaptive_kl", "target_kl", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
            "critic_warmup_updates", "critic_learning_rate", "clip_critic_separately", "value_head_init",
            "missing_eos_penalty", "reward_weights")


def _require_policy_tokenizer(key: str, path: str, tokenizer, policy_path: str, policy_tokenizer) -> None:
    """The critic and the reference read the policy's token ids, so each policy token must have the same id in
    their tokenizer (tokens added after the policy's, such as a pad token, do no harm). The reward model need
    not: it re-reads the decoded text with its own tokenizer."""
    theirs = tokenizer.get_vocab()
    differ = [token for token, index in policy_tokenizer.get_vocab().items() if theirs.get(token) != index]
    if differ:
        raise UserError(f"{key}: {path} has another tokenizer than the policy {policy_path} ({len(differ)} of the "
                        f"policy's {len(policy_tokenizer)} tokens have another id or none, e.g. {differ[0]!r}), and "
                        "it reads the policy's token ids; give a model trained from the policy's tokenizer (e.g. a "
                        "reward model trained from the same SFT model)")


def _evaluate(policy, tokenizer, prompts, scorer, reference, args, measure_kl: bool = True) -> dict:
    from recipes.rl.policy_eval import evaluate_policy

    # reference None with a PEFT policy: the policy with its adapter disabled is the reference
    return evaluate_policy(policy, tokenizer, prompts, scorer, reference=reference, measure_kl=measure_kl,
                           max_new_tokens=args.response_length, batch_size=args.local_rollout_forward_batch_size,
                           seed=args.seed)


def _log(trainer, message: str) -> None:
    if trainer.is_world_process_zero():
        print(f"[ppo] {message}", flush=True)


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([ScriptArguments, PPOConfig, ModelConfig, PeftMethodArguments], with_cpu_process_group(argv))
    check_peft_settings("ppo", parsed[2], parsed[3], parsed[1])
    check_reward_settings(parsed[0].reward_model_path, parsed[0].correctness_reward, parsed[1].reward_weights)
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
