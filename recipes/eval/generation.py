"""Batched chat generation and exact-match scoring, shared by the SFT, RL and eval recipes.

Prompts are rendered with the tokenizer's chat template (generation prompt added), sorted by
length, left-padded and decoded greedily with the KV cache under `torch.inference_mode`.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

from data_prep.artifacts import UserError


@contextlib.contextmanager
def scoring(model, tokenizer, padding_side: str):
    """Eval mode, no autograd and the given padding side, all restored afterwards."""
    import torch

    saved_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = padding_side
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn and end-of-text ids: chat replies end at `<|end|>`; a base model may emit eos."""
    markers = [tokenizer.convert_tokens_to_ids(token) for token in ("<|end|>", "<|end_of_text|>")]
    # a marker the vocabulary lacks comes back as the unknown id; eos itself stays even where it is also unk (GPT-2)
    ids = {i for i in markers if i is not None and i != tokenizer.unk_token_id} | {tokenizer.eos_token_id} - {None}
    if not ids:  # generation would never stop before max_new_tokens, and PPO would penalise every reply
        raise UserError(f"{tokenizer.name_or_path}: the tokenizer has no eos token and no <|end|> marker to stop at")
    return sorted(ids)


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32,
                     batch_size: int = 64, **generate_kwargs) -> list[str]:
    """One assistant reply per conversation (its messages so far), in input order."""
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    generate_kwargs = {"do_sample": False, **generate_kwargs}
    with scoring(model, tokenizer, "left"):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            # The model here is whole on this process: with ZeRO-3 configured, transformers would otherwise
            # sync every decoding step with ranks that are not generating, and wait for them forever.
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=False, **generate_kwargs)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                replies[i] = text.strip()
    return replies


def exact_match_report(rows: list[dict], predictions: list[str], n_samples: int = 8) -> dict:
    """Accuracy overall and per task family, with a few samples; rows carry `task` and `answer`."""
    from data_prep.chat_tasks import check_answer

    if len(rows) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} references")
    hits: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for row, prediction in zip(rows, predictions):
        ok = check_answer(row["task"], prediction, row["answer"])
        hits[row["task"]].append(ok)
        if len(samples) < n_samples:
            samples.append({"prompt": row["messages"][-2]["content"], "answer": row["answer"],
                            "prediction": prediction, "correct": ok})
    every = [ok for oks in hits.values() for ok in oks]
    return {"exact_match": sum(every) / max(len(every), 1), "n": len(every),
            "by_task": {task: round(sum(oks) / len(oks), 4) for task, oks in sorted(hits.items())},
            "samples": samples}


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Chance that at least one of k replies drawn without replacement from n samples (`correct` of
    them right) is right: 1 - C(n - c, k) / C(n, k), the unbiased estimator of Chen et al. (2021)."""
    if not 0 < k <= n or not 0 <= correct <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= correct <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def pass_at_k_report(rows: list[dict], sampled: list[list[str]], ks: list[int]) -> dict:
    """pass@k for each k, overall and per task family, from n sampled replies per row (`sampled[i]`);
    `mean_sample_accuracy` is the share of single samples that are right."""
    from data_prep.chat_tasks import check_answer

    if len(rows) != len(sampled):
        raise ValueError(f"samples for {len(sampled)} rows, {len(rows)} references")
    per_task: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row, replies in zip(rows, sampled):
        per_task[row["task"]].append((len(replies), sum(check_answer(row["task"], r, row["answer"]) for r in replies)))

    def figures(counts):
        out = {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
        return {**out, "mean_sample_accuracy": sum(c / n for n, c in counts) / len(counts)}

    every = [nc for counts in per_task.values() for nc in counts]
    return {**figures(every), "n": len(every), "samples_per_prompt": every[0][0] if every else 0,
            "by_task": {task: {k: round(v, 4) for k, v in figures(counts).items()}
                        for task, counts in sorted(per_task.items())}}


def evaluate_exact_match(model, tokenizer, dataset, max_new_tokens: int = 32, batch_size: int = 64,
                         max_samples: int | None = None) -> dict:
    """Greedy replies to every held-out conversation (all turns but the last), scored by exact match."""
    rows = list(dataset) if max_samples is None else [dataset[i] for i in range(min(max_samples, len(dataset)))]
    predictions = generate_replies(model, tokenizer, [r["messages"][:-1] for r in rows], max_new_tokens, batch_size)
    return exact_match_report(rows, predictions)
