"""PEFT for every recipe: LoRA/QLoRA through TRL's `ModelConfig`, other methods by one key.

LoRA keeps TRL's own keys (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`,
`lora_task_type`, `load_in_4bit`, ...) and TRL's `get_peft_config`. `peft_method` switches to another
PEFT tuner with the same switches: `bottleneck` (our adapters, `recipes.bottleneck_adapter`), `ia3`,
`prompt_tuning` or `prefix_tuning` (see `refuse_broken_combination` for where the last two fail). Bad choices stop with one line: a target module the model lacks, or 4-bit/8-bit
loading on a machine without CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_prep.artifacts import UserError

PEFT_METHODS = ("lora", "bottleneck", "ia3", "prompt_tuning", "prefix_tuning")


@dataclass
class PeftMethodArguments:
    peft_method: str = field(default="lora", metadata={"help": "With use_peft: lora, bottleneck, ia3, prompt_tuning or prefix_tuning."})
    bottleneck_size: int = field(default=16, metadata={"help": "Bottleneck adapters: width of the down-projection."})
    bottleneck_non_linearity: str = field(default="gelu", metadata={"help": "Bottleneck adapters: relu, gelu or silu."})
    num_virtual_tokens: int = field(default=16, metadata={"help": "Prompt/prefix tuning: learned prefix length."})

    def __post_init__(self):
        if self.peft_method not in PEFT_METHODS:
            raise ValueError(f"peft_method must be one of {', '.join(PEFT_METHODS)}, got '{self.peft_method}'")


def quantization_config(model_args):
    """TRL's bitsandbytes config for QLoRA, or a one-line error where it cannot run."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    import importlib.util

    import torch
    from trl import get_quantization_config

    key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise UserError(f"{key} (QLoRA) needs a CUDA GPU with bitsandbytes; this machine has no CUDA device. "
                        "Use LoRA without quantization on CPU.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{key} needs bitsandbytes: pip install -r requirements-gpu.txt")
    return get_quantization_config(model_args)


def build_peft_config(model_args, method_args: PeftMethodArguments, model=None):
    """The PeftConfig that `model_args.use_peft` and `method_args.peft_method` ask for, or None."""
    if not model_args.use_peft:
        return None
    import peft
    from trl import get_peft_config

    task_type = model_args.lora_task_type
    targets = model_args.lora_target_modules
    if method_args.peft_method == "lora":
        config = get_peft_config(model_args)
    elif method_args.peft_method == "bottleneck":
        from recipes.bottleneck_adapter import BottleneckConfig

        extra = {"target_modules": targets} if targets else {}
        config = BottleneckConfig(task_type=task_type, bottleneck_size=method_args.bottleneck_size,
                                  non_linearity=method_args.bottleneck_non_linearity,
                                  adapter_dropout=model_args.lora_dropout,
                                  modules_to_save=model_args.lora_modules_to_save, **extra)
    elif method_args.peft_method == "ia3":
        config = peft.IA3Config(task_type=task_type, target_modules=targets,
                                modules_to_save=model_args.lora_modules_to_save)
    elif method_args.peft_method == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=method_args.num_virtual_tokens)
    else:
        config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method_args.num_virtual_tokens)
    if model is not None:
        check_target_modules(model, getattr(config, "target_modules", None), method_args.peft_method)
    return config


# Combinations that fail inside the pinned libraries, with the reason, so users get one line instead
# of an attention-shape traceback (seen with transformers 5.23, peft 0.21.2, trl 1.16).
BROKEN_COMBINATIONS = {
    ("sft", "prefix_tuning"): "TRL's SFTTrainer computes the loss through a fused LM head with use_cache=False, "
                              "which drops the learned prefix",
    ("reward", "prefix_tuning"): "inside TRL's RewardTrainer the prefix key/values and the attention mask disagree "
                                 "in length",
    ("reward", "prompt_tuning"): "a sequence-classification model cannot find the last real token when the input "
                                 "is given as embeddings, so padded pairs would be scored at the wrong position",
}


def refuse_broken_combination(stage: str, model_args, method_args: PeftMethodArguments) -> None:
    reason = BROKEN_COMBINATIONS.get((stage, method_args.peft_method)) if model_args.use_peft else None
    if reason:
        usable = [m for m in PEFT_METHODS if (stage, m) not in BROKEN_COMBINATIONS]
        raise UserError(f"peft_method {method_args.peft_method} does not work in the {stage} recipe: {reason}; "
                        f"use {', '.join(usable)}")


def check_target_modules(model, targets, method: str) -> None:
    """Every named target must be the last part of some module name of `model`."""
    if not targets or isinstance(targets, str):  # a regex or "all-linear": PEFT itself resolves it
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - names)
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora_target_modules: {', '.join(missing)} not found in {type(model).__name__} "
                        f"({method}); its linear layers are {', '.join(linear)}")


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, full sizes under ZeRO-3."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
