"""GRPO with TRL's GRPOTrainer: the SFT policy samples a group of replies per prompt, the reward model
(and optionally the rule-based correctness reward) scores them, and each reply's advantage is its
reward minus the group mean, over the group's standard deviation; no value model.

    # the tiny SFT model against the tiny reward model, on the embedded RL prompts, CPU
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/grpo.py --config recipes/rl/grpo_tiny.yaml

    # SmolLM2-360M (SFT + reward outputs of the smoltalk/UltraFeedback recipes) on UltraFeedback prompts, 8 GPUs
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/rl/grpo.py \
        --config recipes/rl/grpo_smollm2_360m.yaml

`beta` weighs the KL term. TRL's GRPO default is beta 0 (no reference model at all, following
recent reasoning-model practice); our YAMLs set it explicitly, because the learned reward model can
be fooled and the KL term keeps the policy near the SFT model. Input: the SFT output (or a Hub
model), a reward-model output, prompts (recipes/rl/prompts.py). Output (`output_dir`): the policy or
its LoRA adapter, tokenizer, `metrics.json` (held-out reward-model score, exact match and KL per
sequence, before and after), `trainer_state.json`, `rl_curves.png`, a model card and `manifest.json`,
written last. recipes/rl/rloo.py runs this same `main` with TRL's RLOOTrainer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import trl
from trl import ModelConfig

from data_prep.artifacts import UserError, parse_config, run_cli
from recipes.common import (claim_run_dir, fused_head_on_labelled_positions_only, mark_incomplete, optimizer_settings,
                            resolve_resume, save_optimizer_settings, save_trained, training_summary,
                            with_cpu_process_group)
from recipes.peft_methods import PeftMethodArguments, build_peft_config, check_peft_settings, trainable_parameters
from recipes.rl.common import (OnlineRLChecks, PromptArguments, evaluate_saved_policy, finish_run, load_policy,
                              load_reference_curves, require_conversational, summary_line)
from recipes.rl.rewards import check_reward_settings


@dataclass
class GRPOConfig(OnlineRLChecks, trl.GRPOConfig):
    """TRL's GRPOConfig; nonsense numbers and periodic evaluation are refused while it is parsed."""


# What differs between the online methods: the trainer, and the settings the manifest records.
METHODS = {
    "grpo": ("GRPOTrainer", ("loss_type", "scale_rewards", "num_iterations", "epsilon")),
    "rloo": ("RLOOTrainer", ("normalize_advantages", "reward_clip_range", "num_iterations", "epsilon")),
}


