"""DPO with TRL's DPOTrainer: the offline alternative to RL, straight from preference pairs.

    # the tiny SFT model on the embedded preference pairs, CPU
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/dpo.py --config recipes/rl/dpo_tiny.yaml

    # SmolLM2-360M (SFT output of the smoltalk recipe) on UltraFeedback pairs, 8 GPUs (data first: see the README)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/rl/dpo.py \
        --config recipes/rl/dpo_smollm2_360m_ultrafeedback.yaml

No reward model and no sampling during training: the loss -log sigmoid(beta * (log pi/pi_ref(chosen)
- log pi/pi_ref(rejected))) raises the chosen reply's likelihood ratio to the frozen SFT model over
the rejected one's. `beta` is the strength of the implicit KL constraint (small beta: the policy
may move far from the reference). The tiny preset adds an SFT (negative log-likelihood) term on the
chosen reply, weighted 1.0 against DPO's 0.5 (`loss_type: [sigmoid, sft]`). Input: the SFT output and (prompt, chosen, rejected) pairs from
data_prep.build_preference_data (the same pairs the reward model learnt from). The held-out
evaluation is the online recipes' (recipes/rl/common.py): greedy replies to the SFT test prompts,
scored by the reward model and by exact match, and the KL per sequence to the SFT model. Output:
as the GRPO recipe (model or adapter, metrics.json, trainer_state.json, rl_curves.png, card,
manifest last).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from trl import DPOConfig, ModelConfig

from data_prep.artifacts import UserError, parse_config, run_cli
from recipes.common import (account_for_dropped_rows, check_max_length, check_settings, check_special_tokens,
                            check_training_numbers, claim_run_dir, fused_head_on_labelled_positions_only,
                            keep_token_count_across_resume, load_splits, mark_incomplete, optimizer_settings,
                            resolve_resume, save_optimizer_settings, save_trained, training_summary,
                            with_cpu_process_group)
from recipes.peft_methods import PeftMethodArguments, build_peft_config, check_peft_settings, trainable_parameters
from recipes.rl.common import (ReferenceCurveArguments, evaluate_saved_policy, finish_run, load_policy,
                              load_reference_curves, require_conversational, summary_line)


@dataclass
class ScriptArguments(ReferenceCurveArguments):
    dataset_path: str = field(default="outputs/preference_data",
                              metadata={"help": "Output of data_prep.build_preference_data."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="test")
    prompts_path: str | None = field(default="outputs/sft_data", metadata={
        "help": "Held-out prompts for the before/after evaluation (a data_prep.build_sft_data output)."})
    prompts_test_split: str = field(default="test")
    reward_model_path: str | None = field(default="outputs/reward_tiny", metadata={
        "help": "Scores the held-out replies (evaluation only; DPO itself needs no reward model)."})
    eval_policy: bool = field(default=True, metadata={"help": "Held-out reward, exact match and KL, before and after."})
    eval_max_samples: int | None = field(default=None)
    eval_max_new_tokens: int = field(default=48)
    eval_batch_size: int = field(default=64)

    def __post_init__(self):
        check_settings(self, at_least_1=("eval_batch_size", "eval_max_new_tokens", "eval_max_samples"))


def main(script_args, training_args, model_args, peft_args, callbacks=None) -> dict:
    from transformers import set_seed
    from trl import DPOTrainer

    from data_prep.chat_tasks import validate_preferences
    from recipes.rl.prompts import load_prompts
    from recipes.rl.rewards import RewardModelScorer

    started = time.time()
    claim_run_dir(training_args.output_dir, "dpo", {
        "model_name_or_path": model_args.model_name_or_path, "dataset_path": script_args.dataset_path,
        "prompts_path": script_args.prompts_path, "reward_model_path": script_args.reward_model_path})
    reference_curves = load_reference_curves(script_args.reference_curves)
    # ------------------------------------------------------------------ data
    data_manifest, train_pairs, test_pairs = load_splits(
        script_args.dataset_path, script_args.dataset_train_split, script_args.dataset_test_split, validate_preferences)
    keep = ["prompt", "chosen", "rejected"]  # DPO reads these; task/safety_label/margin columns are for the RM
    train_pairs = train_pairs.select_columns(keep)
    test_pairs = test_pairs.select_columns(keep)
    test_prompts, prompt_inputs = None, {}
    if script_args.eval_policy and not (script_args.prompts_path and script_args.reward_model_path):
        raise UserError("eval_policy needs prompts_path (held-out prompts) and reward_model_path (to score the "
                        "replies); set them, or eval_policy: false")
    if script_args.eval_policy:
        prompt_inputs, test_prompts, _ = load_prompts(script_args.prompts_path, script_args.prompts_test_split, None,
                                                      max_train=script_args.eval_max_samples)
        require_conversational(test_prompts, "eval_policy", skip="eval_policy: false")  # else it fails after training
    scorer = RewardModelScorer(script_args.reward_model_path, trust_remote_code=training_args.trust_remote_code) \
        if script_args.eval_policy else None

    # ------------------------------------------------------------------ model
    set_seed(training_args.seed)
    model_path = model_args.model_name_or_path
    model, tokenizer, parent = load_policy(model_args, training_args.trust_remote_code)
    check_special_tokens(training_args, tokenizer, model_path)
    check_max_length(training_args, model, model_path)
    peft_config = build_peft_config(model_args, peft_args, model)

    # ------------------------------------------------------------------ trainer
    # No ref_model: TRL loads a frozen copy of the starting model (or disables the LoRA adapter).
    # Without Triton, TRL's fused LM head would also project every prompt and padding position (README).
    fused_head_on_labelled_positions_only()
    trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_pairs,
                         eval_dataset=test_pairs if training_args.eval_strategy != "no" else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if training_args.max_length is not None:
        given = {"train": len(train_pairs)}
        if trainer.eval_dataset is not None:
            given["test"] = len(test_pairs)
        account_for_dropped_rows(trainer, given, "the prompt alone fills max_length, so no reply token is left",
                                 lambda message: _log(trainer, message))
    # a bad resume_from_checkpoint is refused before the finished run's manifest goes
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir,
                            optimizer=optimizer_settings(training_args))
    if trainer.is_world_process_zero():
        mark_incomplete(training_args.output_dir)
    trainable, total = trainable_parameters(trainer.model)
    _log(trainer, f"{type(trainer.model).__name__}: {trainable:,} of {total:,} parameters trainable; "
                  f"{len(trainer.train_dataset)} pairs, beta {training_args.beta}, loss {training_args.loss_type}")

    # ------------------------------------------------------------------ train
    keep_token_count_across_resume(trainer, resume)
    save_optimizer_settings(trainer, optimizer_settings(training_args))
    train_result = trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------------ save
    staging, metrics = save_trained(trainer, train_result, trainable, total)  # every rank joins
    if trainer.is_world_process_zero():
        # -------------------------------------------------------------- eval
        if test_prompts is not None:
            if scorer is not None:
                scorer.to(trainer.accelerator.device)
            kwargs = dict(scorer=scorer, max_new_tokens=script_args.eval_max_new_tokens,
                          batch_size=script_args.eval_batch_size, trust_remote_code=training_args.trust_remote_code,
                          seed=training_args.seed)
            metrics["before"] = evaluate_saved_policy(model_path, model_path, test_prompts, **kwargs)
            metrics["after"] = evaluate_saved_policy(str(staging), model_path, test_prompts, **kwargs)
            _log(trainer, summary_line(metrics["before"], metrics["after"]))
        metrics["wall_time_s"] = round(time.time() - started, 1)
        inputs = {"model": model_path, "model_fingerprint": parent.get("fingerprint"),
                  "dataset_path": script_args.dataset_path, "dataset_fingerprint": data_manifest["fingerprint"],
                  "prompts_path": script_args.prompts_path,
                  "prompts_fingerprint": prompt_inputs.get("dataset_fingerprint"),
                  "reward_model": script_args.reward_model_path,
                  "reward_model_fingerprint": scorer.manifest.get("fingerprint") if scorer else None,
                  "resumed_from": resume}
        options = {"peft": peft_config.to_dict() if peft_config else None, "peft_method": asdict(peft_args),
                   "evaluation": asdict(script_args),
                   "training": training_summary(training_args, ("beta", "loss_type", "max_length",
                                                                "precompute_ref_log_probs"))}
        finish_run(trainer, staging, "dpo", inputs, options, metrics, "Policy trained with DPO",
                   "DPO (TRL's DPOTrainer) from the SFT model on preference pairs, by this repository's RL recipe.",
                   beta=training_args.beta, reference=reference_curves)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _log(trainer, message: str) -> None:
    if trainer.is_world_process_zero():
        print(f"[dpo] {message}", flush=True)


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([ScriptArguments, DPOConfig, ModelConfig, PeftMethodArguments], with_cpu_process_group(argv))
    check_training_numbers(parsed[1])
    check_peft_settings("dpo", parsed[2], parsed[3], parsed[1])
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
