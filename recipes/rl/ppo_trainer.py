"""PPO for chat models with a learned reward: the RLHF loop of InstructGPT, in TRL's shape.

TRL 1.16 no longer ships a PPO trainer, so this module is ours: a `PPOConfig` (TrainingArguments plus
the PPO knobs) and a `PPOTrainer` (a transformers `Trainer` whose `train()` is the PPO loop). Four
models take part: the policy (trained), a frozen reference (the SFT model, or the policy with its
LoRA adapter switched off), the reward model (frozen) and a critic (trained, initialised from the
reward model). One update:

1. rollout: the policy samples a reply to each prompt of the batch (KV cache, temperature/top-p,
   stop at end of turn);
2. scoring: the reward model scores prompt + reply; policy, reference and critic score each reply token;
3. reward shaping: r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)) on every reply token, plus the
   reward-model score on the last one (r = r_theta - lambda * KL, per token);
4. advantages by GAE (gamma, lambda), whitened over the batch; value targets = advantages + values;
5. `num_ppo_epochs` passes over the rollout in `num_mini_batches` minibatches, each one optimizer
   step: clipped policy loss + vf_coef * clipped value loss. During the first `critic_warmup_updates`
   updates the policy loss is weighted 0, so only the critic learns (its values fit the returns first).

The pure functions below (GAE, reward shaping, the two losses, the KL controllers) are what the
tests pin to hand computations.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import GenerationConfig, Trainer, TrainingArguments

from data_prep.artifacts import UserError
from recipes.common import check_settings, check_training_numbers
from recipes.rl.kl import position_ids_of


@dataclass
class PPOConfig(TrainingArguments):
    """Batch sizes: a micro batch is `per_device_train_batch_size` sequences; `gradient_accumulation_steps`
    micro batches make a minibatch (one optimizer step); `num_mini_batches` minibatches make the rollout
    batch of one update, on each process."""

    total_episodes: int | None = field(default=None, metadata={
        "help": "Prompts to roll out in all (default: num_train_epochs passes over the prompt set); a positive "
                "max_steps overrides both and sets the number of PPO updates."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={
        "help": "Sequences per forward pass while generating and scoring rollouts."})
    response_length: int = field(default=32, metadata={"help": "Most new tokens per reply."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts."})
    missing_eos_penalty: float | None = field(default=1.0, metadata={
        "help": "Subtracted from the score of a reply that never ends its turn (None: no penalty)."})
    kl_coef: float = field(default=0.05, metadata={"help": "lambda in r = r_theta - lambda * KL (initial value if adaptive)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef toward target_kl (Ziegler et al. 2019)."})
    target_kl: float = field(default=3.0, metadata={"help": "Target KL per sequence (nats) of the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Episodes over which the adaptive controller reacts."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten shaped rewards before GAE."})
    critic_warmup_updates: int = field(default=0, metadata={
        "help": "Updates at the start that train the critic alone (policy loss weighted 0): a critic initialised "
                "from the reward model does not yet predict the returns, and its errors would be the advantages."})
    critic_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the critic (default: learning_rate). The critic must fit the returns before its "
                "per-token values can assign credit, and at the policy's small step it fits them slowly."})
    clip_critic_separately: bool = field(default=False, metadata={
        "help": "Clip the policy's and the critic's gradients to max_grad_norm each, rather than jointly: the "
                "critic's gradient is often several times the policy's, and a joint clip then shrinks the policy's "
                "step by the critic's error. Not under DeepSpeed or FSDP, which clip their one engine jointly."})
    value_head_init: str = field(default="reward_model", metadata={
        "help": "The critic's scalar head: `reward_model` keeps the reward model's, `zero` starts it at 0 (the "
                "backbone stays the reward model's), so first advantages are the returns' own spread, not the "
                "reward model's scale.", "choices": ["reward_model", "zero"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the Hub (off: safer)."})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "Weights of the reward functions in the score (default: all 1)."})

    def __post_init__(self):
        check_training_numbers(self, epochs_matter=self.total_episodes is None)
        check_settings(self, at_least_1=("num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size",
                                         "response_length", "total_episodes", "kl_horizon"),
                       positive=("temperature", "top_p", "target_kl"),
                       non_negative=("kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
                                     "critic_warmup_updates", "critic_learning_rate"),
                       at_most_1=("top_p", "gamma", "lam"))
        weights = {"reward_weights": self.reward_weights or [], "missing_eos_penalty": [self.missing_eos_penalty]}
        for key, values in weights.items():  # NaN or inf passes the per-function finite check, then poisons the score
            if any(value is not None and not math.isfinite(value) for value in values):
                raise UserError(f"{key} must be finite, got {getattr(self, key)}")
        eval_strategy = getattr(self.eval_strategy, "value", self.eval_strategy)
        if eval_strategy != "no":  # the PPO loop has no periodic evaluation; never ignore the setting silently
            raise UserError(f"eval_strategy: PPO evaluates the held-out prompts before and after training only; "
                            f"set it to \"no\" (got \"{eval_strategy}\")")
        if getattr(self.save_strategy, "value", self.save_strategy) == "best":
            raise UserError("save_strategy: \"best\" needs a periodic evaluation, which PPO has not; use \"steps\" "
                            "or \"epoch\"")
        super().__post_init__()


# ---------------------------------------------------------------------------- pure pieces

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (log pi - log pi_ref), plus the sequence score on each row's last
    valid token. Returns (rewards, per-token KL); both are zero where mask is 0."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over reply tokens, right-padded by mask.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}; the value after
    the last valid token is 0 (the episode ends there). Returns (advantages, returns = A + V)."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO-clip: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def clipped_value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within cliprange_value of the rollout's V.
    Returns (loss, share of tokens where the clipped term was the larger)."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass


class AdaptiveKLController:
    """Proportional control of kl_coef toward a target KL per sequence (Ziegler et al. 2019): the
    relative error is clipped to +-20% and applied in proportion to n_episodes / horizon."""

    def __init__(self, kl_coef: float, target_kl: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target_kl, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon


def first_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the first True per row, or the row length when there is none."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, length)).min(dim=1).values


# ---------------------------------------------------------------------------- models

class PolicyAndValueWrapper(nn.Module):
    """Policy and critic as one module, so that one optimizer (and one DeepSpeed engine) trains both."""

    def __init__(self, policy, value_model):
        super().__init__()
        if not hasattr(value_model, "score"):
            raise UserError(f"value model {type(value_model).__name__} has no `score` head "
                            "(expected an AutoModelForSequenceClassification)")
        self.policy = policy
        self.value_model = value_model
        self.config = policy.config

    @property
    def critic_backbone(self):
        return getattr(self.value_model, self.value_model.base_model_prefix)

    # Activation checkpointing covers both networks. TRL's unwrap_model_for_generation turns it off around
    # generate() and back on through the older names, without the settings: those are kept here.
    _checkpointing: dict | None = None

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.policy.is_activation_checkpointing

    is_gradient_checkpointing = is_activation_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        self._checkpointing = {"activation_checkpointing_kwargs": activation_checkpointing_kwargs,
                               "every_n_layers": every_n_layers, "offload": offload}
        for network in (self.policy, self.value_model):
            network.activation_checkpointing_enable(**self._checkpointing)

    def activation_checkpointing_disable(self):
        for network in (self.policy, self.value_model):
            network.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.activation_checkpointing_enable(**(self._checkpointing or {}))

    gradient_checkpointing_disable = activation_checkpointing_disable

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        """(policy logits, critic values) at the positions that predict the last `response_length` tokens.

        Only those positions go through the LM head: over a 4k+ vocabulary it is most of the compute."""
        hidden = self.critic_backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state[:, -response_length - 1:-1]
        values = self.value_model.score(hidden).squeeze(-1)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, logits_to_keep=response_length + 1).logits[:, :-1]
        return logits, values


def _reply_logprobs(reply_logits: torch.Tensor, responses: torch.Tensor, temperature: float):
    """Log-probabilities of reply tokens under temperature-scaled logits (from the positions before them),
    and those logits."""
    from trl.trainer.utils import selective_log_softmax

    reply_logits = reply_logits / temperature
    return selective_log_softmax(reply_logits, responses), reply_logits


def _reference_logits(model, input_ids, attention_mask, position_ids, response_length: int):
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=response_length + 1).logits[:, :-1].float()


def _without_shared_tensors(state_dict: dict) -> dict:
    """The state dict with each storage once (tied embeddings share one): safetensors stores no aliases."""
    seen, kept = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept


# ---------------------------------------------------------------------------- trainer

PPO_STATE_NAME = "ppo_state.json"  # in checkpoint-N: the update, KL coefficient and what the prompt order needs

def _zero_parameters(params) -> None:
    """Set parameters to 0, also when ZeRO-3 holds them partitioned across processes."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    params = list(params)
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        gathered = contextlib.nullcontext()
    with gathered, torch.no_grad():
        for param in params:
            param.zero_()


