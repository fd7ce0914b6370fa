"""KL to the reference policy, per sequence, measured the same way for every RL method here.

    KL(x) = sum over response tokens t of  log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t),   y ~ pi(.|x)

is the Monte-Carlo (k1) estimate of KL(pi || pi_ref) for one sequence; its mean over prompts is an
unbiased estimate of the mean sequence KL. Responses are sampled from the policy at temperature 1
(the policy itself, not a sharpened one), and the stop token (`<|end|>`) counts as a response
token, since choosing to stop is part of the policy. (The same sum on greedy replies would not be
a KL estimate: it can be negative.)

The reference is a second model, or `None` for a PEFT policy: then the policy with its adapters
disabled is the reference, so no second copy is needed.
"""

from __future__ import annotations

import contextlib


def position_ids_of(attention_mask):
    """Positions that skip left padding, as `generate` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(model, input_ids, attention_mask):
    """log p(token_t | tokens_<t) for t = 1..T-1, shape (B, T-1)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_of(attention_mask), use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@contextlib.contextmanager
def _reference(policy, reference):
    if reference is not None:
        yield reference
    elif hasattr(policy, "disable_adapter"):
        with policy.disable_adapter():
            yield policy
    else:
        raise ValueError("reference is None but the policy has no adapter to disable")


def sequence_kl(policy, reference, input_ids, attention_mask, response_mask):
    """Per-sequence sum of log pi - log pi_ref over the tokens where response_mask is 1, shape (B,).

    input_ids/attention_mask: prompt + response (any padding); response_mask: 1 on response tokens.
    """
    import torch

    with torch.inference_mode():
        mask = response_mask[:, 1:].float()
        policy_lp = token_logprobs(policy, input_ids, attention_mask)
        with _reference(policy, reference) as ref:
            ref_lp = token_logprobs(ref, input_ids, attention_mask)
        return ((policy_lp - ref_lp) * mask).sum(-1)


def sample_responses(model, tokenizer, prompts: list, max_new_tokens: int, do_sample: bool = True,
                     temperature: float = 1.0, batch_size: int = 64, seed: int = 0):
    """Yield (input_ids, attention_mask, response_mask, batch indices) for generated replies to `prompts`.

    Prompts are message lists (rendered with the chat template and the generation prompt) or strings.
    The response runs to the first stop token (included); what follows it is masked out.
    """
    import torch

    from recipes.eval.generation import scoring, stop_token_ids

    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    stops = stop_token_ids(tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with scoring(model, tokenizer, "left"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if do_sample else {
                "do_sample": False}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stops,  # a whole model, one process
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=False, **kwargs)
            prompt_len = enc["input_ids"].shape[1]
            response = out[:, prompt_len:]
            is_stop = torch.isin(response, torch.tensor(stops, device=response.device))
            # 1 up to and including the first stop token
            after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
            response_mask = (~after_stop).long()
            attention = torch.cat([enc["attention_mask"], response_mask], dim=1)
            full_mask = torch.cat([torch.zeros_like(enc["attention_mask"]), response_mask], dim=1)
            yield out, attention, full_mask, batch


def kl_report(policy, tokenizer, prompts: list, reference=None, max_new_tokens: int = 48, batch_size: int = 64,
              seed: int = 0) -> dict:
    """Mean sequence KL to the reference on replies sampled from the policy at temperature 1 (one per prompt)."""
    kls, lengths = [], []
    for ids, attention, response_mask, _ in sample_responses(policy, tokenizer, prompts, max_new_tokens, True, 1.0,
                                                             batch_size, seed):
        kls += sequence_kl(policy, reference, ids, attention, response_mask).tolist()
        lengths += response_mask.sum(-1).tolist()
    n = max(len(kls), 1)
    return {"kl_per_sequence": sum(kls) / n, "kl_per_token": sum(kls) / max(sum(lengths), 1),
            "sampled_mean_length": sum(lengths) / n, "n": len(kls)}
