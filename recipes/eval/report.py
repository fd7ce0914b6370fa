"""Render one report from a directory of stage outputs: lineage, every metric across stages, and curves.

    python -m recipes.eval.report outputs --output_dir outputs/report

Input: the directory the recipes write their outputs into. Every subdirectory with a
`manifest.json` is a stage output (data_prep/artifacts.py); hidden ones, unfinished ones (no
manifest), `notebooks/` and earlier reports are skipped. Per stage output it reads:
- `manifest.json`: the stage, its inputs (paths and fingerprints), options and key figures;
- `metrics.json`: the recipe's own measurements, before/after pairs included;
- `trainer_state.json`, or else the newest `checkpoint-*/trainer_state.json`: its `log_history`;
- `eval_results.json` files written by recipes/eval/eval.py anywhere one or two levels down,
  each attached to the stage output whose directory is its `checkpoint`.

Output (`output_dir`, replaced atomically): `report.md` with its PNGs in `figures/`, `report.html`
(the same report as one self-contained file, figures inlined as base64), `report.json` (lineage
and the metric table as data) and `manifest.json`. The report holds:
- the lineage as a tree (parent = the input model, or for data and pretraining the main input
  data), with the other inputs each stage read and whether their fingerprints still match;
- one table of key metrics with a row per model stage in lineage order, and one of the data stages;
- per stage: inputs, config (the options recorded in the manifest), all numeric metrics, eval
  results, a loss curve and, where reward or KL keys are logged (PPO, GRPO, RLOO, DPO), RL curves.
Which curves exist is read from the logged keys, never from stage names.
"""

from __future__ import annotations

import base64
import heapq
import html
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.artifacts import (MANIFEST_NAME, UserError, atomic_output_dir, build_manifest, claim_output_dir,
                                 parse_config, run_cli, write_manifest)

EVAL_RESULTS = "eval_results.json"
SKIPPED_NAMES = ("notebooks", "report")
# Tie-break between stages that do not depend on each other: the order of the lifecycle.
STAGE_RANK = {name: rank for rank, names in enumerate([
    ("corpus",), ("tokenizer",), ("packed",), ("pretrain",), ("sft_data",), ("sft",), ("preference_data",),
    ("reward",), ("ppo", "grpo", "rloo", "dpo", "rl"), ("eval",), ("quantize", "quantized", "deploy", "export")])
    for name in names}
# Input keys naming the model a stage started from, in order of preference.
MODEL_KEYS = ("parent", "model", "model_name_or_path", "policy_model", "sft_model", "base_model", "checkpoint")
MODEL_FILES = ("config.json", "adapter_config.json", "metrics.json", "trainer_state.json")


@dataclass
class ReportArguments:
    root: str = field(default="outputs", metadata={"help": "Directory of stage outputs (also the first positional)."})
    output_dir: str = field(default="outputs/report")
    title: str = field(default="LLM lifecycle report")
    overwrite: bool = field(default=True)


@dataclass
class Stage:
    """One stage output (or a checkpoint known only from an eval result, `external`)."""

    name: str
    path: Path | None
    stage: str
    manifest: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    metrics_source: str | None = None
    log_history: list = field(default_factory=list)
    state_source: Path | None = None
    evals: list = field(default_factory=list)  # (eval_results.json, its content, the reward model that judged)
    judged: list = field(default_factory=list)  # (eval_results.json, reward_accuracy) where this was the judge
    stale_evals: list = field(default_factory=list)  # (eval_results.json, fingerprint, "evaluated"/"judged with")
    parent: str | None = None  # a stage name or, for an input outside the root (a Hub model), its id
    links: list = field(default_factory=list)  # (input key, stage name, freshness note, recorded value)
    is_model: bool = False
    external: bool = False

    @property
    def created(self) -> float:
        return self.manifest.get("created_unix") or 0


# ---------------------------------------------------------------------------------------- reading


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({str(err).splitlines()[0]})") from None


def _read_object(path: Path) -> dict:
    content = _read_json(path)
    if not isinstance(content, dict):
        raise UserError(f"{path}: not a JSON object (a {type(content).__name__})")
    return content


