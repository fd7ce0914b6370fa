"""Train a reward model with TRL's RewardTrainer: pairwise (Bradley-Terry) loss on preference pairs.

    # the tiny SFT model as a reward model, on the embedded preference pairs, CPU
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reward/reward.py --config recipes/reward/tiny.yaml

    # with LoRA (task_type SEQ_CLS; the score head is trained in full)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reward/reward.py \
        --config recipes/reward/tiny_lora.yaml

    # SmolLM2-360M-Instruct on UltraFeedback, 8 GPUs, DeepSpeed ZeRO-3 (data first: see recipes/reward/README.md)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/reward/reward.py \
        --config recipes/reward/smollm2_360m_ultrafeedback.yaml

Input: the SFT output (or a Hub model), loaded as `AutoModelForSequenceClassification(num_labels=1)`
with a fresh scalar head, and (prompt, chosen, rejected[, margin]) rows from
`data_prep.build_preference_data`. Loss: -log sigmoid(r_chosen - r_rejected - margin). Output: the
model or adapter, tokenizer, `metrics.json` with held-out pairwise accuracy before and after,
`trainer_state.json` (the log history), a model card and `manifest.json`, written last. With
`share_prompt: true` each pair runs as one sequence that holds its prompt once (shared_prompt.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from trl import ModelConfig, RewardConfig, RewardTrainer

from data_prep.artifacts import UserError, build_manifest, parse_config, run_cli, write_manifest
from recipes.common import (account_for_dropped_rows, check_max_length, check_special_tokens, check_training_numbers,
                            claim_run_dir, keep_token_count_across_resume, load_pretrained, load_splits,
                            mark_incomplete, model_card, model_load_kwargs, no_zero3_init, optimizer_settings, publish,
                            resolve_resume, save_optimizer_settings, save_trained, training_summary,
                            with_cpu_process_group)
from recipes.peft_methods import (PeftMethodArguments, build_peft_config, check_peft_settings, quantization_config,
                                  refuse_broken_combination, trainable_parameters)
from recipes.reward.shared_prompt import (SharedPromptCollator, check_attention_implementation, merged_length,
                                          pairwise_loss, score_head, shared_prompt_rewards)


@dataclass
class ScriptArguments:
    dataset_path: str = field(default="outputs/preference_data",
                              metadata={"help": "Output of data_prep.build_preference_data."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="test")
    eval_pairwise_accuracy: bool = field(default=True, metadata={"help": "Score the test pairs before and after."})
    share_prompt: bool = field(default=False, metadata={
        "help": "Run each pair as one sequence that holds the shared prompt once (recipes/reward/shared_prompt.py). "
                "Same rewards as two rows, fewer tokens; needs a `score` head and sdpa or eager attention."})


def main(script_args, training_args, model_args, peft_args, callbacks=None) -> dict:
    from transformers import AutoModelForSequenceClassification, set_seed

    from data_prep.chat_tasks import validate_preferences

    started = time.time()
    refuse_broken_combination("reward", model_args, peft_args)
    claim_run_dir(training_args.output_dir, "reward", {"dataset_path": script_args.dataset_path,
                                                       "model_name_or_path": model_args.model_name_or_path})
    # ------------------------------------------------------------------ data
    data_manifest, train_dataset, test_dataset = load_splits(
        script_args.dataset_path, script_args.dataset_train_split, script_args.dataset_test_split, validate_preferences)

    # ------------------------------------------------------------------ model
    # A scalar head on the SFT model; loaded after the training arguments so that ZeRO-3 partitions it.
    set_seed(training_args.seed)
    model_path = model_args.model_name_or_path
    model, tokenizer, parent = load_pretrained(
        model_path, AutoModelForSequenceClassification, trust_remote_code=training_args.trust_remote_code,
        for_training=True, num_labels=1, quantization_config=quantization_config(model_args),
        **model_load_kwargs(model_args))
    if not tokenizer.chat_template:  # RewardTrainer renders each conversational pair with it
        raise UserError(f"{model_path}: the tokenizer has no chat template (the reward model starts from a chat "
                        "model, e.g. the SFT recipe's output)")
    check_special_tokens(training_args, tokenizer, model_path)
    check_max_length(training_args, model, model_path)
    peft_config = build_peft_config(model_args, peft_args, model)

    # ------------------------------------------------------------------ trainer
    trainer_cls = SharedPromptRewardTrainer if script_args.share_prompt else PairLengthGroupedRewardTrainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset,
                          eval_dataset=test_dataset if training_args.eval_strategy != "no" else None,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if training_args.max_length is not None:
        given = {"train": len(train_dataset)}
        if trainer.eval_dataset is not None:
            given["test"] = len(test_dataset)
        account_for_dropped_rows(trainer, given, "a side longer than max_length",
                                 lambda message: _log(trainer, message))
    # a bad resume_from_checkpoint is refused before the finished run's manifest goes
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir,
                            optimizer=optimizer_settings(training_args))
    if trainer.is_world_process_zero():
        mark_incomplete(training_args.output_dir)
    trainable, total = trainable_parameters(trainer.model)
    _log(trainer, f"{type(trainer.model).__name__}: {trainable:,} of {total:,} parameters trainable "
                  f"({100 * trainable / total:.2f}%); margin column: {'margin' in train_dataset.column_names}; "
                  f"shared prompt: {script_args.share_prompt}")

    # ------------------------------------------------------------------ train
    keep_token_count_across_resume(trainer, resume)
    save_optimizer_settings(trainer, optimizer_settings(training_args))
    train_result = trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------------ save
    staging, metrics = save_trained(trainer, train_result, trainable, total)  # every rank joins
    if trainer.is_world_process_zero():
        # -------------------------------------------------------------- eval
        # The untrained head (same seed) against the saved reward model, both reloaded on one process.
        if script_args.eval_pairwise_accuracy:
            set_seed(training_args.seed)
            metrics["pairwise_before"] = _pairwise(model_path, test_dataset, training_args)
            metrics["pairwise_after"] = _pairwise(str(staging), test_dataset, training_args)
            _log(trainer, f"held-out pairwise accuracy: {metrics['pairwise_before']['accuracy']:.3f} before, "
                          f"{metrics['pairwise_after']['accuracy']:.3f} after "
                          f"(mean margin {metrics['pairwise_after']['mean_margin']:.2f}, "
                          f"{metrics['pairwise_after']['n']} pairs)")
        metrics["wall_time_s"] = round(time.time() - started, 1)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        trainer.state.save_to_json(str(staging / "trainer_state.json"))  # log_history, for the report's curves
        inputs = {"model": model_path, "model_fingerprint": parent.get("fingerprint"),
                  "dataset_path": script_args.dataset_path, "dataset_fingerprint": data_manifest["fingerprint"],
                  "resumed_from": resume}
        options = {"peft": peft_config.to_dict() if peft_config else None, "peft_method": asdict(peft_args),
                   "training": training_summary(training_args, ("center_rewards_coefficient",))}
        (staging / "README.md").write_text(_card(inputs, options, metrics))
        write_manifest(staging, build_manifest("reward", inputs, options, _headline(metrics)))
        publish(staging, training_args.output_dir, trainer)
    trainer.accelerator.wait_for_everyone()
    return metrics


class PairLengthGroupedRewardTrainer(RewardTrainer):
    """RewardTrainer whose `train_sampling_strategy: group_by_length` works: batches of pairs of similar length.

    transformers measures lengths on an `input_ids` column, which TRL's tokenized pairs do not have
    (`chosen_ids`, `rejected_ids`), so it would stop. A pair is as long as its longer side, because the
    collator pads both sides to the batch's longest sequence. On the embedded pairs this takes padding
    from 56% of the batch tokens to 5%.
    """

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return self._pairs_by_length(dataset, self.args.train_batch_size * self.args.gradient_accumulation_steps)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        return self._pairs_by_length(eval_dataset, self.args.eval_batch_size)  # transformers groups eval too

    def _pairs_by_length(self, dataset, batch_size: int):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [self.pair_length(chosen, rejected)
                   for chosen, rejected in zip(dataset["chosen_ids"], dataset["rejected_ids"])]
        return LengthGroupedSampler(batch_size, lengths=lengths)

    @staticmethod
    def pair_length(chosen_ids: list[int], rejected_ids: list[int]) -> int:
        return max(len(chosen_ids), len(rejected_ids))


class SharedPromptRewardTrainer(PairLengthGroupedRewardTrainer):
    """RewardTrainer that runs a pair's shared prompt once (`share_prompt: true`).

    Only the batch layout and the forward change; the loss and the logged metrics are RewardTrainer's.
    On the embedded pairs a batch holds 95 tokens per pair instead of 160.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.score_head = score_head(self.model)  # found once; a model without one stops here, not at step 1
        check_attention_implementation(self.model)
        self.data_collator = SharedPromptCollator(self.processing_class.pad_token_id, self.args.pad_to_multiple_of)

    @staticmethod
    def pair_length(chosen_ids: list[int], rejected_ids: list[int]) -> int:
        return merged_length(chosen_ids, rejected_ids)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        mode = "train" if self.model.training else "eval"
        rewards_chosen, rewards_rejected = shared_prompt_rewards(model, inputs, self.score_head)
        loss = pairwise_loss(rewards_chosen, rewards_rejected, inputs.get("margin"),
                             self.args.center_rewards_coefficient)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["real_tokens"]).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            both = self.accelerator.gather(torch.cat([rewards_chosen, rewards_rejected]))
            self._metrics[mode]["min_reward"].append(both.min().item())
            self._metrics[mode]["mean_reward"].append(both.mean().item())
            self._metrics[mode]["max_reward"].append(both.max().item())
            accuracy = (rewards_chosen > rewards_rejected).float().mean()
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
            margin = (rewards_chosen - rewards_rejected).mean()
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        outputs = {"logits": torch.stack([rewards_chosen, rewards_rejected], dim=1)}
        return (loss, outputs) if return_outputs else loss


