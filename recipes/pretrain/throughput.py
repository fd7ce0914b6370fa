"""Tokens/s and MFU (model FLOPs utilisation) for pretraining.

Model FLOPs per token follow the PaLM appendix: 6·N for the weight matmuls (forward 2N,
backward 4N) plus 12·L·d_attn·T for the attention scores and weighted sum, where N counts the
parameters a token actually passes through (the input embedding is a lookup and is left out;
for MoE only `num_experts_per_tok` of the experts), L is the layer count, d_attn the total
attention width and T the sequence length. MFU divides achieved model FLOP/s by a peak that is
measured, not read off a data sheet: the best dense matmul rate of this device in the training
dtype (fp32 on CPU, bf16/fp16 on GPU). Every log line names that peak.
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters used per token: all but the input embedding, and only the routed experts of MoE."""
    config = model.config
    total = sum(_numel(p) for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = getattr(config, "tie_word_embeddings", False)
    active = total if tied else total - _numel(embedding)  # a tied matrix is the (compute-bearing) lm_head
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        expert_params = sum(_numel(p) for name, p in model.named_parameters() if ".experts." in name)
        active -= expert_params * (experts - config.num_experts_per_tok) // experts
    return active


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves an empty local tensor


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * active_parameters(model) + attention


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                       repeats: int = 5) -> float:
    """Best observed FLOP/s of a square matmul on this device in this dtype (one process).

    GPUs need a large product (8192^3) to reach their peak; 2048^3 is plenty for a CPU.
    """
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, caches
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class ThroughputMeter(TrainerCallback):
    """Turns global-step counts and wall time into tokens/s and MFU between two log points.

    As a callback it restarts its clock when training begins (also after a resume) and after
    each evaluation, so evaluation time never counts as training time.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, world_size: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops * world_size
        self.last_step, self.last_time = 0, None

    def start(self, step: int) -> None:
        self.last_step, self.last_time = step, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.start(state.global_step)

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        if self.last_time is None or step <= self.last_step:
            self.start(step)
            return {}
        tokens_per_second = (step - self.last_step) * self.tokens_per_step / (now - self.last_time)
        self.start(step)
        return {
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(tokens_per_second * self.flops_per_token / self.peak_flops, 4),
        }
