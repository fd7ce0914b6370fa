"""Supervised fine-tuning with TRL's SFTTrainer: chat template, loss on assistant turns only.

    # full fine-tuning of the tiny pretrained model on the embedded tasks, CPU
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft/sft.py --config recipes/sft/tiny.yaml

    # the same with LoRA, or with bottleneck adapters
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft/sft.py --config recipes/sft/tiny_lora.yaml
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft/sft.py --config recipes/sft/tiny_bottleneck.yaml

    # SmolLM2-360M on smoltalk, 8 GPUs, DeepSpeed ZeRO-3 (data first: see recipes/sft/README.md)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft/sft.py \
        --config recipes/sft/smollm2_360m_smoltalk.yaml

Input: a model directory (the pretraining output, or a Hub model) and a `messages` dataset from
`data_prep.build_sft_data`. Output (`output_dir`): the model or PEFT adapter (safetensors), the
tokenizer, `metrics.json` with held-out exact match before and after, `trainer_state.json` (the log
history), a model card and `manifest.json`, written last.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig

from data_prep.artifacts import UserError, build_manifest, parse_config, run_cli, write_manifest
from recipes.common import (account_for_dropped_rows, check_max_length, check_settings, check_special_tokens,
                            check_training_numbers, claim_run_dir, fused_head_on_labelled_positions_only,
                            keep_token_count_across_resume, load_pretrained, load_splits, mark_incomplete, model_card,
                            model_load_kwargs, no_zero3_init, optimizer_settings, publish, resolve_resume,
                            save_optimizer_settings, save_trained, training_summary, with_cpu_process_group)
from recipes.peft_methods import (PeftMethodArguments, build_peft_config, check_peft_settings, quantization_config,
                                  refuse_broken_combination, trainable_parameters)


@dataclass
class ScriptArguments:
    dataset_path: str = field(default="outputs/sft_data", metadata={"help": "Output of data_prep.build_sft_data."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="test")
    eval_exact_match: bool = field(default=True, metadata={"help": "Greedy replies to the test split, before and after."})
    eval_max_samples: int | None = field(default=None)
    eval_max_new_tokens: int = field(default=48)
    merge_adapter: bool = field(default=False, metadata={"help": "LoRA: save the merged model, adapter in adapter/."})

    def __post_init__(self):  # refused before training: the exact-match evaluation runs after it
        check_settings(self, at_least_1=("eval_max_samples", "eval_max_new_tokens"))


def main(script_args, training_args, model_args, peft_args, callbacks=None) -> dict:
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer
    from trl.chat_template_utils import has_generation_markers

    from data_prep.chat_tasks import validate_messages

    started = time.time()
    refuse_broken_combination("sft", model_args, peft_args)
    claim_run_dir(training_args.output_dir, "sft", {"dataset_path": script_args.dataset_path,
                                                    "model_name_or_path": model_args.model_name_or_path,
                                                    "chat_template_path": training_args.chat_template_path})
    # ------------------------------------------------------------------ data
    data_manifest, train_dataset, test_dataset = load_splits(
        script_args.dataset_path, script_args.dataset_train_split, script_args.dataset_test_split, validate_messages)

    # ------------------------------------------------------------------ model
    # Loaded after the training arguments exist, so that ZeRO-3 partitions it while loading.
    set_seed(training_args.seed)
    model_path = model_args.model_name_or_path
    model, tokenizer, parent = load_pretrained(
        model_path, AutoModelForCausalLM, trust_remote_code=training_args.trust_remote_code, for_training=True,
        quantization_config=quantization_config(model_args), **model_load_kwargs(model_args))
    if training_args.chat_template_path:  # a Hub model whose own template lacks generation markers
        template = Path(training_args.chat_template_path)
        if not template.is_file():
            raise UserError(f"chat_template_path: file not found: {template}")
        tokenizer.chat_template = template.read_text()
    if not tokenizer.chat_template:
        raise UserError(f"{model_path}: the tokenizer has no chat template (set chat_template_path to a Jinja "
                        "template file)")
    if training_args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        raise UserError(f"{model_path}: the chat template has no {{% generation %}} markers, which "
                        "assistant_only_loss needs to find the assistant tokens")
    check_special_tokens(training_args, tokenizer, model_path)
    check_max_length(training_args, model, model_path)
    peft_config = build_peft_config(model_args, peft_args, model)

    # ------------------------------------------------------------------ trainer
    # Without Triton, TRL's fused LM head would also project the prompt and padding positions (~2x slower on CPU).
    fused_head_on_labelled_positions_only()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                         eval_dataset=test_dataset if training_args.eval_strategy != "no" else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    account_for_dropped_rows(trainer, _unpacked_row_counts(training_args, train_dataset, trainer.eval_dataset),
                             "no assistant token left after truncation", lambda message: _log(trainer, message))
    # a bad resume_from_checkpoint is refused before the finished run's manifest goes
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir,
                            optimizer=optimizer_settings(training_args))
    if trainer.is_world_process_zero():
        mark_incomplete(training_args.output_dir)
    trainable, total = trainable_parameters(trainer.model)
    _log(trainer, f"{type(trainer.model).__name__}: {trainable:,} of {total:,} parameters trainable "
                  f"({100 * trainable / total:.2f}%)")

    # ------------------------------------------------------------------ train
    keep_token_count_across_resume(trainer, resume)
    save_optimizer_settings(trainer, optimizer_settings(training_args))
    train_result = trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------------ save
    staging, metrics = save_trained(trainer, train_result, trainable, total)  # every rank joins
    if trainer.is_world_process_zero():
        if script_args.merge_adapter:
            _merge_lora(staging, trust_remote_code=training_args.trust_remote_code)

        # -------------------------------------------------------------- eval
        # Both ends are reloaded from disk on one process: what is scored is what was saved.
        if script_args.eval_exact_match:
            metrics["exact_match_before"] = _exact_match(model_path, test_dataset, script_args, training_args)
            metrics["exact_match_after"] = _exact_match(str(staging), test_dataset, script_args, training_args)
            _log(trainer, f"held-out exact match: {metrics['exact_match_before']['exact_match']:.3f} before, "
                          f"{metrics['exact_match_after']['exact_match']:.3f} after "
                          f"{json.dumps(metrics['exact_match_after']['by_task'])}")
        metrics["wall_time_s"] = round(time.time() - started, 1)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        trainer.state.save_to_json(str(staging / "trainer_state.json"))  # log_history, for the report's curves
        inputs = {"model": model_path, "model_fingerprint": parent.get("fingerprint"),
                  "dataset_path": script_args.dataset_path, "dataset_fingerprint": data_manifest["fingerprint"],
                  "resumed_from": resume}
        options = {"peft": peft_config.to_dict() if peft_config else None, "peft_method": asdict(peft_args),
                   "training": training_summary(training_args, ("packing", "assistant_only_loss", "eos_token"))}
        (staging / "README.md").write_text(_card(inputs, options, metrics))
        write_manifest(staging, build_manifest("sft", inputs, options, _headline(metrics)))
        publish(staging, training_args.output_dir, trainer)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _unpacked_row_counts(training_args, train_dataset, eval_dataset) -> dict[str, int]:
    """Rows per split that SFTTrainer truncates one by one, and so may drop (a packed split is chunked)."""
    if training_args.max_length is None:
        return {}
    eval_packing = training_args.packing if training_args.eval_packing is None else training_args.eval_packing
    counts = {} if training_args.packing else {"train": len(train_dataset)}
    if eval_dataset is not None and not eval_packing:
        counts["test"] = len(eval_dataset)
    return counts


def _exact_match(path, test_dataset, script_args, training_args) -> dict:
    from transformers import AutoModelForCausalLM

    from recipes.eval.generation import evaluate_exact_match

    with no_zero3_init():
        model, tokenizer, _ = load_pretrained(path, AutoModelForCausalLM, trust_remote_code=training_args.trust_remote_code)
        return evaluate_exact_match(model, tokenizer, test_dataset, max_new_tokens=script_args.eval_max_new_tokens,
                                    max_samples=script_args.eval_max_samples)


def _merge_lora(staging: Path, trust_remote_code: bool) -> None:
    """Fold the saved LoRA adapter into its base: staging becomes a standalone model, adapter/ keeps the adapter."""
    from transformers import AutoModelForCausalLM

    adapter_dir = staging / "adapter"
    adapter_dir.mkdir(exist_ok=True)  # a crashed earlier run may have left it
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staging / name).rename(adapter_dir / name)
    with no_zero3_init():
        model, _, _ = load_pretrained(str(adapter_dir), AutoModelForCausalLM, trust_remote_code=trust_remote_code)
        model.merge_and_unload().save_pretrained(str(staging))


def _log(trainer, message: str) -> None:
    if trainer.is_world_process_zero():
        print(f"[sft] {message}", flush=True)


def _headline(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for key in ("exact_match_before", "exact_match_after"):
        if key in metrics:
            out[key] = metrics[key]["exact_match"]
    return out


def _card(inputs: dict, options: dict, metrics: dict) -> str:
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in _headline(metrics).items()}
    if "exact_match_after" in metrics:
        shown["exact_match_by_task"] = json.dumps(metrics["exact_match_after"]["by_task"])
    return model_card(
        title="Chat model fine-tuned with SFT",
        summary="Supervised fine-tuning with TRL's SFTTrainer, loss on assistant turns only, by this repository's "
                "SFT recipe.",
        sections={"Lineage": inputs, "Training": options["training"], "PEFT": options["peft"] or "full fine-tuning",
                  "Metrics": shown},
        tags=["sft", "trl", "chat"],
    )


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([ScriptArguments, SFTConfig, ModelConfig, PeftMethodArguments], with_cpu_process_group(argv))
    check_training_numbers(parsed[1])
    check_peft_settings("sft", parsed[2], parsed[3], parsed[1])
    script_args, training_args, model_args, peft_args = parsed
    if script_args.merge_adapter and not (model_args.use_peft and peft_args.peft_method == "lora"):
        raise UserError("merge_adapter: only LoRA adapters can be merged into the base weights")
    # both fail inside SFTTrainer, after the model has loaded (the second at the first batch)
    if training_args.padding_free and not training_args.packing and training_args.max_length is not None:
        raise UserError("padding_free: without packing, TRL does not enforce max_length; set packing: true, or "
                        "padding_free: false")
    if training_args.completion_only_loss:
        raise UserError("completion_only_loss: the recipe's data are conversations (messages), which TRL does not "
                        "split into prompt and completion; use assistant_only_loss: true")
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
