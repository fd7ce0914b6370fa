"""Score both replies of a preference pair in one sequence that holds their shared prompt once.

A pair is `prompt + chosen` and `prompt + rejected`. TRL's RewardTrainer runs the two as separate rows,
so the prompt goes through the model twice. On the embedded pairs the prompt is 65 tokens and each
reply 15, so a pair costs 160 tokens where 95 would do.

Here a pair becomes one row, `prompt + chosen tail + rejected tail`, with
- position ids that restart the rejected tail where the prompt ends, as if it followed the prompt
  directly;
- a 4-D attention mask: causal, padding excluded, and the rejected tail blind to the chosen tail.

Each reply then sees exactly the tokens at exactly the positions it sees alone, so its reward (the
score head on its last token) is the one the separate rows give. `tests/test_reward.py` checks it
against them.
"""

from __future__ import annotations

import torch
from torch import nn

from data_prep.artifacts import UserError

PREFIX, CHOSEN, REJECTED = 0, 1, 2


def merge_pair(chosen_ids: list[int], rejected_ids: list[int]) -> dict:
    """One row for a pair: the shared prefix once, then the chosen tail, then the rejected tail."""
    limit = min(len(chosen_ids), len(rejected_ids)) - 1  # each side keeps its own last token to score
    shared = 0
    while shared < limit and chosen_ids[shared] == rejected_ids[shared]:
        shared += 1
    rejected_tail = rejected_ids[shared:]
    return {
        "input_ids": chosen_ids + rejected_tail,
        "position_ids": list(range(len(chosen_ids))) + list(range(shared, len(rejected_ids))),
        "segment": [PREFIX] * shared + [CHOSEN] * (len(chosen_ids) - shared) + [REJECTED] * len(rejected_tail),
        "chosen_end": len(chosen_ids) - 1,
        "rejected_end": len(chosen_ids) + len(rejected_tail) - 1,
    }


def merged_length(chosen_ids: list[int], rejected_ids: list[int]) -> int:
    return len(merge_pair(chosen_ids, rejected_ids)["input_ids"])


class SharedPromptCollator:
    """Batches pairs as merged rows, right-padded, with the 4-D boolean mask (True = may attend)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        rows = [merge_pair(e["chosen_ids"], e["rejected_ids"]) for e in examples]
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(key, value):
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

        real = torch.tensor([[True] * len(r["input_ids"]) + [False] * (width - len(r["input_ids"])) for r in rows])
        segment = padded("segment", PREFIX)
        index = torch.arange(width)
        causal = index[None, :] <= index[:, None]
        rejected_sees_chosen = (segment[:, :, None] == REJECTED) & (segment[:, None, :] == CHOSEN)
        batch = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "position_ids": padded("position_ids", 0),
            "attention_mask": (causal[None] & real[:, None, :] & ~rejected_sees_chosen)[:, None],
            "real_tokens": real.sum(),
            "chosen_end": torch.tensor([r["chosen_end"] for r in rows]),
            "rejected_end": torch.tensor([r["rejected_end"] for r in rows]),
        }
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        return batch


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model, through DDP, PEFT and DeepSpeed wrappers."""
    named = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] == "score"]
    if not named:
        raise UserError("share_prompt: the reward model has no `score` head (a *ForSequenceClassification model "
                        "of a causal LM); set share_prompt: false")
    return min(named, key=lambda item: len(item[0]))[1]  # the outermost: PEFT's ModulesToSaveWrapper if any


def attention_implementation(model: nn.Module) -> str:
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return getattr(inner.config, "_attn_implementation", None) or "sdpa"


def check_attention_implementation(model: nn.Module) -> None:
    """transformers passes a 4-D mask as it is to sdpa and eager attention; flash and flex kernels take none."""
    implementation = attention_implementation(model)
    if implementation not in ("sdpa", "eager"):
        raise UserError(f"share_prompt needs attn_implementation sdpa or eager (it passes a 4-D attention mask); "
                        f"the reward model uses {implementation}: set share_prompt: false or another "
                        f"attn_implementation")


def shared_prompt_rewards(model: nn.Module, batch: dict,
                          head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of a merged batch, read from the head's per-token output.

    The head (found with `score_head` unless given) is hooked rather than called directly, so the
    forward still goes through the wrapped model (DDP's gradient sync, PEFT's adapters).
    """
    mask = batch["attention_mask"]
    if attention_implementation(model) == "eager":  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    captured = []
    head = head if head is not None else score_head(model)
    hook = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False)
    finally:
        hook.remove()
    per_token = captured[-1].squeeze(-1)  # (batch, length)
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, batch["chosen_end"]], per_token[rows, batch["rejected_end"]]


def pairwise_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None) -> torch.Tensor:
    """RewardTrainer's loss: -log sigmoid(r_chosen - r_rejected [- margin]) [+ c * mean((r_c + r_r)^2)]."""
    difference = rewards_chosen - rewards_rejected - (margin if margin is not None else 0.0)
    loss = -nn.functional.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss
