"""One held-out evaluation for every RL method, run before and after training on the same prompts.

Greedy replies to the held-out prompts are scored three ways: the reward model's mean score, exact
match per task family (data_prep.chat_tasks.check_answer), and the KL to the reference per sequence
on replies sampled at temperature 1 (recipes.rl.kl.kl_report). Before training the policy is the
reference, so its KL is 0 by construction and is not measured.
"""

from __future__ import annotations


def evaluate_policy(policy, tokenizer, prompts_dataset, scorer, reference=None, measure_kl: bool = True,
                    max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0) -> dict:
    """{"mean_reward", "exact_match", "by_task", "kl_per_sequence", ..., "samples"} on `prompts_dataset`
    (rows with `prompt` messages, `task` and `answer`, as recipes.rl.prompts builds them)."""
    from recipes.eval.generation import exact_match_report, generate_replies
    from recipes.rl.kl import kl_report

    rows = list(prompts_dataset)
    if not rows:
        raise ValueError("evaluate_policy: no held-out prompts")
    prompts = [r["prompt"] for r in rows]
    replies = generate_replies(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = scorer.score(prompts, replies)
    checkable = [(r, reply) for r, reply in zip(rows, replies) if r.get("answer") is not None and r["task"] != "chat"]
    report = exact_match_report([{"messages": r["prompt"] + [{"role": "assistant", "content": r["answer"]}],
                                  "task": r["task"], "answer": r["answer"]} for r, _ in checkable],
                                [reply for _, reply in checkable])
    out = {"mean_reward": sum(scores) / len(scores), "exact_match": report["exact_match"], "by_task": report["by_task"],
           "mean_reply_words": sum(len(r.split()) for r in replies) / len(replies), "n": len(rows)}
    if measure_kl:
        out.update(kl_report(policy, tokenizer, prompts, reference=reference, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, seed=seed))
    out["samples"] = [{"prompt": r["prompt"][-1]["content"], "answer": r.get("answer"), "reply": reply,
                       "reward": round(score, 3)} for r, reply, score in list(zip(rows, replies, scores))[:8]]
    return out
