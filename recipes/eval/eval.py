"""Evaluate one checkpoint: perplexity and bits per byte, BLEU/ROUGE, exact match, lm-eval benchmarks,
reward-model accuracy, win rate against a second checkpoint, and safety refusals.

    # the tiny SFT model on the embedded held-out data, CPU (the local lm-eval task is built first)
    python -m data_prep.build_mc_benchmark --output_dir outputs/mc_benchmark
    python recipes/eval/eval.py --config recipes/eval/tiny.yaml

    # another checkpoint (an adapter directory works too) or other metrics: flags override the YAML
    python recipes/eval/eval.py --config recipes/eval/tiny.yaml --model_name_or_path outputs/pretrain_tiny \
        --metrics perplexity lm_eval --output_dir outputs/eval_pretrain_tiny

    # SmolLM2-360M after SFT, on one GPU, with standard lm-eval tasks from the Hub (online)
    python recipes/eval/eval.py --config recipes/eval/smollm2_360m_smoltalk.yaml

`metrics` picks any of perplexity, bleu_rouge, exact_match, pass_at_k, lm_eval, reward_accuracy,
win_rate and safety (recipes/eval/README.md defines each). Output (`output_dir`): `eval_results.json`
with the checkpoint, its lineage, the data fingerprints, every metric, library versions and wall
times, then `manifest.json`, written last.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data_prep.artifacts import (UserError, build_manifest, load_saved_dataset, parse_config, read_manifest, run_cli,
                                 write_manifest)
from recipes.common import (check_settings, claim_run_dir, load_pretrained, mark_incomplete, publish,
                            refuse_untrained_score_head)
from recipes.eval.scores import bleu_rouge, perplexity, safety_report

METRICS = ("perplexity", "bleu_rouge", "exact_match", "pass_at_k", "lm_eval", "reward_accuracy", "win_rate", "safety")
CHAT_METRICS = ("bleu_rouge", "exact_match", "win_rate", "safety")  # scored on greedy replies to the chat split


@dataclass
class EvalArguments:
    model_name_or_path: str = field(default="outputs/sft_tiny", metadata={"help": "Checkpoint, adapter dir or Hub id."})
    compare_model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint B for win_rate."})
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "Judge for reward_accuracy/win_rate."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    trust_remote_code: bool = field(default=False)
    metrics: list[str] = field(default_factory=lambda: ["perplexity", "exact_match"],
                               metadata={"help": f"Any of: {', '.join(METRICS)}."})
    # perplexity
    text_dataset_path: str = field(default="outputs/corpus", metadata={"help": "Held-out text (build_corpus output)."})
    text_split: str = field(default="validation")
    text_field: str = field(default="text")
    max_texts: int | None = field(default=None, metadata={"help": "Score only the first N texts."})
    max_length: int | None = field(default=None, metadata={"help": "Window length; None = the model's context."})
    stride: int | None = field(default=None, metadata={"help": "New tokens per window; None = max_length // 2."})
    perplexity_batch_size: int = field(default=8)
    # chat split: generation for bleu_rouge / exact_match / safety / win_rate
    chat_dataset_path: str = field(default="outputs/sft_data", metadata={"help": "build_sft_data output."})
    chat_split: str = field(default="test")
    max_samples: int | None = field(default=None, metadata={"help": "Use the first N conversations."})
    max_new_tokens: int = field(default=48)
    generation_batch_size: int = field(default=64)
    bleu_rouge_tasks: list[str] | None = field(default_factory=lambda: ["docstring"],
                                               metadata={"help": "Task families with prose answers; null = all."})
    bleu_tokenize: str = field(default="13a", metadata={"help": "sacrebleu tokenizer (zh for Chinese)."})
    rouge_use_stemmer: bool = field(default=True)
    win_rate_max_samples: int | None = field(default=None, metadata={"help": "Prompts judged for win_rate."})
    # pass_at_k: sampled replies to the chat split
    pass_at_k: list[int] = field(default_factory=lambda: [1, 4, 8], metadata={"help": "The k of pass@k."})
    pass_at_k_samples: int = field(default=8, metadata={"help": "Replies sampled per prompt (>= the largest k)."})
    pass_at_k_temperature: float = field(default=1.0)
    pass_at_k_top_p: float = field(default=1.0)
    seed: int = field(default=42, metadata={"help": "Seeds the sampling of pass_at_k."})
    # lm-evaluation-harness
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["stdlib_docstring_mc", "arithmetic_units_mc"])
    lm_eval_include_path: str | None = field(default="outputs/mc_benchmark", metadata={"help": "Local task YAMLs."})
    lm_eval_include_defaults: bool = field(default=False, metadata={"help": "Also index lm-eval's own tasks."})
    lm_eval_num_fewshot: int | None = field(default=None)
    lm_eval_limit: int | None = field(default=None, metadata={"help": "Questions per task (None = all)."})
    lm_eval_batch_size: int = field(default=32)
    lm_eval_apply_chat_template: bool = field(default=False)
    # reward model
    preference_dataset_path: str = field(default="outputs/preference_data")
    preference_split: str = field(default="test")
    reward_batch_size: int = field(default=32)
    output_dir: str = field(default="outputs/eval")

    def __post_init__(self):
        check_settings(self, at_least_1=("max_length", "stride", "max_new_tokens", "win_rate_max_samples",
                                         "pass_at_k_samples", "lm_eval_limit"))
        from sacrebleu.metrics import BLEU

        if self.bleu_tokenize not in BLEU.TOKENIZERS:  # sacrebleu's KeyError would come after the generation pass
            raise UserError(f"bleu_tokenize: unknown sacrebleu tokenizer '{self.bleu_tokenize}' (use one of "
                            f"{', '.join(BLEU.TOKENIZERS)})")


def main(args: EvalArguments) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from data_prep.chat_tasks import validate_messages, validate_preferences
    from recipes.eval import generation, reward_scores

    started = time.time()
    claim_run_dir(args.output_dir, "eval", {key: getattr(args, key) for key in (
        "model_name_or_path", "compare_model_name_or_path", "reward_model_name_or_path", "text_dataset_path",
        "chat_dataset_path", "preference_dataset_path", "lm_eval_include_path")})
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown or not args.metrics:
        raise UserError(f"metrics: unknown metric {', '.join(unknown) or '(none given)'} (choose from {', '.join(METRICS)})")
    wanted = [m for m in METRICS if m in args.metrics]
    if "win_rate" in wanted and not args.compare_model_name_or_path:
        raise UserError("win_rate needs compare_model_name_or_path (the checkpoint to compare against)")
    if {"win_rate", "reward_accuracy"} & set(wanted) and not args.reward_model_name_or_path:
        raise UserError("reward_accuracy and win_rate need reward_model_name_or_path (the judge)")
    if "pass_at_k" in wanted:
        if not args.pass_at_k or min(args.pass_at_k) < 1 or max(args.pass_at_k) > args.pass_at_k_samples:
            raise UserError(f"pass_at_k: every k must be in [1, pass_at_k_samples={args.pass_at_k_samples}], "
                            f"got {args.pass_at_k}")
        if not args.pass_at_k_temperature > 0 or not 0 < args.pass_at_k_top_p <= 1:
            raise UserError(f"pass_at_k_temperature must be > 0 and pass_at_k_top_p in (0, 1], got "
                            f"{args.pass_at_k_temperature} and {args.pass_at_k_top_p}")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got '{args.dtype}'")
    for key in ("perplexity_batch_size", "generation_batch_size", "lm_eval_batch_size", "reward_batch_size"):
        if getattr(args, key) < 1:  # checked before any model loads; 0 would fail deep in a range() or in lm-eval
            raise UserError(f"{key} must be >= 1, got {getattr(args, key)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"

    # ------------------------------------------------------------------ data
    data, splits = {}, {}
    if "perplexity" in wanted:
        data["text"], splits["text"] = load_split(args.text_dataset_path, args.text_split, args.max_texts)
        if args.text_field not in splits["text"].column_names:
            raise UserError(f"{args.text_dataset_path}[{args.text_split}]: no field '{args.text_field}'")
        for index, text in enumerate(splits["text"][args.text_field]):  # the tokenizer would fail after the load
            if not isinstance(text, str):
                raise UserError(f"{args.text_dataset_path}[{args.text_split}]: row {index}: field '{args.text_field}' "
                                f"is {'empty (null)' if text is None else 'not a string'}; perplexity reads text")
    if {*CHAT_METRICS, "pass_at_k"} & set(wanted):
        data["chat"], splits["chat"] = load_split(args.chat_dataset_path, args.chat_split, args.max_samples,
                                                  validate_messages)
    if "reward_accuracy" in wanted:
        data["preference"], splits["preference"] = load_split(args.preference_dataset_path, args.preference_split,
                                                              None, validate_preferences)
    if "lm_eval" in wanted and args.lm_eval_include_path:
        data["lm_eval"] = local_tasks(args.lm_eval_include_path)

    # ------------------------------------------------------------------ models
    model = tokenizer = None
    checkpoint = {}
    if set(wanted) - {"reward_accuracy"}:
        model, tokenizer, checkpoint = load_pretrained(args.model_name_or_path, AutoModelForCausalLM,
                                                       args.trust_remote_code, dtype=dtype)
        _require_chat_template("model_name_or_path", args.model_name_or_path, tokenizer,
                               set(wanted) & {*CHAT_METRICS, "pass_at_k"})
        model.to(device)
    judge = judge_tokenizer = None
    judge_manifest = {}
    if {"reward_accuracy", "win_rate"} & set(wanted):
        judge, judge_tokenizer, judge_manifest = load_pretrained(
            args.reward_model_name_or_path, AutoModelForSequenceClassification, args.trust_remote_code, num_labels=1,
            dtype=dtype)
        refuse_untrained_score_head("reward_model_name_or_path", args.reward_model_name_or_path, judge,
                                    judge_manifest)
        _require_chat_template("reward_model_name_or_path", args.reward_model_name_or_path, judge_tokenizer,
                               set(wanted) & {"reward_accuracy", "win_rate"})
        judge.to(device)
    evaluated = args.model_name_or_path
    if model is None:  # reward_accuracy alone: the checkpoint under evaluation is the judge
        evaluated, checkpoint = args.reward_model_name_or_path, judge_manifest

    # ------------------------------------------------------------------ metrics
    results, wall = {}, {}
    chat_rows = list(splits["chat"]) if "chat" in splits else []
    replies = None
    for metric in wanted:
        tick = time.time()
        if metric in CHAT_METRICS and replies is None:  # one greedy pass, shared by the chat metrics
            replies = generation.generate_replies(model, tokenizer, [r["messages"][:-1] for r in chat_rows],
                                                  args.max_new_tokens, args.generation_batch_size)
            wall["generation"] = round(time.time() - tick, 2)
            tick = time.time()
        if metric == "perplexity":
            results[metric] = perplexity(model, tokenizer, splits["text"][args.text_field], args.max_length,
                                         args.stride, args.perplexity_batch_size)
        elif metric == "bleu_rouge":
            keep = [i for i, r in enumerate(chat_rows) if not args.bleu_rouge_tasks or r["task"] in args.bleu_rouge_tasks]
            if not keep:
                raise UserError(f"bleu_rouge: no rows of task {', '.join(args.bleu_rouge_tasks)} in "
                                f"{args.chat_dataset_path}[{args.chat_split}]")
            results[metric] = bleu_rouge([replies[i] for i in keep], [chat_rows[i]["answer"] for i in keep],
                                         args.bleu_tokenize, args.rouge_use_stemmer)
        elif metric == "exact_match":
            results[metric] = generation.exact_match_report(chat_rows, replies)
        elif metric == "safety":
            results[metric] = safety_report(chat_rows, replies)
        elif metric == "pass_at_k":
            torch.manual_seed(args.seed)
            draws = [generation.generate_replies(model, tokenizer, [r["messages"][:-1] for r in chat_rows],
                                                 args.max_new_tokens, args.generation_batch_size, do_sample=True,
                                                 temperature=args.pass_at_k_temperature, top_p=args.pass_at_k_top_p)
                     for _ in range(args.pass_at_k_samples)]
            results[metric] = {**generation.pass_at_k_report(chat_rows, [list(d) for d in zip(*draws)],
                                                             sorted(set(args.pass_at_k))),
                               "temperature": args.pass_at_k_temperature, "top_p": args.pass_at_k_top_p}
        elif metric == "reward_accuracy":
            results[metric] = reward_scores.pairwise_accuracy(judge, judge_tokenizer, splits["preference"],
                                                              args.reward_batch_size)
        elif metric == "win_rate":
            n = len(chat_rows) if args.win_rate_max_samples is None else min(args.win_rate_max_samples, len(chat_rows))
            prompts = [r["messages"][:-1] for r in chat_rows[:n]]
            other, other_tokenizer, _ = load_pretrained(args.compare_model_name_or_path, AutoModelForCausalLM,
                                                        args.trust_remote_code, dtype=dtype)
            _require_chat_template("compare_model_name_or_path", args.compare_model_name_or_path, other_tokenizer,
                                   {"win_rate"})
            replies_b = generation.generate_replies(other.to(device), other_tokenizer, prompts, args.max_new_tokens,
                                                    args.generation_batch_size)
            del other
            results[metric] = {**reward_scores.win_rate(judge, judge_tokenizer, prompts, replies[:n], replies_b,
                                                        args.reward_batch_size),
                               "model_a": args.model_name_or_path, "model_b": args.compare_model_name_or_path}
        elif metric == "lm_eval":
            results[metric] = run_lm_eval(args, device)
        wall[metric] = round(time.time() - tick, 2)
        print(f"[eval] {metric}: {headline(metric, results[metric])} ({wall[metric]:.1f} s)", flush=True)
    wall["total"] = round(time.time() - started, 2)

    # ------------------------------------------------------------------ save
    out = {"checkpoint": evaluated, "stage": checkpoint.get("stage", "unknown"),
           "parent": checkpoint.get("inputs", {}).get("model"),
           "compare_checkpoint": args.compare_model_name_or_path if "win_rate" in wanted else None,
           "data": data, "metrics": results, "versions": library_versions(), "wall_time_s": wall}
    mark_incomplete(args.output_dir)
    staging = Path(args.output_dir) / ".eval-tmp"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "eval_results.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    inputs = {"model": evaluated, "model_fingerprint": checkpoint.get("fingerprint"),
              "reward_model": args.reward_model_name_or_path, "reward_model_fingerprint": judge_manifest.get("fingerprint"),
              "compare_model": out["compare_checkpoint"], "data": data}
    summary = {f"{m}_{k}": v for m, r in results.items() for k, v in flat_headline(m, r).items()}
    write_manifest(staging, build_manifest("eval", inputs, asdict(args), {**summary, "wall_time_s": wall["total"]}))
    publish(staging, args.output_dir)  # eval_results.json first, manifest.json last; each os.replace is atomic
    print(f"[eval] {evaluated} -> {args.output_dir}/eval_results.json in {wall['total']:.1f} s", flush=True)
    return out


def load_split(path: str, split: str, limit: int | None = None, validate=None):
    """(data entry for the results, rows) of a finished data_prep output; an empty split is an error."""
    manifest = read_manifest(path, "dataset")
    split_dir = Path(path) / split
    if not (split_dir / "state.json").is_file():
        names = sorted(p.name for p in Path(path).iterdir() if (p / "state.json").is_file())
        raise UserError(f"{path}: no split '{split}' (has {', '.join(names) or 'none'})")
    try:
        rows = load_saved_dataset(split_dir)
    except IndexError:  # datasets 5.2 cannot reload a split that was saved with no rows
        rows = []
    if limit is not None and len(rows):
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise UserError(f"{path}[{split}]: the eval split is empty")
    if validate is not None:
        validate(rows, f"{path}[{split}]")
    return {"path": path, "split": split, "hash": manifest.get("fingerprint"), "rows": len(rows)}, rows


def local_tasks(include_path: str) -> dict:
    """The data entry of a data_prep.build_mc_benchmark folder, whose task YAMLs must point at existing files."""
    import yaml

    build = f"python -m data_prep.build_mc_benchmark --output_dir {include_path}"
    if not Path(include_path).is_dir():
        raise UserError(f"lm_eval_include_path: {include_path} not found (build it with: {build})")
    manifest = read_manifest(include_path, "lm-eval task", stage="mc_benchmark")
    for task_file in sorted(Path(include_path).glob("*.yaml")):
        try:
            task = yaml.safe_load(task_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError):
            raise UserError(f"{task_file}: not a valid lm-eval task YAML (rebuild with: {build})") from None
        if not isinstance(task, dict):
            raise UserError(f"{task_file}: an lm-eval task YAML holds a mapping (rebuild with: {build})")
        files = (task.get("dataset_kwargs") or {}).get("data_files") or {}
        for file in ([files] if isinstance(files, str) else files.values()):
            if not Path(file).is_file():
                raise UserError(f"{task_file}: data file {file} not found (moved? rebuild with: {build})")
    return {"path": include_path, "split": "test", "hash": manifest.get("fingerprint")}


def run_lm_eval(args: EvalArguments, device: str) -> dict:
    """lm-evaluation-harness, HF backend on our checkpoint (base + peft= for an adapter), acc/acc_norm per task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.lm_eval_include_path, include_defaults=args.lm_eval_include_defaults)
    missing = [t for t in args.lm_eval_tasks if t not in manager.all_tasks]
    if missing:
        where = " and ".join(([args.lm_eval_include_path] if args.lm_eval_include_path else [])
                             + (["lm-eval's registry"] if args.lm_eval_include_defaults else [])) or "no task folder"
        hint = "" if args.lm_eval_include_defaults else " (lm_eval_include_defaults: true adds lm-eval's own tasks)"
        raise UserError(f"lm_eval_tasks: {', '.join(missing)} not found in {where}{hint}")
    path = Path(args.model_name_or_path)
    model_args = {"pretrained": args.model_name_or_path, "dtype": args.dtype, "device": device,
                  "trust_remote_code": args.trust_remote_code}
    if (path / "adapter_config.json").is_file():
        model_args["pretrained"] = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model_args["peft"] = str(path)
        if (path / "tokenizer_config.json").is_file():
            model_args["tokenizer"] = str(path)
    raw = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(args.lm_eval_tasks),
                                  num_fewshot=args.lm_eval_num_fewshot, batch_size=args.lm_eval_batch_size,
                                  limit=args.lm_eval_limit, task_manager=manager, log_samples=False,
                                  apply_chat_template=args.lm_eval_apply_chat_template, verbosity="ERROR")
    out = {}
    for task, values in raw["results"].items():
        scores = {key.split(",")[0]: value for key, value in values.items() if "," in key and value != "N/A"}
        out[task] = {**scores, "n": raw["n-samples"].get(task, {}).get("effective"), "version": raw["versions"].get(task)}
    return out


