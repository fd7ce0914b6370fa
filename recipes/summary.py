"""Print where every stage's output went and its key figures, read from the stage manifests.

    python -m recipes.summary outputs

Each stage directory under the root holds a `manifest.json` (see data_prep/artifacts.py); a
directory without one is reported as unfinished.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.artifacts import MANIFEST_NAME, UserError, read_manifest, run_cli

# Headline metrics of an eval output, in this order, where present.
EVAL_HEADLINES = (("perplexity_perplexity", "perplexity {:.1f}"), ("exact_match_exact_match", "exact match {:.1%}"),
                  ("bleu_rouge_bleu", "BLEU {:.1f}"), ("lm_eval_arithmetic_units_mc_acc", "arithmetic_units_mc {:.3f}"),
                  ("reward_accuracy_accuracy", "reward accuracy {:.1%}"), ("win_rate_win_rate", "win rate {:.2f}"),
                  ("safety_refusal_rate", "refusal {:.2f}"))


def _eval_figures(outputs: dict) -> str:
    return ", ".join(text.format(outputs[key]) for key, text in EVAL_HEADLINES if key in outputs)


KEY_FIGURES = {
    "corpus": lambda o: (f"train {o['train']['documents']} docs / {o['train']['bytes'] / 1e6:.2f} MB, "
                         f"validation {o['validation']['documents']} docs / {o['validation']['bytes'] / 1e6:.2f} MB"),
    "tokenizer": lambda o: f"vocab {o['vocab_size']}, {o['bytes_per_token_validation']:.2f} bytes/token (validation)",
    "packed": lambda o: (f"{o['train']['tokens']:,} train / {o['validation']['tokens']:,} validation tokens "
                         f"in blocks of {o['block_size']}"),
    "pretrain": lambda o: (f"validation loss {o['init_eval_loss']:.3f} -> {o['eval_loss']:.3f} "
                           f"({o['eval_loss_ratio']:.0%} of init), perplexity {o['eval_perplexity']:.1f}, "
                           f"{o['steps']} steps, {o['tokens_per_second']:.0f} tokens/s, MFU {o['mfu']:.2f}"
                           if o.get("init_eval_loss") else f"validation loss {o['eval_loss']:.3f}, {o['steps']} steps"),
    "sft_data": lambda o: ", ".join(f"{split} {o[split]['rows']}" for split in o if isinstance(o[split], dict)
                                    and "rows" in o[split]) + " conversations",
    "preference_data": lambda o: f"{o['train']['pairs']} train / {o['test']['pairs']} test pairs",
    "sft": lambda o: (f"held-out exact match {o['exact_match_before']:.1%} -> {o['exact_match_after']:.1%}, "
                      if "exact_match_after" in o else "") + (
                      f"{o['trainable_params']:,} of {o['total_params']:,} parameters trained, {o['steps']} steps, "
                      f"{o.get('wall_time_s', 0):.0f} s"),
    "reward": lambda o: (f"held-out pairwise accuracy {o['pairwise_before_accuracy']:.1%} -> "
                         f"{o['pairwise_after_accuracy']:.1%}, " if "pairwise_after_accuracy" in o else "") + (
                         f"{o['steps']} steps, {o.get('wall_time_s', 0):.0f} s"),
    **{stage: (lambda o: (f"held-out reward {o['before_mean_reward']:.3f} -> {o['after_mean_reward']:.3f}, exact match "
                          f"{o['before_exact_match']:.1%} -> {o['after_exact_match']:.1%}, KL "
                          f"{o['after_kl_per_sequence']:.2f} nats/sequence, " if "after_exact_match" in o else "")
               + f"{o.get('wall_time_s', 0):.0f} s")
       for stage in ("ppo", "grpo", "rloo", "dpo")},
    "mc_benchmark": lambda o: ", ".join(f"{task} {o[task]['questions']} questions" for task in sorted(o)),
    "eval": _eval_figures,
    "report": lambda o: f"{o['model_rows']} checkpoints in the metric table, {len(o['figures'])} figures, report.html",
}



def summarize(root: str | Path) -> list[tuple[str, str, str]]:
    rows = []
    for directory in sorted(p for p in Path(root).iterdir()
                            if p.is_dir() and not p.name.startswith(".") and p.name != "notebooks"):
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            rows.append(("?", str(directory), "unfinished (no manifest.json)"))
            continue
        try:
            manifest = read_manifest(directory)
        except UserError as err:  # one damaged manifest is listed as such, the other stages still are
            rows.append(("?", str(directory), str(err)))
            continue
        stage = manifest.get("stage")
        describe = KEY_FIGURES.get(stage, lambda o: "")
        try:
            figures = describe(manifest.get("outputs"))
        except (KeyError, TypeError, AttributeError):  # a manifest from an older version of the stage: still listed
            figures = ""
        rows.append((stage if isinstance(stage, str) else "?", str(directory), figures))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "outputs")
    if not root.is_dir():
        raise UserError(f"no outputs directory at {root}")
    rows = summarize(root)
    width = max(len(r[1]) for r in rows) if rows else 0
    for stage, directory, figures in rows:
        print(f"{stage:<15} {directory:<{width}}  {figures}")


if __name__ == "__main__":
    run_cli(main)
