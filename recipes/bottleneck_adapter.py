"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP") as a PEFT method.

A bottleneck adapter is a small residual MLP inserted after a sub-block of the network:

    h -> h + W_up(dropout(act(W_down(h))))      W_down: d -> r,  W_up: r -> d,  r << d

By default it goes after the attention block and after the MLP of every decoder layer, as in the
paper. Why use it rather than LoRA: the adapter acts on activations rather than on weights, so it
works on any block whatever its inner layers are (fused or custom), and its bottleneck width r is
the one capacity knob. The cost is that it cannot be merged into the base weights (the
activation makes it nonlinear), so inference keeps the extra matmuls. Each insertion adds
2*d*r weights plus r + d biases. With d = 4096, r = 64 and two insertions per layer over
32 layers, that is 64 * (2*4096*64 + 64 + 4096) = 33.8M parameters, about 0.5% of a 7B model.
W_up starts at zero (`init_scale=0`): a freshly wrapped model computes exactly what the base does.

Importing this module registers the method with PEFT. After that, the ordinary PEFT API works as it
does for LoRA:

    import recipes.bottleneck_adapter  # registers "BOTTLENECK" with PEFT
    from peft import PeftModel, get_peft_model
    from recipes.bottleneck_adapter import BottleneckConfig

    model = get_peft_model(base, BottleneckConfig(task_type="CAUSAL_LM", bottleneck_size=16))
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out/adapter")   # adapter_config.json (peft_type BOTTLENECK) + safetensors
    model = PeftModel.from_pretrained(fresh_base, "out/adapter")
    with model.disable_adapter():          # the base model's outputs
        ...
    base = model.unload()                  # merge_and_unload() raises: the adapter is nonlinear

PEFT's `PeftType` is a closed enum, and `register_peft_method` refuses names that are not already in
it. So `_peft_type` adds the member first. This is the one place where we touch PEFT internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# Decoder families whose layers name their attention and MLP blocks `self_attn` and `mlp`.
_DEFAULT_TARGETS = {t: ["self_attn", "mlp"] for t in ("llama", "mistral", "qwen2", "qwen3")}
_NO_MERGE = ("bottleneck adapters are nonlinear and cannot be merged into the base weights; "
             "keep the PeftModel, or use unload() to get the base model back")


def _peft_type(name: str) -> PeftType:
    """Return PeftType[name], adding it to the enum first if needed (what a class-body entry would do)."""
    if name not in PeftType.__members__:
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        member._sort_order_ = len(PeftType._member_names_)
        PeftType._member_names_.append(name)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to set members
    return PeftType[name]


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters. `target_modules` default to each decoder layer's `self_attn` and `mlp`."""

    bottleneck_size: int = field(default=16, metadata={"help": "Width r of the bottleneck (d -> r -> d)."})
    non_linearity: str = field(default="gelu", metadata={"help": f"One of {sorted(_ACTIVATIONS)}."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})
    init_scale: float = field(
        default=0.0, metadata={"help": "Std of the up-projection's initial weights; 0 starts as the identity."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (exact or `.name` suffix) or one regex; adapters act on their output."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save in full, e.g. `score` for SEQ_CLS."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = _peft_type("BOTTLENECK")
        if self.non_linearity not in _ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(_ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps a module and adds the active adapters' bottleneck MLPs to its output (to the first element of a tuple)."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.features = features
        self.bottleneck_down, self.bottleneck_up = nn.ModuleDict(), nn.ModuleDict()
        self.bottleneck_act, self.bottleneck_dropout = nn.ModuleDict(), nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        reference = next(self.get_base_layer().parameters())
        factory = {"device": reference.device, "dtype": reference.dtype if reference.is_floating_point() else None}
        self.bottleneck_down[adapter_name] = nn.Linear(self.features, config.bottleneck_size, **factory)
        self.bottleneck_up[adapter_name] = up = nn.Linear(config.bottleneck_size, self.features, **factory)
        nn.init.normal_(up.weight, std=config.init_scale) if config.init_scale > 0 else nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.adapter_dropout)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(_NO_MERGE)

    def unmerge(self) -> None:  # nothing is ever merged
        pass

    def forward(self, *args, **kwargs):
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        result = hidden
        for name in self.active_adapters:  # several active adapters act in parallel on the same input
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            z = self.bottleneck_dropout[name](self.bottleneck_act[name](down(hidden.to(down.weight.dtype))))
            result = result + self.bottleneck_up[name](z).to(hidden.dtype)
        return (result, *output[1:]) if isinstance(output, tuple) else result


class BottleneckModel(BaseTuner):
    """The tuner: finds the target modules and wraps each in a BottleneckLayer."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = _DEFAULT_TARGETS

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        names = [n for n, _ in self.model.named_modules()]
        targets = peft_config.target_modules
        if isinstance(targets, str) and targets.lower() == "all-linear":  # expanded later by PEFT itself
            return peft_config
        if isinstance(targets, str):
            missing = [] if any(self._check_target_module_exists(peft_config, n) for n in names) else [targets]
        else:
            missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise ValueError(f"target_modules {missing} not found in the model ({type(self.model).__name__})")
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config, self._features(target, current_key))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter starts frozen
        self._replace_module(parent, target_name, new_module, target)

    def _features(self, target: nn.Module, key: str) -> int:
        """Width of the target's output: a Linear's out_features, else the model's hidden size."""
        if isinstance(target, nn.Linear):
            return target.out_features
        config = getattr(self.model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "hidden_size", None) is None:
            raise ValueError(f"cannot tell the output width of {key}: target nn.Linear modules, or a model whose "
                             "config has hidden_size")
        return config.hidden_size

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if not isinstance(new_module, BottleneckLayer):  # unload(): put the wrapped module back untouched
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if merge:
            raise ValueError(_NO_MERGE)
        return super()._unload_and_optionally_merge(merge=False, **kwargs)


# Register once: a second import (importlib.reload, or the file run as __main__) must not raise.
_BOTTLENECK = _peft_type("BOTTLENECK")
if _BOTTLENECK not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel,
                         prefix=BottleneckModel.prefix)
