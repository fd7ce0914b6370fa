"""Reward functions for RL, in the shape of TRL's `reward_funcs`, shared by GRPO, RLOO and PPO.

A reward function is called as `f(prompts=..., completions=..., **dataset_columns)` and returns one
float per completion. `prompts` are lists of messages (conversational) or strings; `completions`
are `[{"role": "assistant", "content": text}]` lists (conversational) or strings, decoded without
special tokens, so `<|end|>` is already gone.

    RewardModelScorer(path)   the trained reward model (recipes/reward output): the conversation
                              prompt + reply is rendered with the reward model's own chat template,
                              exactly as TRL's RewardTrainer rendered its training pairs, and read by
                              the scalar head (recipes.eval.reward_scores.score_conversations).
                              The reply is always re-tokenized by the reward model's tokenizer, on
                              purpose, so a reward model with another vocabulary than the policy's
                              scores the same text the policy wrote. With `clip=c` the training reward
                              (`scorer(prompts=..., completions=...)`) is clipped to [-c, c];
                              `scorer.score(...)`, which the held-out evaluation uses, stays raw.
    correctness_reward        1.0 / 0.0 by data_prep.chat_tasks.check_answer on the row's `task` and
                              `answer` columns (exact match; for a harmful safety prompt any refusal
                              counts). Rows without a checkable answer get None, which TRL skips.
"""

from __future__ import annotations

import math

from data_prep.artifacts import UserError


def completion_text(completion) -> str:
    """The reply text of one completion: a string, or the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role") == "assistant")


def _where(kwargs: dict) -> str:
    state = kwargs.get("trainer_state")
    return f" at step {state.global_step}" if state is not None else ""


class RewardModelScorer:
    """A trained scalar reward model as a TRL reward function, and as a plain scorer for PPO.

    `scorer(prompts=..., completions=...)` -> list of floats (TRL's reward_funcs), clipped to [-clip, clip]
    when `clip` is set; `scorer.score(prompt_messages, replies)` -> the raw scores for a list of message
    lists and reply strings. A non-finite score stops the run with one line naming the step and the batch item.
    """

    def __init__(self, model_path: str, batch_size: int = 32, trust_remote_code: bool = False, device=None,
                 clip: float | None = None):
        from transformers import AutoModelForSequenceClassification

        from recipes.common import load_pretrained, refuse_untrained_score_head

        self.path = str(model_path)
        self.model, self.tokenizer, self.manifest = load_pretrained(
            self.path, AutoModelForSequenceClassification, trust_remote_code=trust_remote_code, num_labels=1)
        refuse_untrained_score_head("reward_model_path", self.path, self.model, self.manifest)
        if getattr(self.model.config, "num_labels", 1) != 1:
            raise UserError(f"reward model {self.path}: has {self.model.config.num_labels} labels, expected 1 (a scalar head)")
        if not self.tokenizer.chat_template:
            raise UserError(f"reward model {self.path}: its tokenizer has no chat template to render conversations")
        self.model.requires_grad_(False)
        self.model.eval()
        self.batch_size = batch_size
        if clip is not None and not clip > 0:
            raise UserError(f"reward_model_clip must be positive (got {clip})")
        self.clip = clip
        self.__name__ = "reward_model"  # the column name in TRL's logs: rewards/reward_model/mean
        if device is not None:
            self.to(device)

    def to(self, device) -> "RewardModelScorer":
        self.model.to(device)
        return self

    def score_conversations(self, conversations: list[list[dict]]) -> list[float]:
        from recipes.eval.reward_scores import score_conversations

        return score_conversations(self.model, self.tokenizer, conversations, self.batch_size)

    def score(self, prompts: list, replies: list[str], **kwargs) -> list[float]:
        """Scores of reply i to prompt i; a prompt is a list of messages or a plain string."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts for {len(replies)} replies")
        if not prompts:
            return []
        if isinstance(prompts[0], str):  # plain text: prompt + reply, as TRL scores non-conversational data
            scores = self._score_texts([p + r for p, r in zip(prompts, replies)])
        else:
            scores = self.score_conversations([list(p) + [{"role": "assistant", "content": r}]
                                               for p, r in zip(prompts, replies)])
        for i, value in enumerate(scores):
            if not math.isfinite(value):
                raise UserError(f"reward model {self.path}: non-finite reward {value}{_where(kwargs)}, batch item {i} "
                                f"(reply {replies[i][:60]!r})")
        return scores

    def _score_texts(self, texts: list[str]) -> list[float]:
        from recipes.eval.generation import scoring

        out: list[float] = []
        with scoring(self.model, self.tokenizer, "right"):
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.model.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        scores = self.score(prompts, [completion_text(c) for c in completions], **kwargs)
        if self.clip is None:
            return scores
        return [min(max(value, -self.clip), self.clip) for value in scores]


def correctness_reward(prompts, completions, task=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the reply passes `check_answer(task, reply, answer)`, else 0.0; None where a row has no
    checkable answer (a Hub prompt set's `chat` rows), which TRL leaves out of the sum."""
    from data_prep.chat_tasks import check_answer

    n = len(completions)
    tasks = task if task is not None else [None] * n
    answers = answer if answer is not None else [None] * n
    rewards: list[float | None] = []
    for t, reply, ref in zip(tasks, completions, answers):
        if not t or ref is None or t == "chat":
            rewards.append(None)
        else:
            rewards.append(1.0 if check_answer(t, completion_text(reply), ref) else 0.0)
    return rewards


def check_reward_settings(reward_model_path: str | None, use_correctness: bool, reward_weights) -> None:
    """What `build_reward_funcs` checks that the settings alone decide, refused while parsing: the weights
    were checked only after the policy, critic and reward model had loaded."""
    count = bool(reward_model_path) + bool(use_correctness)
    if count == 0:
        raise UserError("no reward: set reward_model_path and/or correctness_reward: true")
    if reward_weights is not None and len(reward_weights) != count:
        names = ", ".join(name for name, on in (("reward_model", reward_model_path), ("correctness_reward",
                                                                                    use_correctness)) if on)
        raise UserError(f"reward_weights has {len(reward_weights)} value(s) for {count} reward function(s) ({names})")


def build_reward_funcs(reward_model_path: str, use_correctness: bool, reward_weights, columns: list[str],
                       trust_remote_code: bool = False, reward_model_clip: float | None = None) -> list:
    """The reward functions a recipe asks for, checked against the weights and the dataset's columns."""
    check_reward_settings(reward_model_path, use_correctness, reward_weights)
    if reward_model_clip is not None and not reward_model_path:
        raise UserError("reward_model_clip is set but there is no reward model to clip (reward_model_path is empty)")
    funcs: list = ([RewardModelScorer(reward_model_path, trust_remote_code=trust_remote_code, clip=reward_model_clip)]
                   if reward_model_path else [])
    if use_correctness:
        missing = [c for c in ("task", "answer") if c not in columns]
        if missing:
            raise UserError(f"correctness_reward needs the prompt columns task and answer; the prompts lack "
                            f"{', '.join(missing)}")
        funcs.append(correctness_reward)
    return funcs
