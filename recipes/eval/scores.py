"""What the eval recipe computes on held-out data: perplexity and bits per byte with a sliding window, BLEU and
ROUGE through our local `evaluate` modules, and refusal counts for the safety rows.

These take a loaded model and rows, so tests and notebooks can call them without the recipe.
"""

from __future__ import annotations

import math
from pathlib import Path

from data_prep.artifacts import UserError

METRIC_DIR = Path(__file__).resolve().parent / "metrics"  # metrics/bleu/bleu.py and metrics/rouge/rouge.py


def sliding_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(window, index of its first scored token): every token but the first is scored exactly once.

    The first window scores all its tokens with all the context there is; each later window moves
    `stride` tokens on, is `max_length` long and scores only its new tokens, so each of them sees
    at least max_length - stride tokens before it (max_length - 1 with stride 1, the most possible).
    """
    end = min(max_length, len(ids))
    windows = [(ids[:end], 1)] if end > 1 else []
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        windows.append((ids[new_end - max_length:new_end], max_length - (new_end - end)))
        end = new_end
    return windows


def perplexity(model, tokenizer, texts, max_length: int | None, stride: int | None, batch_size: int) -> dict:
    """exp(mean NLL per token) and bits per byte = total NLL / ln 2 / UTF-8 bytes, batched windows."""
    import torch
    import torch.nn.functional as F

    from recipes.eval.generation import scoring

    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    max_length = max_length or context
    stride = stride or max(1, max_length // 2)
    if not 2 <= max_length <= context:
        raise UserError(f"max_length must be in [2, {context}] (the model's context), got {max_length}")
    if not 1 <= stride < max_length:
        raise UserError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    # every text starts from BOS (EOS for tokenizers without one), as pretraining packed documents
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows, n_bytes = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows += sliding_windows(([start] if start is not None else []) + ids, max_length, stride)
        n_bytes += len(text.encode("utf-8"))
    windows.sort(key=lambda w: -len(w[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked and unlabelled anyway
    total_nll, n_tokens = 0.0, 0
    with scoring(model, tokenizer, "right"):
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            width = len(batch[0][0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (window, first) in enumerate(batch):
                ids[row, :len(window)] = torch.tensor(window)
                labels[row, first:len(window)] = ids[row, first:len(window)]
            mask = (torch.arange(width)[None, :] < torch.tensor([len(w) for w, _ in batch])[:, None]).long()
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            targets = labels[:, 1:].to(model.device)
            total_nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                         reduction="sum").item()
            n_tokens += int((targets != -100).sum())
    if n_tokens == 0:
        raise UserError("perplexity: the eval texts hold no tokens to score")
    return {"perplexity": math.exp(total_nll / n_tokens), "bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1),
            "nll_per_token": total_nll / n_tokens, "tokens": n_tokens, "bytes": n_bytes, "texts": len(texts),
            "max_length": max_length, "stride": stride}


def bleu_rouge(predictions: list[str], references: list[str], tokenize: str = "13a", use_stemmer: bool = True) -> dict:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE F1 (rouge-score, 0-1) through our local evaluate modules."""
    import evaluate

    if len(predictions) != len(references):
        raise UserError(f"bleu_rouge: {len(predictions)} predictions but {len(references)} references")
    bleu = evaluate.load(str(METRIC_DIR / "bleu")).compute(predictions=predictions, references=references,
                                                           tokenize=tokenize)
    rouge = evaluate.load(str(METRIC_DIR / "rouge")).compute(predictions=predictions, references=references,
                                                             use_stemmer=use_stemmer)
    samples = [{"prediction": p, "reference": r} for p, r in zip(predictions[:5], references[:5])]
    return {"bleu": bleu["bleu"], **rouge, "n": len(predictions), "bleu_signature": bleu["signature"], "samples": samples}


def safety_report(rows, replies: list[str]) -> dict:
    """Refusals of harmful requests (wanted) and of benign look-alikes (over-refusal), by `safety_label`."""
    from data_prep.chat_tasks import is_refusal

    if len(rows) != len(replies):
        raise UserError(f"safety: {len(replies)} replies for {len(rows)} rows")
    counts = {label: [0, 0] for label in ("harmful", "benign")}  # [rows, refusals]
    for row, reply in zip(rows, replies):
        if row.get("safety_label") in counts:
            counts[row["safety_label"]][0] += 1
            counts[row["safety_label"]][1] += is_refusal(reply)
    if not counts["harmful"][0] and not counts["benign"][0]:
        raise UserError("safety: the chat split has no rows with safety_label harmful or benign")
    (n_harmful, refused_harmful), (n_benign, refused_benign) = counts["harmful"], counts["benign"]
    return {"refusal_rate": refused_harmful / n_harmful if n_harmful else None,
            "over_refusal_rate": refused_benign / n_benign if n_benign else None,
            "n_harmful": n_harmful, "n_benign": n_benign, "refused_harmful": refused_harmful,
            "refused_benign": refused_benign}
