"""Build a local multiple-choice benchmark for lm-evaluation-harness from the embedded default.

    python -m data_prep.build_mc_benchmark --output_dir outputs/mc_benchmark

Output (`output_dir`): for each task a JSONL file of questions and an lm-eval task YAML (local
`json` data files, `output_type: multiple_choice`, metrics acc and acc_norm), plus `manifest.json`.
Point lm-eval at the folder with `--include_path` (or `TaskManager(include_path=...)`), as
recipes/eval/eval.py does. The data file paths inside the YAMLs are absolute: rebuild after
moving the folder.

The embedded default writes two tasks of 4 choices each in about 1 second:

    stdlib_docstring_mc   181 questions: "Which Python function does this docstring describe?" for
                          every public function of data_prep.chat_tasks.DOCSTRING_MODULES whose
                          docstring opens with one short sentence; the 3 wrong names come from the
                          same module where it has enough functions (math.floor vs math.ceil).
    arithmetic_units_mc   227 questions: the 155 single-digit sums and differences and the 72 unit
                          conversions of the chat tasks, with near-miss numeric distractors
                          (off by one or two, a wrong factor, not converted).

Both draw on what the tiny model was trained on: the docstrings are in the pretraining corpus
(the standard library), and the arithmetic and unit facts are the tables of the SFT tasks (40 of
the docstring functions are SFT facts too). They measure recall of that material as a ranking of
continuations, which is what lm-eval's multiple-choice tasks do for mmlu or arc_easy.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.artifacts import (UserError, atomic_output_dir, build_manifest, claim_output_dir, fingerprint,
                                 parse_config, run_cli, write_manifest)
from data_prep.chat_tasks import CONVERSIONS, DOCSTRING_MODULES, _unit, docstring_pool

TASKS = ("stdlib_docstring_mc", "arithmetic_units_mc")


@dataclass
class MCBenchmarkArguments:
    output_dir: str = field(default="outputs/mc_benchmark", metadata={"help": "Where the JSONL files and task YAMLs go."})
    docstring_modules: list[str] = field(default_factory=lambda: list(DOCSTRING_MODULES),
                                         metadata={"help": "Stdlib modules whose functions are asked about."})
    max_docstring_functions: int | None = field(default=None, metadata={"help": "Cap on docstring questions (None = all)."})
    num_choices: int = field(default=4, metadata={"help": "Choices per question, the correct one included."})
    seed: int = field(default=42)
    overwrite: bool = field(default=True)


# ----------------------------------------------------------------------------- questions
def docstring_questions(pool: list[tuple[str, str]], num_choices: int, rng: random.Random) -> list[dict]:
    """One question per function: its first docstring sentence, the right name and wrong names."""
    by_module = defaultdict(list)
    for name, _ in pool:
        by_module[name.rsplit(".", 1)[0]].append(name)
    sentence_of = dict(pool)
    rows = []
    for name, sentence in pool:
        module = name.rsplit(".", 1)[0]
        # wrong names whose docstring differs; same module first, so the prefix gives nothing away
        same = [n for n in by_module[module] if n != name and sentence_of[n] != sentence]
        other = [n for n, _ in pool if not n.startswith(module + ".") and sentence_of[n] != sentence]
        if len(same) + len(other) < num_choices - 1:
            raise UserError(f"docstring_modules: {name} has {len(same) + len(other)} other functions with a different "
                            f"docstring sentence, too few for {num_choices} choices; add modules or lower num_choices")
        wrong = rng.sample(same, min(num_choices - 1, len(same)))
        wrong += rng.sample(other, num_choices - 1 - len(wrong))
        query = f'Which Python function does this docstring describe?\n"{sentence}"\nAnswer:'
        rows.append(_question(f"docstring:{name}", "docstring", query, name, wrong, rng))
    return rows


def arithmetic_units_questions(num_choices: int, rng: random.Random) -> list[dict]:
    """Every single-digit sum and difference (result >= 0) and every unit conversion of 1-9."""
    rows = []
    for op in "+-":
        for a in range(10):
            for b in range(10):
                if op == "-" and b > a:
                    continue
                result = a + b if op == "+" else a - b
                near = [v for v in (result - 2, result - 1, result + 1, result + 2, result + 3, result + 10) if v >= 0]
                wrong = [str(v) for v in rng.sample(near, num_choices - 1)]
                rows.append(_question(f"arithmetic:{a}{op}{b}", "arithmetic", f"Question: What is {a} {op} {b}?\nAnswer:",
                                      str(result), wrong, rng))
    for src, dst, factor in CONVERSIONS:
        def amount(k: int, dst=dst) -> str:
            return f"{k} {_unit(dst, k)}"

        for n in range(1, 10):
            near = [amount((n + 1) * factor), amount(n * factor * 10), amount(n)]  # off by one, wrong factor, unconverted
            if n > 1:
                near.append(amount((n - 1) * factor))
            wrong = rng.sample([w for w in near if w != amount(n * factor)], num_choices - 1)
            rows.append(_question(f"units:{n}{src[0]}>{dst[0]}", "units",
                                  f"Question: Convert {n} {_unit(src, n)} to {dst[1]}.\nAnswer:", amount(n * factor),
                                  wrong, rng))
    return rows


def _question(key: str, family: str, query: str, answer: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [answer, *wrong]
    if len(set(choices)) != len(choices):
        raise UserError(f"{key}: duplicate choices {choices}")
    rng.shuffle(choices)
    return {"id": key, "family": family, "query": query, "choices": choices, "gold": choices.index(answer)}


# ----------------------------------------------------------------------------- lm-eval task files
def task_yaml(task: str, data_file: Path) -> str:
    """An lm-eval task: local JSONL as the test split, zero-shot, log-likelihood of each choice."""
    return "\n".join([
        "# lm-evaluation-harness task written by data_prep/build_mc_benchmark.py; rebuild it after moving this folder.",
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{query}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def build_mc_benchmark(args: MCBenchmarkArguments) -> dict:
    """Write the JSONL files, task YAMLs and manifest; returns the manifest."""
    claim_output_dir(args.output_dir, "mc_benchmark")
    if args.num_choices < 2:
        raise UserError(f"num_choices must be at least 2, got {args.num_choices}")
    if args.num_choices > 4:
        raise UserError(f"num_choices must be at most 4 (the arithmetic questions have 3 near misses), got {args.num_choices}")
    for module in args.docstring_modules:  # docstring_pool imports each one; a typo would stop it with a traceback
        try:
            importlib.import_module(module)
        except (ImportError, ValueError, TypeError) as err:  # ValueError: '', TypeError: a relative name
            raise UserError(f"docstring_modules: cannot import module {module!r} ({err})") from None
    pool = docstring_pool(args.max_docstring_functions, tuple(args.docstring_modules))
    if len(pool) < args.num_choices:
        raise UserError(f"only {len(pool)} docstring functions found in {', '.join(args.docstring_modules)}; "
                        f"need at least num_choices={args.num_choices}")
    questions = {"stdlib_docstring_mc": docstring_questions(pool, args.num_choices, random.Random(f"{args.seed}:docstring")),
                 "arithmetic_units_mc": arithmetic_units_questions(args.num_choices, random.Random(f"{args.seed}:arith"))}
    final_dir = Path(args.output_dir).resolve()
    inputs = {"source": "embedded", "python": sys.version.split()[0], "docstring_pool": fingerprint(pool)}
    options = {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite")}
    outputs = {task: {"questions": len(rows), "choices": args.num_choices,
                      "families": dict(Counter(r["family"] for r in rows)), "hash": fingerprint(rows)}
               for task, rows in questions.items()}
    manifest = build_manifest("mc_benchmark", inputs, options, outputs)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        for task, rows in questions.items():
            (tmp / f"{task}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            (tmp / f"{task}.yaml").write_text(task_yaml(task, final_dir / f"{task}.jsonl"))
        write_manifest(tmp, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config([MCBenchmarkArguments], argv)
    manifest = build_mc_benchmark(args)
    tasks = ", ".join(f"{task} {stats['questions']}" for task, stats in manifest["outputs"].items())
    print(f"mc_benchmark -> {args.output_dir}: {tasks} questions, {args.num_choices} choices each")
    return manifest


if __name__ == "__main__":
    run_cli(main)