def _pairwise(path, test_dataset, training_args) -> dict:
    from transformers import AutoModelForSequenceClassification

    from recipes.eval.reward_scores import pairwise_accuracy

    with no_zero3_init():
        model, tokenizer, _ = load_pretrained(path, AutoModelForSequenceClassification, num_labels=1,
                                              trust_remote_code=training_args.trust_remote_code)
        return pairwise_accuracy(model, tokenizer, test_dataset)


def _log(trainer, message: str) -> None:
    if trainer.is_world_process_zero():
        print(f"[reward] {message}", flush=True)


def _headline(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for key in ("pairwise_before", "pairwise_after"):
        if key in metrics:
            out[f"{key}_accuracy"] = metrics[key]["accuracy"]
    return out


def _card(inputs: dict, options: dict, metrics: dict) -> str:
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in _headline(metrics).items()}
    return model_card(
        title="Reward model",
        summary="A scalar reward model trained on preference pairs with TRL's RewardTrainer (Bradley-Terry loss) "
                "by this repository's reward recipe.",
        sections={"Lineage": inputs, "Training": options["training"], "PEFT": options["peft"] or "full fine-tuning",
                  "Metrics": shown},
        tags=["reward-model", "trl", "rlhf"],
    )


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([ScriptArguments, RewardConfig, ModelConfig, PeftMethodArguments],
                          with_cpu_process_group(argv))
    check_training_numbers(parsed[1])
    check_peft_settings("reward", parsed[2], parsed[3], parsed[1])
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
