"""Pretrain a causal language model from a config, from scratch, with transformers.Trainer.

    # tiny preset on the embedded default, CPU (after data_prep; see recipes/pretrain/README.md)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/pretrain/pretrain.py \
        --config recipes/pretrain/tiny.yaml

    # ~350M Llama on FineWeb-Edu, 8 GPUs, DeepSpeed ZeRO-3
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/pretrain/pretrain.py \
        --config recipes/pretrain/llama_350m_fineweb.yaml

Input: a packed dataset from `data_prep.pack_dataset` and its tokenizer. Output (`output_dir`):
checkpoints every `save_steps`, and at the end the model (safetensors), tokenizer, model card,
`metrics.json`, `trainer_state.json` (the log history) and `manifest.json`. The manifest is written
last: without it the directory is unfinished. Tokens/s and MFU are logged at every logging step.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import Trainer, TrainingArguments

from data_prep.artifacts import (MANIFEST_NAME, UserError, build_manifest, load_saved_dataset, parse_config,
                                 read_manifest, run_cli, write_manifest)
from recipes.common import (check_settings, check_training_numbers, claim_run_dir, mark_incomplete, model_card,
                            optimizer_settings, publish, resolve_resume, save_optimizer_settings,
                            with_cpu_process_group)
from recipes.pretrain.muon import MuonWithAdamW, muon_optimizer_kwargs


@dataclass
class ScriptArguments:
    dataset_path: str = field(default="outputs/packed", metadata={"help": "Output of data_prep.pack_dataset."})
    tokenizer_path: str = field(default="outputs/tokenizer", metadata={"help": "Output of data_prep.train_tokenizer."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})
    peak_tflops: float | None = field(default=None, metadata={"help": "Peak per device for MFU; None measures a matmul."})
    muon: bool = field(default=False, metadata={
        "help": "Train the hidden weight matrices with Muon and the rest with AdamW (recipes/pretrain/muon.py); "
                "replaces `optim`."})
    muon_learning_rate: float = field(default=0.02, metadata={"help": "Peak LR of the Muon group (cosine-scheduled)."})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's Nesterov momentum."})
    muon_weight_decay: float = field(default=0.0, metadata={
        "help": "Muon group's decoupled weight decay: matrices shrink by lr x this per step."})

    def __post_init__(self):
        check_settings(self, at_least_1=("max_eval_samples",), positive=("peak_tflops", "muon_learning_rate"),
                       non_negative=("muon_momentum", "muon_weight_decay"))
        if not self.muon_momentum < 1:  # a momentum of 1 or more never forgets, and grows without bound
            raise UserError(f"muon_momentum must be < 1, got {self.muon_momentum}")
        if not self.muon:
            defaults = {spec.name: spec.default for spec in fields(self)}
            for key in ("muon_learning_rate", "muon_momentum", "muon_weight_decay"):
                if getattr(self, key) != defaults[key]:
                    raise UserError(f"{key} is only read with muon: true, but muon is false")


@dataclass
class ArchitectureArguments:
    """Keys are transformers config fields; `model_type` picks the family (llama, mixtral, qwen2, ...)."""

    model_type: str = field(default="llama")
    hidden_size: int = field(default=256)
    intermediate_size: int = field(default=768)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    num_key_value_heads: int | None = field(default=None)
    max_position_embeddings: int = field(default=2048)
    rope_theta: float | None = field(default=None)
    tie_word_embeddings: bool = field(default=False)
    initializer_range: float = field(default=0.02)
    num_local_experts: int | None = field(default=None, metadata={"help": "MoE experts (mixtral)."})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "Experts routed per token (mixtral)."})
    attn_implementation: str = field(default="sdpa")

    def __post_init__(self):  # transformers builds most of these and fails at the first forward, or mid-init
        check_settings(self, at_least_1=("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                         "num_local_experts", "num_experts_per_tok"),
                       positive=("rope_theta",), non_negative=("initializer_range",))
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                            f"{self.num_attention_heads}")
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads} (each key/value head serves a group)")
        if None not in (self.num_local_experts, self.num_experts_per_tok) and \
                self.num_experts_per_tok > self.num_local_experts:
            raise UserError(f"num_experts_per_tok {self.num_experts_per_tok} is more than num_local_experts "
                            f"{self.num_local_experts}")


def build_config(arch: ArchitectureArguments, tokenizer):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AttentionInterface, AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch.model_type not in CONFIG_MAPPING:  # transformers' own message lists all ~400 families in one line
        close = difflib.get_close_matches(arch.model_type, list(CONFIG_MAPPING.keys()), n=3)
        raise UserError(f"key model_type: unknown model family '{arch.model_type}'"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    kwargs = {k: v for k, v in asdict(arch).items() if v is not None and k not in ("model_type", "attn_implementation")}
    if arch.rope_theta is not None:  # transformers 5 keeps RoPE settings in rope_parameters
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
    if arch.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"key model_type: '{arch.model_type}' has no causal LM class in transformers (an "
                        "encoder or encoder-decoder family); pretraining builds AutoModelForCausalLM")
    known = ("eager", *AttentionInterface._global_mapping)
    if arch.attn_implementation not in known:
        raise UserError(f"key attn_implementation: unknown '{arch.attn_implementation}' (one of {', '.join(known)})")
    try:
        config = AutoConfig.for_model(arch.model_type, **kwargs)
    except ValueError as err:
        raise UserError(f"model_type '{arch.model_type}': {str(err).splitlines()[0]}") from None
    except StrictDataclassError as err:  # a config class's own validator; its reason is the last line
        reason = str(err).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
        raise UserError(f"model_type '{arch.model_type}': {reason}") from None
    # a setting the family's config class has no field for (nor alias, as GPT-2's n_embd for hidden_size) is
    # kept as a stray attribute and builds nothing: GPT-2 has no intermediate_size, grouped heads or RoPE
    config_class = type(config)
    known_keys = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    defaults = ArchitectureArguments()
    for key in kwargs:
        source_key = "rope_theta" if key == "rope_parameters" else key
        changed = getattr(arch, source_key) != getattr(defaults, source_key)
        if key not in known_keys and changed:
            raise UserError(f"key {source_key} does not apply to model_type '{arch.model_type}' "
                            f"({config_class.__name__} has no such setting)")
    if getattr(config, "is_decoder", None) is False:  # BERT-like families attend both ways unless told
        config.is_decoder = True
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config._attn_implementation = arch.attn_implementation
    return config


def main(script_args, training_args, arch_args, callbacks=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, set_seed

    from data_prep.train_tokenizer import load_tokenizer
    from recipes.pretrain.throughput import ThroughputMeter, flops_per_token, measure_peak_flops

    # ------------------------------------------------------------------ data
    claim_run_dir(training_args.output_dir, "pretrain", {"dataset_path": script_args.dataset_path,
                                                         "tokenizer_path": script_args.tokenizer_path})
    data_manifest = read_manifest(script_args.dataset_path, "packed dataset", stage="packed")
    tokenizer = load_tokenizer(script_args.tokenizer_path)
    _refuse_other_tokenizer(script_args.tokenizer_path, data_manifest, script_args.dataset_path)
    packed = load_saved_dataset(script_args.dataset_path)
    train_dataset, eval_dataset = packed["train"], packed["validation"]
    if script_args.max_eval_samples:
        eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))
    block_size = len(train_dataset[0]["input_ids"])
    if block_size > arch_args.max_position_embeddings:
        raise UserError(f"block size {block_size} of {script_args.dataset_path} is larger than "
                        f"max_position_embeddings {arch_args.max_position_embeddings}")
    if len(eval_dataset) == 0:
        raise UserError(f"{script_args.dataset_path}: the validation split is empty")

    # ------------------------------------------------------------------ model
    # Built after TrainingArguments exist, so that under ZeRO-3 from_config runs inside zero.Init.
    set_seed(training_args.seed)
    config = build_config(arch_args, tokenizer)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ImportError as err:  # flash_attention_2/3 without its package
        raise UserError(f"attn_implementation '{arch_args.attn_implementation}': "
                        f"{str(err).splitlines()[0]}") from None
    partitioned_at_init = hasattr(next(model.parameters()), "ds_numel")  # True when zero.Init built it
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # full size under ZeRO-3

    # ------------------------------------------------------------------ trainer
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    optimizer_factory = None
    if script_args.muon:
        optimizer_factory = (MuonWithAdamW, muon_optimizer_kwargs(
            training_args, script_args.muon_learning_rate, script_args.muon_momentum, script_args.muon_weight_decay))
    trainer = ThroughputTrainer(model=model, args=training_args, data_collator=collator, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks,
                                optimizer_cls_and_kwargs=optimizer_factory)
    if script_args.muon:
        _check_muon_supported(trainer)
    settings = optimizer_settings(training_args, **_optimizer_summary(script_args, training_args))
    save_optimizer_settings(trainer, settings)
    # a bad resume_from_checkpoint is refused before the finished run's manifest goes
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, optimizer=settings)
    if resume:
        _refuse_other_architecture(resume, config)
    if trainer.is_world_process_zero():
        mark_incomplete(training_args.output_dir)
    device = trainer.args.device
    peak_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    if device.type == "cpu":
        peak_dtype = torch.float32  # mixed precision on CPU still runs the matmuls it can in fp32
    peak = (script_args.peak_tflops * 1e12 if script_args.peak_tflops
            else measure_peak_flops(device, peak_dtype))
    peak_source = "given" if script_args.peak_tflops else f"measured {str(peak_dtype).split('.')[-1]} matmul on {device.type}"
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * training_args.world_size * block_size)
    model_flops = flops_per_token(model, block_size)
    trainer.meter = ThroughputMeter(tokens_per_step, model_flops, peak, training_args.world_size)
    trainer.add_callback(trainer.meter)
    state = trainer.accelerator.state
    zero_stage = state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None
    trainer.log_line(f"{state.distributed_type.value}{f' ZeRO-{zero_stage}' if zero_stage else ''} on "
                     f"{training_args.world_size} process(es); parameters partitioned at init: {partitioned_at_init}")
    trainer.log_line(f"model {n_params / 1e6:.2f}M params, {model_flops / 1e6:.1f} MFLOP/token; "
                     f"MFU assumes a peak of {peak / 1e12:.2f} TFLOP/s per process ({peak_source})")

    # ------------------------------------------------------------------ train
    train_result = trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------------ eval
    eval_metrics = trainer.evaluate()
    metrics = {
        "params": n_params,
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.global_step * tokens_per_step,
        "train_loss": train_result.training_loss,
        "final_train_loss": _last_logged(trainer, "loss"),
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(min(eval_metrics["eval_loss"], 50)),
        "init_eval_loss": _initial_eval_loss(trainer),  # from eval_on_start, kept across resumes
        "tokens_per_second": _last_logged(trainer, "tokens_per_second"),
        "mfu": _last_logged(trainer, "mfu"),
        "peak_tflops": round(peak / 1e12, 3),
        "peak_source": peak_source,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
    }
    if metrics["init_eval_loss"]:
        metrics["eval_loss_ratio"] = metrics["eval_loss"] / metrics["init_eval_loss"]
    trainer.log_line("metrics " + json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))

    # ------------------------------------------------------------------ save
    staging = Path(training_args.output_dir) / ".final-tmp"
    # Every rank joins: ZeRO-3 gathers the full weights here. _internal_call: no push yet; publish() pushes.
    trainer.save_model(str(staging), _internal_call=True)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staging))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        trainer.state.save_to_json(str(staging / "trainer_state.json"))  # log_history, for the report's curves
        inputs = {"dataset_path": script_args.dataset_path, "dataset_fingerprint": data_manifest["fingerprint"],
                  "tokenizer_path": script_args.tokenizer_path, "resumed_from": resume}
        options = {"architecture": asdict(arch_args),
                   "training": {**_training_summary(training_args), **_optimizer_summary(script_args, training_args)}}
        (staging / "README.md").write_text(_card(inputs, options, metrics, data_manifest))
        write_manifest(staging, build_manifest("pretrain", inputs, options, metrics))
        publish(staging, training_args.output_dir, trainer)
    trainer.accelerator.wait_for_everyone()
    return metrics


class ThroughputTrainer(Trainer):
    """Trainer that adds tokens/s and MFU to every training log line."""

    meter = None

    def log(self, logs, start_time=None):
        if self.meter is not None and "loss" in logs:
            logs.update(self.meter.update(self.state.global_step))
        super().log(logs, start_time)

    def log_line(self, message: str) -> None:
        if self.is_world_process_zero():
            print(f"[pretrain] {message}", flush=True)


def _initial_eval_loss(trainer):
    at_start = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
    return at_start[0] if at_start else None


def _last_logged(trainer, key: str):
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return values[-1] if values else None


def _training_summary(args) -> dict:
    keys = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "bf16", "fp16",
            "activation_checkpointing", "seed", "world_size")
    return {k: getattr(args, k) for k in keys}


def _check_muon_supported(trainer) -> None:
    """Muon orthogonalizes whole matrices: refuse the setups where a rank would hold only a shard of one."""
    if trainer.is_fsdp_enabled:
        raise UserError("muon: true does not run under FSDP (each rank would orthogonalize its own shard of a "
                        "matrix); use DDP or DeepSpeed ZeRO-1/2, or muon: false")
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if plugin.zero_stage == 3 and plugin.deepspeed_config.get("zero_optimization", {}).get("reduce_scatter", True):
        raise UserError("muon: true under ZeRO-3 needs zero_optimization.reduce_scatter: false in the DeepSpeed "
                        "config (DeepSpeed refuses Muon with reduce-scatter); use ZeRO-1/2 or DDP, or muon: false")
    if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
        # ZeRO writes the orthogonalized update into the gradient partitions before it clips them, so
        # clipping would shrink Muon's steps (measured: DDP and ZeRO-2 agree exactly only without it).
        raise UserError("muon: true under DeepSpeed ZeRO needs max_grad_norm: 0 (DeepSpeed would clip the "
                        "orthogonalized Muon update, not the gradient); or run it under DDP")


def _optimizer_summary(script_args, training_args) -> dict:
    if not script_args.muon:
        return {"optimizer": str(getattr(training_args.optim, "value", training_args.optim))}
    return {"optimizer": "muon (hidden matrices) + adamw (embeddings, norms)",
            "muon_learning_rate": script_args.muon_learning_rate, "muon_momentum": script_args.muon_momentum,
            "muon_weight_decay": script_args.muon_weight_decay}


def _card(inputs: dict, options: dict, metrics: dict, data_manifest: dict) -> str:
    data = {**inputs, "train_tokens": data_manifest["outputs"]["train"]["tokens"],
            "block_size": data_manifest["outputs"]["block_size"]}
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    return model_card(
        title=f"{options['architecture']['model_type']} pretrained from scratch",
        summary="A causal language model trained from a config with this repository's pretraining recipe.",
        sections={"Data": data, "Architecture": options["architecture"], "Training": options["training"],
                  "Metrics": shown},
        tags=["pretraining", "from-scratch", options["architecture"]["model_type"]],
    )


def _refuse_other_tokenizer(tokenizer_path: str, data_manifest: dict, dataset_path: str) -> None:
    """The packed ids are the packing tokenizer's: another vocabulary would read them as other tokens (or index
    past its embedding). Checked by the fingerprints the two manifests record."""
    packed_with = data_manifest.get("inputs", {}).get("tokenizer_fingerprint")
    if not packed_with or not (Path(tokenizer_path) / MANIFEST_NAME).is_file():
        return
    fingerprint = read_manifest(tokenizer_path, "tokenizer", stage="tokenizer")["fingerprint"]
    if fingerprint != packed_with:
        raise UserError(f"tokenizer_path: {tokenizer_path} is not the tokenizer that packed {dataset_path} "
                        f"({data_manifest['inputs'].get('tokenizer_dir')}; fingerprints {fingerprint} and {packed_with})")


ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "num_local_experts",
                     "num_experts_per_tok", "tie_word_embeddings", "rope_parameters", "rope_theta")


def _refuse_other_architecture(checkpoint: str, config) -> None:
    """Refused before the finished run's manifest goes: weights of another shape cannot be loaded."""
    saved_path = Path(checkpoint) / "config.json"
    if not saved_path.is_file():
        return  # resolve_resume has checked what a checkpoint holds; the Trainer reports a missing config
    saved, built = json.loads(saved_path.read_text()), config.to_dict()
    for key in ARCHITECTURE_KEYS:
        if key in saved and key in built and saved[key] != built[key]:
            raise UserError(f"resume_from_checkpoint: {checkpoint} holds a model with {key} {saved[key]}, and the "
                            f"settings build {built[key]}; resume with the checkpointed run's architecture")


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([ScriptArguments, TrainingArguments, ArchitectureArguments], with_cpu_process_group(argv))
    check_training_numbers(parsed[1])
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