def main(script_args, training_args, model_args, peft_args, callbacks=None, method: str = "grpo") -> dict:
    from transformers import set_seed

    from recipes.rl.prompts import load_prompts, truncate_prompts
    from recipes.rl.rewards import build_reward_funcs

    started = time.time()
    claim_run_dir(training_args.output_dir, method, {
        "model_name_or_path": model_args.model_name_or_path, "dataset_path": script_args.dataset_path,
        "reward_model_path": script_args.reward_model_path})
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir,  # checked before loading
                            optimizer=optimizer_settings(training_args))
    reference_curves = load_reference_curves(script_args.reference_curves)
    # ------------------------------------------------------------------ data
    data_inputs, train_prompts, test_prompts = load_prompts(
        script_args.dataset_path, script_args.dataset_train_split, script_args.dataset_test_split,
        script_args.dataset_name, script_args.dataset_config, script_args.max_train_prompts,
        script_args.eval_max_samples, script_args.train_tasks)
    if script_args.eval_policy and test_prompts is not None and not script_args.reward_model_path:
        raise UserError("eval_policy scores the held-out replies with the reward model: set reward_model_path, "
                        "or eval_policy: false")
    if script_args.eval_policy:
        require_conversational(test_prompts, "eval_policy")

    # ------------------------------------------------------------------ model
    set_seed(training_args.seed)
    model_path = model_args.model_name_or_path
    model, tokenizer, parent = load_policy(model_args, training_args.trust_remote_code)
    train_prompts, truncated = truncate_prompts(train_prompts, tokenizer, script_args.max_prompt_tokens)
    peft_config = build_peft_config(model_args, peft_args, model)

    # ------------------------------------------------------------------ rewards
    reward_funcs = build_reward_funcs(script_args.reward_model_path, script_args.correctness_reward,
                                      training_args.reward_weights, train_prompts.column_names,
                                      training_args.trust_remote_code, script_args.reward_model_clip)

    # ------------------------------------------------------------------ trainer
    trainer_class, recorded = getattr(trl, METHODS[method][0]), METHODS[method][1]
    # Without Triton, TRL's fused LM head would also project every prompt and padding position (README).
    fused_head_on_labelled_positions_only()
    trainer = trainer_class(model=model, reward_funcs=reward_funcs, args=training_args, train_dataset=train_prompts,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    for func in reward_funcs:  # the reward model runs where the policy runs
        if hasattr(func, "to"):
            func.to(trainer.accelerator.device)
    if trainer.is_world_process_zero():
        mark_incomplete(training_args.output_dir)
    trainable, total = trainable_parameters(trainer.model)
    _log(trainer, method, f"{type(trainer.model).__name__}: {trainable:,} of {total:,} parameters trainable; "
                  f"{len(train_prompts)} prompts ({truncated} truncated), rewards "
                  f"{[getattr(f, '__name__', '?') for f in reward_funcs]} weights {training_args.reward_weights}, "
                  f"beta {training_args.beta}")

    # ------------------------------------------------------------------ train
    save_optimizer_settings(trainer, optimizer_settings(training_args))
    train_result = trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------------ save
    staging, metrics = save_trained(trainer, train_result, trainable, total)  # every rank joins
    metrics["prompts_truncated"] = truncated
    if trainer.is_world_process_zero():
        # -------------------------------------------------------------- eval
        # The SFT model and the saved policy, both reloaded from disk, on the held-out prompts.
        if script_args.eval_policy and test_prompts is not None:
            scorer = reward_funcs[0] if script_args.reward_model_path else None
            kwargs = dict(scorer=scorer, max_new_tokens=script_args.eval_max_new_tokens,
                          batch_size=script_args.eval_batch_size, trust_remote_code=training_args.trust_remote_code,
                          seed=training_args.seed)
            metrics["before"] = evaluate_saved_policy(model_path, model_path, test_prompts, **kwargs)
            metrics["after"] = evaluate_saved_policy(str(staging), model_path, test_prompts, **kwargs)
            _log(trainer, method, summary_line(metrics["before"], metrics["after"]))
        metrics["wall_time_s"] = round(time.time() - started, 1)
        inputs = {"model": model_path, "model_fingerprint": parent.get("fingerprint"), "resumed_from": resume,
                  **data_inputs,
                  "reward_model": script_args.reward_model_path,
                  "reward_model_fingerprint": getattr(reward_funcs[0], "manifest", {}).get("fingerprint")}
        options = {"peft": peft_config.to_dict() if peft_config else None, "peft_method": asdict(peft_args),
                   "prompts": asdict(script_args),
                   "training": training_summary(training_args, (
                       "beta", "num_generations", "max_completion_length", "temperature", "reward_weights",
                       *recorded))}
        finish_run(trainer, staging, method, inputs, options, metrics, f"Policy trained with {method.upper()}",
                   f"{method.upper()} (TRL's {METHODS[method][0]}) from the SFT model against a trained reward "
                   "model, by this repository's RL recipe.", reference=reference_curves)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _log(trainer, method: str, message: str) -> None:
    if trainer.is_world_process_zero():
        print(f"[{method}] {message}", flush=True)


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([PromptArguments, GRPOConfig, ModelConfig, PeftMethodArguments], with_cpu_process_group(argv))
    check_peft_settings("grpo", parsed[2], parsed[3], parsed[1])
    check_reward_settings(parsed[0].reward_model_path, parsed[0].correctness_reward, parsed[1].reward_weights)
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
