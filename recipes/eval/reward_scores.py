"""Reward-model scores for whole conversations: pairwise accuracy on preference pairs and win rates.

A conversation is rendered with the chat template exactly as TRL's RewardTrainer renders it
(prompt messages followed by the response), right-padded, and scored under `torch.inference_mode`;
the sequence-classification head reads the last non-pad token.
"""

from __future__ import annotations


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32) -> list[float]:
    from recipes.eval.generation import scoring

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    scores: list[float] = [0.0] * len(texts)
    with scoring(model, tokenizer, "right"):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            for i, value in zip(batch, model(**enc).logits[:, 0].float().tolist()):
                scores[i] = value
    return scores


def pairwise_accuracy(model, tokenizer, dataset, batch_size: int = 32) -> dict:
    """Share of (prompt, chosen, rejected) rows whose chosen answer scores higher, and the mean margin."""
    rows = list(dataset)
    if not rows:
        raise ValueError("pairwise_accuracy: the preference split is empty")
    chosen = score_conversations(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], batch_size)
    rejected = score_conversations(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "mean_margin": sum(margins) / len(margins),
            "n": len(margins)}


def win_rate(model, tokenizer, prompts: list[list[dict]], replies_a: list[str], replies_b: list[str],
             batch_size: int = 32) -> dict:
    """How often the reward model prefers reply A to reply B for the same prompt (ties count half)."""
    if not (len(prompts) == len(replies_a) == len(replies_b)):
        raise ValueError(f"win_rate: {len(prompts)} prompts, {len(replies_a)} and {len(replies_b)} replies")
    a = score_conversations(model, tokenizer, [p + [{"role": "assistant", "content": r}]
                                               for p, r in zip(prompts, replies_a)], batch_size)
    b = score_conversations(model, tokenizer, [p + [{"role": "assistant", "content": r}]
                                               for p, r in zip(prompts, replies_b)], batch_size)
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return {"win_rate": wins / max(len(a), 1), "mean_score_a": sum(a) / max(len(a), 1),
            "mean_score_b": sum(b) / max(len(b), 1), "n": len(a)}