class PPOTrainer(Trainer):
    """`train_dataset` rows carry `prompt` (a list of chat messages) and any extra columns the reward
    functions read (e.g. `task`, `answer`). `reward_funcs` follow TRL's GRPO signature,
    f(prompts, completions, **columns) -> list[float | None] (None counts 0); the score of a reply is
    their weighted sum. The reward model enters as one of them (recipes.rl.rewards.RewardModelScorer)."""

    def __init__(self, args: PPOConfig, processing_class, model, ref_model, value_model, reward_funcs: list[Callable],
                 train_dataset, callbacks=None):
        self.reward_funcs = list(reward_funcs)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if not self.reward_funcs or len(weights) != len(self.reward_funcs):
            raise UserError(f"reward_weights: {len(weights)} weights for {len(self.reward_funcs)} reward functions")
        self.reward_weights = weights
        if "prompt" not in train_dataset.column_names:
            raise UserError(f"PPO prompts need a 'prompt' column (have {', '.join(train_dataset.column_names)})")
        self.uses_adapter = ref_model is None
        if self.uses_adapter and not hasattr(model, "disable_adapter"):
            raise UserError("PPO: ref_model may be left out only for a PEFT policy (its reference is the "
                            "policy with the adapter disabled)")
        wrapper = PolicyAndValueWrapper(model, value_model)  # checks that the critic has a `score` head
        if args.value_head_init == "zero":
            _zero_parameters(value_model.score.parameters())
        super().__init__(model=wrapper, args=args, processing_class=processing_class, train_dataset=train_dataset,
                         callbacks=callbacks)
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False).to(self.accelerator.device)
        for func in self.reward_funcs:
            if hasattr(func, "to"):  # a reward model: next to the policy
                func.to(self.accelerator.device)
        self.kl_controller = (AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.adaptive_kl
                              else FixedKLController(args.kl_coef))

        from recipes.eval.generation import stop_token_ids

        self.stop_ids = stop_token_ids(processing_class)
        self.world_size = self.accelerator.num_processes
        self.iteration_times: list[dict] = []  # seconds per update: generate, score, train
        self.mini_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.rollout_batch_size = self.mini_batch_size * args.num_mini_batches  # per process
        episodes = args.total_episodes or int(args.num_train_epochs * len(train_dataset))
        self.num_updates = (args.max_steps if args.max_steps > 0 else  # a Trainer step is one PPO update here
                            max(1, math.ceil(episodes / (self.rollout_batch_size * self.world_size))))
        if len(train_dataset) < self.rollout_batch_size * self.world_size:
            raise UserError(f"PPO: {len(train_dataset)} prompts is fewer than one rollout batch "
                            f"({self.rollout_batch_size} x {self.world_size} processes)")
        # full rollout batches of the smallest process share: what one pass of _prompt_batches yields
        self.updates_per_epoch = max(1, len(train_dataset) // self.world_size // self.rollout_batch_size)
        self._data_seed = args.seed if args.data_seed is None else args.data_seed  # Trainer's rule

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the critic's parameters in groups of their own at
        `critic_learning_rate` (the schedule scales both learning rates by the same factor)."""
        if self.args.critic_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        critic = {id(p) for p in getattr(opt_model, "module", opt_model).value_model.parameters()}
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for in_critic in (False, True):
            for decayed in (True, False):
                params = [p for n, p in opt_model.named_parameters()
                          if p.requires_grad and (id(p) in critic) == in_critic and (n in decay) == decayed]
                group = {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0}
                if in_critic:
                    group["lr"] = self.args.critic_learning_rate
                if params:
                    groups.append(group)
        optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs
                                           else self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ data
    def _prompt_batches(self, skip: int = 0):
        """Endless shuffled batches of this process's share of the prompts, as (token batch, rows); the first
        `skip` batches (those a resumed run has already rolled out) are passed over untouched."""
        shard = self.train_dataset.shard(num_shards=self.world_size, index=self.accelerator.process_index)
        tokenizer = self.processing_class
        generator = torch.Generator().manual_seed(self._data_seed)
        while True:
            order = torch.randperm(len(shard), generator=generator).tolist()
            for start in range(0, len(order) - self.rollout_batch_size + 1, self.rollout_batch_size):
                if skip:
                    skip -= 1
                    continue
                rows = [shard[i] for i in order[start:start + self.rollout_batch_size]]
                # a plain-text prompt is the policy's input as it stands, as in TRL's trainers
                texts = [r["prompt"] if isinstance(r["prompt"], str) else
                         tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                         for r in rows]
                saved_side, tokenizer.padding_side = tokenizer.padding_side, "left"
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                tokenizer.padding_side = saved_side
                yield batch.to(self.accelerator.device), rows

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _rollout(self, batch, rows) -> dict:
        """Sample one reply per prompt, then score it: policy and reference log-probs, values, rewards.
        The seconds spent in each half go to `self.iteration_times` (see recipes/rl/benchmark.py)."""
        from trl.models.utils import unwrap_model_for_generation

        args, tokenizer = self.args, self.processing_class
        started = time.perf_counter()
        context_length = batch["input_ids"].shape[1]
        generation_config = GenerationConfig(
            max_new_tokens=args.response_length, do_sample=True, temperature=args.temperature, top_p=args.top_p,
            top_k=0, eos_token_id=self.stop_ids, pad_token_id=tokenizer.pad_token_id)
        chunk = args.local_rollout_forward_batch_size
        responses = []
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            unwrapped.eval()
            for start in range(0, len(rows), chunk):
                # Under ZeRO-3 the context above has gathered the whole policy on every process, so each one
                # generates on its own (no per-token sync) and replies may end at different steps.
                out = unwrapped.policy.generate(input_ids=batch["input_ids"][start:start + chunk],
                                                attention_mask=batch["attention_mask"][start:start + chunk],
                                                generation_config=generation_config, synced_gpus=False)
                reply = out[:, context_length:]
                pad = torch.full((len(reply), args.response_length - reply.shape[1]), tokenizer.pad_token_id,
                                 dtype=reply.dtype, device=reply.device)
                responses.append(torch.cat([reply, pad], dim=1))
            responses = torch.cat(responses)
            # Everything after the first end-of-turn token is padding; the stop token itself is kept.
            is_stop = torch.isin(responses, torch.tensor(self.stop_ids, device=responses.device))
            stop_at = first_true_index(is_stop)
            positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
            mask = (positions <= stop_at.unsqueeze(1)).float()
            responses = torch.where(mask.bool(), responses, tokenizer.pad_token_id)
            ended = stop_at < responses.shape[1]
            # Columns where every reply has ended carry no tokens: drop them (replies are mostly short).
            response_length = int(mask.sum(dim=1).max().item())
            responses, mask = responses[:, :response_length], mask[:, :response_length]

            generated = time.perf_counter()
            sequences = torch.cat([batch["input_ids"], responses], dim=1)
            attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
            logprobs, ref_logprobs, values = [], [], []
            for start in range(0, len(rows), chunk):
                part = slice(start, start + chunk)
                ids, att = sequences[part], attention[part]
                pos = position_ids_of(att)
                logits, value = unwrapped(ids, att, pos, response_length)
                logprobs.append(_reply_logprobs(logits, responses[part], args.temperature)[0])
                values.append(value)
                # The wrapper's forward runs under the mixed-precision autocast that accelerate gave it, and its
                # outputs come back in float32; the reference must match both, or bf16/fp16 rounding alone would
                # show up as KL.
                with self.accelerator.autocast():
                    if self.uses_adapter:
                        with unwrapped.policy.disable_adapter():
                            ref_logits = _reference_logits(unwrapped.policy, ids, att, pos, response_length)
                    else:
                        ref_logits = _reference_logits(self.ref_model, ids, att, pos, response_length)
                ref_logprobs.append(_reply_logprobs(ref_logits, responses[part], args.temperature)[0])
            unwrapped.train()

        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        prompts = [r["prompt"] for r in rows]
        completions = [text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
                       for prompt, text in zip(prompts, texts)]  # TRL's shapes: plain text or messages
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        scores = torch.zeros(len(rows), device=responses.device)
        per_func = {}
        for weight, func in zip(self.reward_weights, self.reward_funcs):
            name = getattr(func, "__name__", type(func).__name__)
            values_ = func(prompts=prompts, completions=completions, trainer_state=self.state, **columns)
            values_ = torch.tensor([0.0 if v is None else float(v) for v in values_], device=scores.device)
            if not torch.isfinite(values_).all():
                item = int((~torch.isfinite(values_)).nonzero()[0])
                raise UserError(f"reward function {name}: non-finite reward {values_[item].item()} in update "
                                f"{self.state.global_step + 1}, batch item {item} (reply {texts[item][:60]!r})")
            per_func[name] = values_
            scores = scores + weight * values_
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~ended).float()
        self.iteration_times.append({"generate": generated - started, "score": time.perf_counter() - generated})
        return {"sequences": sequences, "attention": attention, "responses": responses, "mask": mask,
                "logprobs": torch.cat(logprobs), "ref_logprobs": torch.cat(ref_logprobs),
                "values": torch.cat(values), "scores": scores, "per_func": per_func, "ended": ended.float(),
                "texts": texts}

    # ------------------------------------------------------------------ train
    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """The PPO loop. With `resume_from_checkpoint` (a `checkpoint-N` directory that this trainer saved) it
        goes on from update N+1 with the policy, critic, optimizer, schedule, KL coefficient, random state and
        prompt order of that moment, so it ends where the uninterrupted run would have."""
        args = self.args
        checkpoint = resume_from_checkpoint
        if checkpoint:
            ppo_state = self._read_checkpoint(checkpoint)
            if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # those engines load it in _prepare_for_training
                self._load_policy_and_critic(checkpoint)
        if args.activation_checkpointing:  # Trainer.train() would switch it on; this loop replaces that train()
            settings = dict(args.activation_checkpointing_kwargs or {})
            every_n_layers, offload = settings.pop("every_n_layers", 1), settings.pop("offload", False)
            self.model.activation_checkpointing_enable(settings or None, every_n_layers, offload)
        self.state.max_steps = self.num_updates
        self.state.logging_steps = args.logging_steps
        model, _ = self._prepare_for_training(self.num_updates, None, checkpoint or None)
        self.model_wrapped = model
        done = 0
        if checkpoint:
            done = self._restore_loop_state(checkpoint, ppo_state)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        batches = self._prompt_batches(skip=done)
        save_every = self._every(args.save_strategy, args.save_steps)
        log_every = self._every(args.logging_strategy, args.logging_steps)
        started = time.time()
        for update in range(done + 1, self.num_updates + 1):
            batch, rows = next(batches)
            rollout = self._rollout(batch, rows)
            mask = rollout["mask"]
            with torch.no_grad():
                rewards, kl = kl_shaped_rewards(rollout["scores"], rollout["logprobs"], rollout["ref_logprobs"],
                                                mask, self.kl_controller.value)
                if args.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False)
                advantages, returns = compute_gae(rewards, rollout["values"], mask, args.gamma, args.lam)
                advantages = masked_whiten(advantages, mask)
            optimize_started = time.perf_counter()
            stats = self._ppo_epochs(model, rollout, advantages, returns,
                                     train_policy=update > args.critic_warmup_updates)
            timing = self.iteration_times[-1]
            timing["train"] = time.perf_counter() - optimize_started

            kl_per_sequence = kl.sum(dim=1)
            kl_coef = self.kl_controller.value  # the coefficient this update's rewards were shaped with
            self.kl_controller.update(self._mean(kl_per_sequence), self.rollout_batch_size * self.world_size)
            self.state.global_step = update
            self.state.epoch = update * self.rollout_batch_size * self.world_size / len(self.train_dataset)
            self.lr_scheduler.step()
            if log_every and (update % log_every == 0 or update in (1, self.num_updates)):
                non_score = -kl_coef * kl_per_sequence
                per_func = {f"rewards/{name}/mean": self._mean(v) for name, v in rollout["per_func"].items()}
                self.log({
                    "reward": per_func.get("rewards/reward_model/mean", self._mean(rollout["scores"])), **per_func,
                    "score": self._mean(rollout["scores"]),
                    "kl": self._mean(kl_per_sequence), "objective/rlhf_reward": self._mean(rollout["scores"] + non_score),
                    "objective/non_score_reward": self._mean(non_score),
                    "entropy": stats["entropy"], "loss/policy": stats["loss/policy"], "loss/value": stats["loss/value"],
                    "clipfrac": stats["clipfrac"], "clipfrac/value": stats["clipfrac/value"],
                    "approxkl": stats["approxkl"], "ratio": stats["ratio"],
                    **{key: value for key, value in stats.items() if key.startswith("grad_norm/")},
                    "response_length": self._mean(mask.sum(dim=1)), "eos_rate": self._mean(rollout["ended"]),
                    "kl_coef": kl_coef, "learning_rate": self.lr_scheduler.get_last_lr()[0],
                    "episode": update * self.rollout_batch_size * self.world_size,
                    **{f"time/{phase}_s": round(seconds, 3) for phase, seconds in timing.items()},
                    "elapsed_s": round(time.time() - started, 1)})
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if save_every and update % save_every == 0:
                self._save_ppo_checkpoint(model)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return self.state

    # ------------------------------------------------------------------ checkpoints
    def _every(self, strategy, steps: float) -> int | None:
        """Updates between two logs or checkpoints, as Trainer reads `logging_strategy`/`save_strategy`: "steps"
        every `steps` updates (below 1: that share of the run), "epoch" once per pass over the prompts, "no"
        never."""
        strategy = getattr(strategy, "value", strategy)
        if strategy == "epoch":
            return self.updates_per_epoch
        if strategy != "steps":
            return None
        return max(1, math.ceil(self.num_updates * steps) if steps < 1 else int(steps))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """No push per checkpoint: it holds policy and critic in one file, not a model that loads from the Hub.
        With push_to_hub the recipe uploads the finished policy once, at the end (recipes.common.publish)."""

    def _save_ppo_checkpoint(self, model) -> None:
        """`checkpoint-N`: the Trainer's checkpoint (weights of policy and critic, optimizer, schedule, random
        states, trainer_state.json, rotation by save_total_limit) plus ppo_state.json, written last: a directory
        without it is an interrupted save and is refused on resume."""
        self._save_checkpoint(model, trial=None)
        if self.args.should_save:
            folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            state = {"update": self.state.global_step, "kl_coef": self.kl_controller.value,
                     "rollouts_per_update": self.rollout_batch_size * self.world_size,
                     "prompts": len(self.train_dataset), "seed": self.args.seed, "data_seed": self.args.data_seed}
            with open(os.path.join(folder, PPO_STATE_NAME + ".tmp"), "w") as f:
                json.dump(state, f, indent=2)
            os.replace(os.path.join(folder, PPO_STATE_NAME + ".tmp"), os.path.join(folder, PPO_STATE_NAME))
        self.accelerator.wait_for_everyone()

    def _read_checkpoint(self, checkpoint: str) -> dict:
        path = os.path.join(checkpoint, PPO_STATE_NAME)
        if not os.path.isfile(path):
            raise UserError(f"resume_from_checkpoint: {checkpoint} has no {PPO_STATE_NAME} (not a PPO checkpoint, "
                            "or its save was interrupted)")
        try:
            state = json.loads(open(path, encoding="utf-8").read())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON (line {error.lineno})") from None
        # The prompt order is replayed from the seed: it must be the same order, in the same batches.
        now = {"rollouts_per_update": self.rollout_batch_size * self.world_size, "prompts": len(self.train_dataset),
               "seed": self.args.seed, "data_seed": self.args.data_seed}
        for key, value in now.items():
            if state.get(key) != value:
                raise UserError(f"{path}: {key} was {state.get(key)} in the checkpointed run and is {value} now; "
                                "resume with the same prompts, seed, batch sizes and number of processes")
        return state

    def _load_policy_and_critic(self, checkpoint: str) -> None:
        from safetensors.torch import load_file

        path = os.path.join(checkpoint, "model.safetensors")
        if not os.path.isfile(path):
            raise UserError(f"resume_from_checkpoint: {path} not found")
        saved = load_file(path)
        expected = set(_without_shared_tensors(self.model.state_dict()))
        if set(saved) != expected:
            different = sorted(set(saved) ^ expected)
            raise UserError(f"{path}: does not hold this policy and critic ({len(different)} parameter names "
                            f"differ, e.g. {different[0]})")
        self.model.load_state_dict(saved, strict=False)  # tied weights (saved once) follow their twin

    def _restore_loop_state(self, checkpoint: str, ppo_state: dict) -> int:
        from transformers import TrainerState

        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self.state.max_steps = self.num_updates
        self.state.logging_steps = self.args.logging_steps
        self.kl_controller.value = ppo_state["kl_coef"]
        self._load_rng_state(checkpoint)
        return int(ppo_state["update"])

    def _ppo_epochs(self, model, rollout: dict, advantages: torch.Tensor, returns: torch.Tensor,
                    train_policy: bool = True) -> dict:
        args = self.args
        mask = rollout["mask"]
        sums: dict[str, float] = {}
        count = steps = 0
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(self.rollout_batch_size)
            for mini_start in range(0, self.rollout_batch_size, self.mini_batch_size):
                mini = order[mini_start:mini_start + self.mini_batch_size]
                micro_batches = mini.split(args.per_device_train_batch_size)
                for i, micro in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    self.accelerator.gradient_state._set_sync_gradients(last)
                    ids, att = rollout["sequences"][micro], rollout["attention"][micro]
                    reply_logits, new_values = model(ids, att, position_ids_of(att), mask.shape[1])
                    new_logprobs, reply_logits = _reply_logprobs(reply_logits, rollout["responses"][micro],
                                                                 args.temperature)
                    m = mask[micro]
                    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, rollout["logprobs"][micro],
                                                            advantages[micro], m, args.cliprange)
                    vf_loss, vf_clipfrac = clipped_value_loss(new_values, rollout["values"][micro], returns[micro],
                                                              m, args.cliprange_value)
                    # Critic warm-up multiplies the policy loss by 0 rather than freezing weights: DDP and ZeRO
                    # expect a gradient for every parameter they wrapped. Adam moves nothing on zero gradients
                    # from a fresh state (only a nonzero weight_decay would shrink the policy a little).
                    policy_weight = 1.0 if train_policy else 0.0
                    loss = (policy_weight * pg_loss + args.vf_coef * vf_loss) / len(micro_batches)
                    backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
                    self.accelerator.backward(loss, **backward_kwargs)
                    if last:
                        self._clip_gradients(model, sums)
                        steps += 1
                        self.optimizer.step()
                        model.zero_grad()
                    with torch.no_grad():
                        from trl.trainer.utils import entropy_from_logits

                        step_stats = {"loss/policy": pg_loss, "loss/value": vf_loss, "clipfrac/value": vf_clipfrac,
                                      "entropy": masked_mean(entropy_from_logits(reply_logits), m), **pg_stats}
                    for key, value in step_stats.items():
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
                    count += 1
        return {key: self._mean(torch.tensor(total / (steps if key.startswith("grad_norm/") else count),
                                             device=self.accelerator.device))
                for key, total in sums.items()}

    def _clip_gradients(self, model, sums: dict) -> None:
        """Clip at max_grad_norm (per part with clip_critic_separately, else jointly) and add each part's
        norm before clipping to `sums`."""
        args = self.args
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # one engine whose gradients are partitioned (ZeRO) or sharded (FSDP): joint clipping, no part norms
            if max_norm:
                self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
            return
        self.accelerator.unscale_gradients()  # fp16: norms of the true gradients
        parts = {"policy": [p for p in self.model.policy.parameters() if p.grad is not None],
                 "critic": [p for p in self.model.value_model.parameters() if p.grad is not None]}
        norms = {}
        for part, params in parts.items():
            norms[part] = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            sums[f"grad_norm/{part}"] = sums.get(f"grad_norm/{part}", 0.0) + float(norms[part])
            if max_norm and args.clip_critic_separately and params:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[part])
        if max_norm and not args.clip_critic_separately:
            joint = torch.linalg.vector_norm(torch.stack([norms["policy"].float(), norms["critic"].float()]))
            torch.nn.utils.clip_grads_with_norm_(parts["policy"] + parts["critic"], max_norm, joint)

    def _mean(self, values: torch.Tensor) -> float:
        """Mean over every process's values."""
        values = values.detach().float().reshape(-1).to(self.accelerator.device)
        return self.accelerator.gather(values).mean().item()

    # ------------------------------------------------------------------ save
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy alone (a PEFT policy saves its adapter); inside a checkpoint (`_internal_call`), the
        policy and critic together, to resume from. Every process must call this: under ZeRO-3 the full weights
        are gathered here."""
        output_dir = output_dir or self.args.output_dir
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if self.accelerator.is_main_process and _internal_call:
            from safetensors.torch import save_file

            os.makedirs(output_dir, exist_ok=True)
            tensors = {k: v.contiguous() for k, v in _without_shared_tensors(state_dict).items()}
            save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        elif self.accelerator.is_main_process:
            policy = self.accelerator.unwrap_model(self.model_wrapped).policy
            prefix = "policy."
            policy_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            policy.save_pretrained(output_dir, state_dict=policy_state, safe_serialization=True)
            self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
