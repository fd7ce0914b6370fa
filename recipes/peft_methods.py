"""PEFT for every recipe: LoRA/QLoRA through TRL's `ModelConfig`, other methods by one key.

LoRA keeps TRL's own keys (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`,
`lora_task_type`, `load_in_4bit`, ...) and TRL's `get_peft_config`. `peft_method` switches to another
PEFT tuner with the same switches: `bottleneck` (our adapters, `recipes.bottleneck_adapter`), `ia3`,
`prompt_tuning` or `prefix_tuning` (see `refuse_broken_combination` for where the last two fail). Bad choices stop with one line: a target module the model lacks, or 4-bit/8-bit
loading on a machine without CUDA.
"""

from __future__ import annotations

import re
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


NON_LINEARITIES = ("relu", "gelu", "silu")  # recipes.bottleneck_adapter's activations


LORA_DROPOUT_DEFAULT = 0.05  # TRL ModelConfig's


def check_peft_settings(stage: str, model_args, method_args: PeftMethodArguments, training_args=None) -> None:
    """PEFT settings no run can use, refused while parsing: PEFT raised them only after the model had loaded
    (`lora_r` 0, a dropout of 1.5, a bottleneck of 0), or took them without a word (`lora_alpha` 0 scales
    every LoRA update to zero). The reward recipe trains a sequence classifier: its adapter is SEQ_CLS, which
    also trains the score head; TRL's default CAUSAL_LM crashed inside the trainer, so it is read as unset.
    TRL's reward and DPO trainers zero every dropout (`disable_dropout`), the adapter's included: a
    `lora_dropout` set above 0 there would be recorded but never applied, so it is refused."""
    if not model_args.use_peft:
        return
    from recipes.common import check_settings

    targets = model_args.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        # TRL's ModelConfig turns a one-item list into a string, which PEFT reads as a regex of the whole module
        # name: "q_proj" would match nothing
        model_args.lora_target_modules = [targets]

    check_settings(model_args, at_least_1=("lora_r",), positive=("lora_alpha",), non_negative=("lora_dropout",))
    check_settings(method_args, at_least_1=("bottleneck_size", "num_virtual_tokens"))
    if not model_args.lora_dropout < 1:
        raise UserError(f"lora_dropout must be < 1, got {model_args.lora_dropout}")
    if method_args.bottleneck_non_linearity not in NON_LINEARITIES:
        raise UserError(f"bottleneck_non_linearity must be one of {', '.join(NON_LINEARITIES)}, got "
                        f"'{method_args.bottleneck_non_linearity}'")
    if getattr(training_args, "disable_dropout", False) and model_args.lora_dropout > 0:
        if model_args.lora_dropout != LORA_DROPOUT_DEFAULT:
            raise UserError(f"lora_dropout {model_args.lora_dropout}: disable_dropout is true, so the {stage} trainer "
                            "sets every dropout to 0, the adapter's included; set lora_dropout: 0 or "
                            "disable_dropout: false")
        model_args.lora_dropout = 0.0  # ModelConfig's default, left unset: record what the trainer applies
    wanted = "SEQ_CLS" if stage == "reward" else "CAUSAL_LM"
    if stage == "reward" and model_args.lora_task_type == "CAUSAL_LM":
        model_args.lora_task_type = wanted  # ModelConfig's default, which no reward model can train with
    if model_args.lora_task_type != wanted:
        kind = "sequence classifier" if wanted == "SEQ_CLS" else "causal language model"
        raise UserError(f"lora_task_type: the {stage} recipe trains a {kind}, so its adapter's task type is {wanted}; "
                        f"got '{model_args.lora_task_type}'")


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
    """Every named target must be the last part of some module name of `model`; for LoRA and IA3, of a layer
    they can adapt (PEFT's error for a block such as `self_attn` prints the whole module tree)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(targets, str):
        return  # "all-linear" or a regex of whole module names: PEFT itself resolves it (check_peft_settings
        # has turned a bare name back into a list)
    if not targets:
        return
    modules = list(model.named_modules())
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules
                     if isinstance(module, (torch.nn.Linear, Conv1D))})

    def named(target):  # PEFT's rule for a list: the whole name, or its last dotted parts
        return [module for name, module in modules if name == target or name.endswith("." + target)]

    missing = sorted(target for target in set(targets) if not named(target))
    if missing:
        raise UserError(f"lora_target_modules: {', '.join(missing)} not found in {type(model).__name__} "
                        f"({method}); its linear layers are {', '.join(linear)}")
    if method in ("lora", "ia3"):
        layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
        blocks = sorted(target for target in set(targets)
                        if not any(isinstance(module, layers) for module in named(target)))
        if blocks:
            raise UserError(f"lora_target_modules: {', '.join(blocks)} in {type(model).__name__} are not layers "
                            f"{method} can adapt (linear, embedding or convolution); its linear layers are "
                            f"{', '.join(linear)}")


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, full sizes under ZeRO-3."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