def _step_of(checkpoint: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", checkpoint.name)
    return int(match.group(1)) if match else -1


def _trainer_state(directory: Path) -> Path | None:
    """The final trainer_state.json, or that of the newest checkpoint-* for outputs made before recipes saved it."""
    if (directory / "trainer_state.json").is_file():
        return directory / "trainer_state.json"
    checkpoints = sorted((p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                         key=_step_of)
    return checkpoints[-1] / "trainer_state.json" if checkpoints else None


def _is_eval_output(directory: Path) -> bool:
    return (directory / EVAL_RESULTS).is_file() and not any((directory / f).is_file() for f in MODEL_FILES[:2])


def collect(root: Path, exclude: Path | None = None) -> tuple[dict[str, Stage], list, list[str]]:
    """(stages by directory name, eval results as (path, content), unfinished directory names)."""
    stages, unfinished = {}, []
    directories = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.name not in SKIPPED_NAMES and (exclude is None or p.resolve() != exclude))
    for directory in directories:
        if not (directory / MANIFEST_NAME).is_file():
            unfinished.append(directory.name)
            continue
        if _is_eval_output(directory):  # attached to the checkpoint it evaluated, below
            continue
        manifest = _read_json(directory / MANIFEST_NAME)
        if not isinstance(manifest, dict) or manifest.get("stage") in (None, "report"):
            continue
        stage = Stage(directory.name, directory, str(manifest["stage"]), manifest)
        if (directory / "metrics.json").is_file():
            stage.metrics, stage.metrics_source = _read_object(directory / "metrics.json"), "metrics.json"
        else:
            stage.metrics, stage.metrics_source = manifest.get("outputs") or {}, "manifest outputs"
        stage.state_source = _trainer_state(directory)
        if stage.state_source is not None:
            stage.log_history = _read_object(stage.state_source).get("log_history") or []
            if not isinstance(stage.log_history, list) or not all(isinstance(r, dict) for r in stage.log_history):
                raise UserError(f"{stage.state_source}: log_history is not a list of logged rows")
        stage.is_model = (any((directory / f).is_file() for f in MODEL_FILES) or stage.state_source is not None
                          or any(directory.glob("*.gguf")))
        stages[stage.name] = stage
    evals = []
    for path in sorted([*root.glob(f"*/{EVAL_RESULTS}"), *root.glob(f"*/*/{EVAL_RESULTS}")]):
        top = path.relative_to(root).parts[0]
        if top.startswith(".") or top in SKIPPED_NAMES or (exclude is not None and (root / top).resolve() == exclude):
            continue
        if not (path.parent / MANIFEST_NAME).is_file():  # the eval recipe writes its manifest last
            continue
        content = _read_json(path)
        if not isinstance(content, dict) or "checkpoint" not in content:
            raise UserError(f"{path}: not an eval result (no 'checkpoint' key)")
        evals.append((path, content))
    return stages, evals, unfinished


# ---------------------------------------------------------------------------------------- lineage


class Resolver:
    """Find which stage output a recorded path (or fingerprint) refers to."""

    def __init__(self, stages: dict[str, Stage], root: Path):
        self.root = root
        self.by_path = {s.path.resolve(): s.name for s in stages.values() if s.path is not None}
        self.by_name = {s.name for s in stages.values() if s.path is not None}
        self.by_fingerprint = {s.manifest.get("fingerprint"): s.name for s in stages.values() if s.manifest}

    def path(self, value) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        recorded = Path(value)
        candidates = [recorded] if recorded.is_absolute() else [Path.cwd() / recorded, self.root.parent / recorded,
                                                                 self.root / recorded]
        for candidate in candidates:
            try:
                resolved = candidate.resolve()
            except (OSError, ValueError):
                continue
            if resolved in self.by_path:
                return self.by_path[resolved]
        # made from another working directory or machine: the same directory name under this root
        if "/" in value.rstrip("/") and recorded.name in self.by_name:
            return recorded.name
        return None


def _fingerprint_key(key: str) -> str:
    return re.sub(r"(_name_or_path|_path|_dir)$", "", key) + "_fingerprint"


def link(stages: dict[str, Stage], root: Path) -> None:
    """Set every stage's parent and the stage outputs it read, with a freshness note per input."""
    resolve = Resolver(stages, root)
    for stage in stages.values():
        if stage.external:
            continue
        inputs = stage.manifest.get("inputs") or {}
        found = [(key, value, resolve.path(value), inputs.get(_fingerprint_key(key)))
                 for key, value in sorted(inputs.items())]
        # no usable path recorded (another machine, a renamed root), but the fingerprint is that of a stage here
        found += [(key, value, resolve.by_fingerprint.get(value), value)
                  for key, value in sorted(inputs.items()) if key.endswith("_fingerprint")]
        seen = set()
        for key, value, target, recorded in found:
            if target is None or target == stage.name or target in seen:
                continue
            seen.add(target)
            current = stages[target].manifest.get("fingerprint")
            note = ("no fingerprint recorded" if recorded is None else f"fingerprint `{recorded}`, current"
                    if recorded == current else f"fingerprint `{recorded}` recorded, but `{target}` is now "
                    f"`{current}`: rebuilt since")
            stage.links.append((key, target, note, value))
        stage.parent = _primary_parent(stage, inputs, resolve)


def _primary_parent(stage: Stage, inputs: dict, resolve: Resolver) -> str | None:
    explicit = stage.manifest.get("parent")
    if explicit:
        return resolve.path(explicit) or str(explicit)
    for key in MODEL_KEYS:
        if isinstance(inputs.get(key), str) and inputs[key]:
            return resolve.path(inputs[key]) or inputs[key]  # a Hub model stays as its id
    # data stages and pretraining: the main input data (a tokenizer, reference or reward model is a side input)
    side = ("tokenizer", "reward", "ref")
    ranked = sorted(stage.links, key=lambda link: (any(s in link[0] for s in side), link[0]))
    return ranked[0][1] if ranked else None


JUDGED_METRICS = ("reward_accuracy", "win_rate")  # figures the judging reward model scored


def attach_evals(stages: dict[str, Stage], evals: list, root: Path) -> None:
    """Attach each eval result to the stage it evaluated; a checkpoint outside the root gets its own row."""
    resolve = Resolver(stages, root)
    for path, result in evals:
        inputs = _read_object(path.parent / MANIFEST_NAME).get("inputs") or {}
        recorded = result.get("reward_model") or inputs.get("reward_model")
        judge = (resolve.path(recorded) or str(recorded)) if recorded else None
        target = resolve.path(result["checkpoint"])
        judged_by = inputs.get("reward_model_fingerprint")
        judge_rebuilt = (judge in stages and judge != target and judged_by is not None
                         and judged_by != stages[judge].manifest.get("fingerprint"))
        if judge_rebuilt:  # pairwise accuracy and win rate were scored by another build of the judge
            stages[judge].stale_evals.append((path, judged_by, "judged with"))
            result = {**result, "metrics": {group: values for group, values in (result.get("metrics") or {}).items()
                                            if group not in JUDGED_METRICS}}
        elif judge in stages and judge != target and _dig(result, "metrics", "reward_accuracy"):
            stages[judge].judged.append((path, result["metrics"]["reward_accuracy"]))  # the judge's, whatever it judged
        evaluated = inputs.get("model_fingerprint")
        if target in stages and evaluated and evaluated != stages[target].manifest.get("fingerprint"):
            stages[target].stale_evals.append((path, evaluated, "evaluated"))  # its figures describe another model
            continue
        if target is None:
            target = str(result["checkpoint"])
            if target not in stages:
                stages[target] = Stage(target, None, str(result.get("stage") or "?"), external=True, is_model=True)
                parent = result.get("parent")
                stages[target].parent = (resolve.path(parent) or parent) if parent else None
        stages[target].evals.append((path, result, judge))


def lineage_order(stages: dict[str, Stage]) -> list[str]:
    """Parents before children; independent stages in lifecycle order, then by creation time."""
    edges = defaultdict(set)
    for stage in stages.values():
        for source in {stage.parent, *(link[1] for link in stage.links)}:
            if source in stages and source != stage.name:
                edges[source].add(stage.name)
    waiting = {name: 0 for name in stages}
    for children in edges.values():
        for child in children:
            waiting[child] += 1

    def key(name):
        return (STAGE_RANK.get(stages[name].stage, 8.5), stages[name].created, name)

    ready = [(key(n), n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for child in edges[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (key(child), child))
    return order + sorted(set(stages) - set(order), key=key)  # a cycle (hand-edited manifests) still shows


def lineage_text(stages: dict[str, Stage], order: list[str]) -> tuple[list[str], list[str]]:
    """(one line per root, `a -> b -> {c, d}`; an indented tree that also names each stage's side inputs)."""
    children, roots = defaultdict(list), []
    for name in order:
        parent = stages[name].parent
        if parent is None or parent == name:
            roots.append(name)
            continue
        children[parent].append(name)
        if parent not in stages and parent not in roots:
            roots.append(parent)

    def chain(name: str) -> str:
        below = children.get(name, [])
        if not below:
            return name
        return f"{name} -> " + (chain(below[0]) if len(below) == 1 else "{" + ", ".join(map(chain, below)) + "}")

    def label(name: str) -> str:
        if name not in stages:
            return f"{name}  (not under this root: a Hub model or another directory)"
        stage = stages[name]
        side = [link[1] for link in stage.links if link[1] != stage.parent]
        return f"{name}  [{stage.stage}]" + (f"  + {', '.join(side)}" if side else "")

    tree = []

    def walk(name: str, prefix: str, last: bool, top: bool) -> None:
        tree.append(label(name) if top else f"{prefix}{'└── ' if last else '├── '}{label(name)}")
        below = children.get(name, [])
        for i, child in enumerate(below):
            walk(child, "" if top else prefix + ("    " if last else "│   "), i == len(below) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return [chain(r) for r in roots], tree


# ---------------------------------------------------------------------------------------- metrics


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dig(data, *path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def flatten(data, prefix: str = "") -> dict:
    """Numeric leaves with dotted names; lists (samples, predictions) are skipped."""
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif _number(data):
        out[prefix[:-1]] = data
    return out


def _eval_metrics(stage: Stage) -> dict:
    """The eval recipe's figures for this checkpoint. Pairwise accuracy describes the reward model that
    judged, so it goes to that model's row; win rate, like every other figure, to the evaluated checkpoint."""
    merged = defaultdict(dict)
    for _, result, judge in stage.evals:  # later files win where two evaluate the same metric
        for group, values in (result.get("metrics") or {}).items():
            if isinstance(values, dict) and not (group == "reward_accuracy" and judge not in (None, stage.name)):
                merged[group].update(values)
    for _, accuracy in stage.judged:
        merged["reward_accuracy"].update(accuracy)
    return merged


def _last_logged(stage: Stage, key: str):
    values = [entry[key] for entry in stage.log_history if _number(entry.get(key))]
    return values[-1] if values else None


def _first(*values):
    for value in values:
        if isinstance(value, dict):  # a before/after record whose headline the manifest keeps as a float
            continue
        if _number(value):
            return value
    return None


def _win_rate(stage: Stage, ev: dict):
    rate = _dig(ev, "win_rate", "win_rate")
    if not _number(rate):
        return None
    against = next((r.get("compare_checkpoint") for _, r, _ in reversed(stage.evals) if r.get("compare_checkpoint")),
                   None)
    return f"{_fmt(rate)} vs {Path(str(against)).name}" if against else rate


# (label, the eval recipe's value from eval_results.json, the stage's own value). The stage's own is the 'after'
# of its before/after pair in metrics.json: SFT exact_match_after, reward pairwise_after, PPO before/after,
# GRPO/RLOO/DPO eval_before/eval_after; the flat names are manifest headlines, for outputs without metrics.json.
COLUMNS = [
    ("train loss (mean)", None, lambda s, m: _first(m.get("train_loss"))),
    ("val loss", None, lambda s, m: _first(m.get("eval_loss"), _last_logged(s, "eval_loss"))),
    ("perplexity", lambda s, e: _first(_dig(e, "perplexity", "perplexity")),
     lambda s, m: _first(m.get("eval_perplexity"))),
    ("bits/byte", lambda s, e: _first(_dig(e, "perplexity", "bits_per_byte")), None),
    ("exact match", lambda s, e: _first(_dig(e, "exact_match", "exact_match")),
     lambda s, m: _first(_dig(m, "exact_match_after", "exact_match"), m.get("exact_match_after"),
                         _dig(m, "after", "exact_match"), _dig(m, "eval_after", "exact_match", "exact_match"),
                         m.get("after_exact_match"))),
    ("pairwise acc", lambda s, e: _first(_dig(e, "reward_accuracy", "accuracy")),
     lambda s, m: _first(_dig(m, "pairwise_after", "accuracy"), m.get("pairwise_after_accuracy"))),
    ("mean reward", None, lambda s, m: _first(_dig(m, "after", "mean_reward"),
                                              _dig(m, "eval_after", "reward_model_score"),
                                              m.get("after_mean_reward"), m.get("reward_model_score_after"))),
    ("KL/seq (nats)", None, lambda s, m: _first(_dig(m, "after", "kl_per_sequence"),
                                                _dig(m, "eval_after", "kl", "kl_per_sequence"),
                                                m.get("after_kl_per_sequence"), m.get("kl_per_sequence_after"))),
    ("BLEU", lambda s, e: _first(_dig(e, "bleu_rouge", "bleu")), None),
    ("ROUGE-L", lambda s, e: _first(_dig(e, "bleu_rouge", "rougeL")), None),
    ("win rate", _win_rate, None),
    ("refusal", lambda s, e: _first(_dig(e, "safety", "refusal_rate")), None),
    ("over-refusal", lambda s, e: _first(_dig(e, "safety", "over_refusal_rate")), None),
]
OWN_MARK = "*"


def metric_table(stages: dict[str, Stage], order: list[str]) -> tuple[list[str], list[list]]:
    """Header and rows (stage output, stage, parent, metrics...) for every model stage; empty columns dropped.

    Where a column mixes both sources, the stage's own values carry OWN_MARK: they may come from other
    data or settings than the eval recipe's (perplexity of packed blocks against a sliding window, say).
    """
    rows = [name for name in order if stages[name].is_model]
    evals = {n: _eval_metrics(stages[n]) for n in rows}
    tasks = sorted({task for n in rows for task in (evals[n].get("lm_eval") or {})})
    columns = list(COLUMNS)
    for task in tasks:
        columns.append((f"{task} acc", lambda s, e, t=task: _first(_dig(e, "lm_eval", t, "acc"),
                                                                    _dig(e, "lm_eval", t, "acc_norm")), None))
    columns.append(("steps", None, lambda s, m: _first(m.get("steps"), m.get("updates"))))
    cells = {}  # (row, column) -> (value, from the eval recipe?)
    for n in rows:
        stage = stages[n]
        for i, (_, from_eval, own) in enumerate(columns):
            value = from_eval(stage, evals[n]) if from_eval else None
            if value is not None:
                cells[n, i] = (value, True)
            elif own is not None and own(stage, stage.metrics) is not None:
                cells[n, i] = (own(stage, stage.metrics), False)
    keep = [i for i in range(len(columns)) if any((n, i) in cells for n in rows)]
    mixed = {i for i in keep if len({cells[n, i][1] for n in rows if (n, i) in cells}) == 2}
    header = ["stage output", "stage", "parent"] + [columns[i][0] for i in keep]
    table = []
    for n in rows:
        row = [n, stages[n].stage, stages[n].parent or ""]
        for i in keep:
            value, from_eval = cells.get((n, i), (None, True))
            row.append(f"{_fmt(value)}{OWN_MARK}" if i in mixed and not from_eval else value)
        table.append(row)
    return header, table


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"


# ---------------------------------------------------------------------------------------- figures


def _series(history: list, key: str) -> tuple[list, list]:
    points = [(e["step"], e[key]) for e in history if _number(e.get(key)) and _number(e.get("step"))]
    return [p[0] for p in points], [p[1] for p in points]


LOSS_PANELS = [("loss", ("loss", "eval_loss")),
               ("accuracy", ("mean_token_accuracy", "eval_mean_token_accuracy", "accuracy", "eval_accuracy"))]
REWARD_KEYS = ("reward", "objective/rlhf_reward", "objective/scores", "rewards/chosen", "rewards/rejected",
               "rewards/margins")
KL_KEYS = ("kl", "objective/kl", "kl_per_sequence")
# `kl` is per sequence in our PPO and per token in TRL's GRPO/RLOO: the legend names the key, not the unit
RL_PANELS = [("reward", REWARD_KEYS), ("KL to the reference", KL_KEYS),
             ("entropy", ("entropy", "objective/entropy")), ("policy loss", ("loss/policy", "policy_loss")),
             ("value loss", ("loss/value", "value_loss")),
             ("clipped fraction", ("clipfrac", "clip_ratio/region_mean", "policy/clipfrac_avg")),
             ("approx. KL between updates", ("approxkl", "policy/approxkl_avg")),
             ("response length (tokens)", ("response_length", "completions/mean_length")),
             ("preference accuracy", ("rewards/accuracies",))]


def _panel_keys(history: list, wanted: tuple) -> list[str]:
    logged = {k for entry in history for k, v in entry.items() if _number(v)}
    keys = [k for k in wanted if k in logged]
    if wanted is REWARD_KEYS:  # GRPO/RLOO: one mean per reward function
        keys += sorted(k for k in logged if re.fullmatch(r"rewards/.+/mean", k))
    keys += [f"eval_{k}" for k in keys if f"eval_{k}" in logged]  # the same figure on the eval split, dashed
    return list(dict.fromkeys(keys))


def _plot(panels: list[tuple[str, list[str]]], history: list, title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = len(panels) if len(panels) <= 3 else 2 if len(panels) == 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    width, height = 4.4 * ncols, 3.1 * nrows + 0.4
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # fixed margins in inches: a layout engine would double the drawing time
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.8 / height,
                        wspace=0.45, hspace=0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (panel, keys) in zip(axes, panels):
        for key in keys:
            steps, values = _series(history, key)
            evaluation = key.startswith("eval_")
            few = len(values) < 3
            ax.plot(steps, values, label=key, marker="o" if evaluation or few else None, markersize=4,
                    linestyle="--" if evaluation else "-", linewidth=1.4)
            if key == "reward":  # GRPO/RLOO log the spread of rewards within a batch
                std_steps, std = _series(history, "reward_std")
                if std_steps == steps:
                    ax.fill_between(steps, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)],
                                    alpha=0.2, label="reward ± std")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def plot_stage(stage: Stage, directory: Path) -> list[tuple[str, Path]]:
    """(caption, png) for the loss curves and, where reward or KL keys are logged, the RL curves."""
    figures = []
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stage.name)
    loss_panels = [(title, _panel_keys(stage.log_history, keys)) for title, keys in LOSS_PANELS]
    loss_panels = [(t, k) for t, k in loss_panels if k]
    if loss_panels and loss_panels[0][0] == "loss":
        path = directory / f"{slug}_loss.png"
        _plot(loss_panels, stage.log_history, f"{stage.name} ({stage.stage})", path)
        figures.append(("loss", path))
    rl_panels = [(title, _panel_keys(stage.log_history, keys)) for title, keys in RL_PANELS]
    if rl_panels[0][1] or rl_panels[1][1]:
        path = directory / f"{slug}_rl.png"
        _plot([(t, k) for t, k in rl_panels if k], stage.log_history, f"{stage.name} ({stage.stage}): RL curves",
              path)
        figures.append(("reward and KL", path))
    return figures


# ---------------------------------------------------------------------------------------- rendering
# The report is a list of blocks, rendered once as markdown and once as HTML.


def _md_cell(value) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *body in blocks:
        if kind == "h":
            out.append("#" * body[0] + " " + body[1])
        elif kind == "p":
            out.append(body[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in body[0]))
        elif kind == "pre":
            out.append("```text\n" + body[0] + "\n```")
        elif kind == "img":
            out.append(f"![{body[0]}]({body[1]})")
        elif kind == "table":
            header, rows = body
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                                  *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)]))
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def to_html(blocks: list, title: str, directory: Path) -> str:
    out = []
    for kind, *body in blocks:
        if kind == "h":
            out.append(f"<h{body[0]}>{_inline(body[1])}</h{body[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(body[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in body[0]) + "</ul>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(body[0])}</pre>")
        elif kind == "img":
            data = base64.b64encode((directory / body[1]).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(body[0])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "table":
            header, rows = body
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(
                f'<td{" class=num" if isinstance(c, (int, float)) else ""}>{html.escape(_fmt(c))}</td>' for c in row)
                + "</tr>" for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
             "pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}img{max-width:100%}code{background:#f3f3f3}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _shown(path: Path | str | None) -> str:
    """A path as the reader typed it: relative to the working directory where that is shorter."""
    if path is None:
        return ""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _options_lines(options: dict) -> list[str]:
    lines = []
    for key, value in options.items():
        if isinstance(value, dict):
            pairs = ", ".join(f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                              for k, v in value.items() if v is not None)
            lines.append(f"`{key}`: {pairs or 'none'}")
        else:
            lines.append(f"`{key}`: {'none' if value is None else value}")
    return lines


def _stage_blocks(stage: Stage, stages: dict[str, Stage], figures: list, report_dir: Path) -> list:
    blocks = [("h", 3, f"`{stage.name}` ({stage.stage})")]
    facts = []
    if stage.external:
        facts.append(f"checkpoint `{stage.name}`, outside this root; known from its eval results")
    else:
        created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stage.created)) if stage.created else "?"
        facts.append(f"directory `{_shown(stage.path)}`, fingerprint `{stage.manifest.get('fingerprint')}`, "
                     f"made {created}")
    if stage.parent:
        facts.append(f"parent: `{stage.parent}`" + ("" if stage.parent in stages else " (outside this root)"))
    for key, target, note, value in stage.links:
        facts.append(f"input `{key}`: `{value}` -> `{target}` ({note})")
    linked = {link[0] for link in stage.links} | {_fingerprint_key(link[0]) for link in stage.links}
    for key, value in (stage.manifest.get("inputs") or {}).items():
        if value is not None and key not in linked:
            facts.append(f"input `{key}`: `{value}`")
    blocks.append(("ul", facts))
    if stage.manifest.get("options"):
        blocks += [("p", "Config (options recorded in the manifest):"),
                   ("ul", _options_lines(stage.manifest["options"]))]
    own = flatten(stage.metrics)
    if own:
        blocks += [("p", f"Metrics from `{stage.metrics_source}`:"),
                   ("table", ["metric", "value"], [[k, v] for k, v in own.items()])]
    for path, result, judge in stage.evals:
        data = [f"`{name}`: `{d.get('path')}` [{d.get('split')}] hash `{d.get('hash')}`"
                for name, d in (result.get("data") or {}).items() if isinstance(d, dict)]
        extra = [f"compared with `{result['compare_checkpoint']}`"] if result.get("compare_checkpoint") else []
        if judge and judge != stage.name:
            extra.append(f"judged by the reward model `{judge}` (its pairwise accuracy is listed under it)")
        wall = result.get("wall_time_s")
        if isinstance(wall, dict) and wall:
            extra.append("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in wall.items() if _number(v)))
        blocks += [("p", f"Eval results from `{_shown(path)}`:"), ("ul", data + extra),
                   ("table", ["metric", "value"], [[k, v] for k, v in flatten(result.get("metrics") or {}).items()])]
    for path, evaluated, how in stage.stale_evals:
        blocks.append(("p", f"Left out: `{_shown(path)}` {how} fingerprint `{evaluated}`, an earlier build of "
                            f"`{stage.name}` (now `{stage.manifest.get('fingerprint')}`); rerun the eval for figures "
                            "of this one."))
    for path, accuracy in stage.judged:
        blocks += [("p", f"As the judging reward model in `{_shown(path)}`: pairwise accuracy on held-out pairs"),
                   ("table", ["metric", "value"], [[f"reward_accuracy.{k}", v] for k, v in flatten(accuracy).items()])]
    if stage.state_source is not None:
        note = "" if stage.state_source.parent == stage.path else " (the final one is missing; newest checkpoint)"
        blocks.append(("p", f"Curves from `{_shown(stage.state_source)}`{note}:"))
        blocks += [("img", f"{stage.name} {caption}", str(path.relative_to(report_dir))) for caption, path in figures]
    elif stage.is_model and not stage.external:
        blocks.append(("p", "No `trainer_state.json`: this output was made before its recipe saved one."))
    return blocks


def build_report(args: ReportArguments, root: Path, report_dir: Path) -> tuple[list, dict]:
    stages, evals, unfinished = collect(root, exclude=Path(args.output_dir).resolve())
    if not any(not s.external for s in stages.values()):
        raise UserError(f"{root}: no stage outputs (no subdirectory with a {MANIFEST_NAME})")
    link(stages, root)
    attach_evals(stages, evals, root)
    order = lineage_order(stages)
    chains, tree = lineage_text(stages, order)
    header, rows = metric_table(stages, order)

    figure_dir = report_dir / "figures"
    figure_dir.mkdir()
    figures = {name: plot_stage(stages[name], figure_dir) for name in order if stages[name].log_history}

    from recipes.summary import KEY_FIGURES

    data_rows = []
    for name in order:
        stage = stages[name]
        if not stage.is_model:
            try:
                figures_text = KEY_FIGURES[stage.stage](stage.manifest.get("outputs") or {})
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                figures_text = ""
            data_rows.append([name, stage.stage, stage.parent or "", figures_text, stage.manifest.get("fingerprint")])

    blocks = [("h", 1, args.title),
              ("p", f"From `{_shown(root)}`: {len(order)} stage outputs, {len(evals)} eval result files; generated "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m recipes.eval.report`.")]
    if unfinished:
        blocks.append(("p", "Skipped as unfinished (no manifest.json): " + ", ".join(f"`{u}`" for u in unfinished)))
    blocks += [("h", 2, "Lineage"),
               ("p", "Each output's parent is the model it started from, or for data and pretraining its main "
                     "input data; `+` names the other stage outputs it read."),
               ("pre", "\n".join(chains)), ("pre", "\n".join(tree)),
               ("h", 2, "Metrics across stages"),
               ("p", "One row per model checkpoint, in lineage order. A value is the eval recipe's "
                     "(`eval_results.json`) where one exists, else the stage's own measurement of this checkpoint "
                     f"(`metrics.json`: the 'after' of its before/after pairs), marked `{OWN_MARK}` in a column that "
                     "mixes the two, since they may use different data or settings. Every metric is listed per "
                     "stage below.")]
    blocks.append(("table", header, rows) if rows else ("p", "No model checkpoints yet."))
    if data_rows:
        blocks += [("h", 2, "Data"),
                   ("table", ["output", "stage", "made from", "key figures", "fingerprint"], data_rows)]
    blocks.append(("h", 2, "Stages"))
    for name in order:
        if stages[name].is_model:
            blocks += _stage_blocks(stages[name], stages, figures.get(name, []), report_dir)

    summary = {
        "root": str(root), "order": order, "lineage": chains,
        "stages": {name: {"stage": s.stage, "path": str(s.path) if s.path else None, "parent": s.parent,
                          "inputs": {link[0]: link[1] for link in s.links}, "is_model": s.is_model,
                          "fingerprint": s.manifest.get("fingerprint"),
                          "eval_results": [str(e[0]) for e in s.evals],
                          "figures": [str(p.relative_to(report_dir)) for _, p in figures.get(name, [])]}
                   for name, s in ((n, stages[n]) for n in order)},
        "table": {"header": header, "rows": rows},
        "unfinished": unfinished,
    }
    return blocks, summary


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `report.py outputs ...`: the root as the first positional
        argv = ["--root", argv[0], *argv[1:]]
    (args,) = parse_config([ReportArguments], argv)
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"outputs directory not found: {root}")
    output_dir = Path(args.output_dir).resolve()
    if output_dir == root.resolve() or root.resolve().is_relative_to(output_dir):
        raise UserError(f"output_dir {args.output_dir} would replace the outputs it reports on")
    claim_output_dir(args.output_dir, "report")  # it is replaced whole: only ever an earlier report

    # ---------------------------------------------------------------- collect, plot, render
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        blocks, summary = build_report(args, root, tmp)
        (tmp / "report.md").write_text(to_markdown(blocks))
        (tmp / "report.html").write_text(to_html(blocks, args.title, tmp))
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        inputs = {"root": str(root), "stages": {n: s["fingerprint"] for n, s in summary["stages"].items()},
                  "eval_results": [p for s in summary["stages"].values() for p in s["eval_results"]]}
        outputs = {"stages": len(summary["order"]), "model_rows": len(summary["table"]["rows"]),
                   "figures": sorted(str(p.relative_to(tmp)) for p in (tmp / "figures").glob("*.png"))}
        write_manifest(tmp, build_manifest("report", inputs, {"title": args.title}, outputs))
    print(f"[report] {outputs['stages']} stage outputs, {outputs['model_rows']} table rows, "
          f"{len(outputs['figures'])} figures -> {Path(args.output_dir) / 'report.md'} and report.html")
    return summary


if __name__ == "__main__":
    run_cli(main)