def headline(metric: str, result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in flat_headline(metric, result).items())


def flat_headline(metric: str, result: dict) -> dict:
    """The figures a summary line and the manifest show."""
    if metric == "lm_eval":
        return {f"{task}_{k}": v for task, r in result.items() for k, v in r.items() if k in ("acc", "acc_norm")}
    if metric == "pass_at_k":
        return {k: v for k, v in result.items() if k.startswith("pass@") or k in ("mean_sample_accuracy", "n")}
    keys = {"perplexity": ("perplexity", "bits_per_byte", "tokens"), "bleu_rouge": ("bleu", "rouge1", "rougeL", "n"),
            "exact_match": ("exact_match", "n"), "reward_accuracy": ("accuracy", "n"), "win_rate": ("win_rate", "n"),
            "safety": ("refusal_rate", "over_refusal_rate", "n_harmful", "n_benign")}[metric]
    return {k: result[k] for k in keys}


def library_versions() -> dict:
    versions = {}
    for name in ("transformers", "evaluate", "sacrebleu", "rouge_score", "lm_eval", "torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _require_chat_template(key: str, path: str, tokenizer, metrics: set) -> None:
    """These metrics render conversations with the tokenizer's chat template; without one transformers stops
    mid-run with a ValueError and a traceback."""
    if metrics and not tokenizer.chat_template:
        raise UserError(f"{key}: the tokenizer of {path} has no chat template, which {', '.join(sorted(metrics))} "
                        "need (evaluate a chat model, e.g. the SFT recipe's output)")


def parse_args(argv: list[str] | None = None):
    return parse_config([EvalArguments], argv)


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
