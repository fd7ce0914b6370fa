"""What the RL recipes share: loading the policy, the held-out evaluation before and after training,
the reward/KL curves and the output directory (model, metrics, trainer state, curves, card, manifest).

The held-out evaluation is recipes.rl.policy_eval.evaluate_policy, shared with PPO, so that every
method reports the same figures: `mean_reward` (reward-model score of greedy replies), `exact_match`
and `by_task` (check_answer), and `kl_per_sequence` (recipes.rl.kl.kl_report, on sampled replies).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.artifacts import UserError, build_manifest, write_manifest
from recipes.common import (check_settings, check_training_numbers, load_pretrained, model_card, model_load_kwargs,
                            no_zero3_init, publish)


@dataclass
class RLShapingArguments:
    """Which training prompts and how the reward model's score enters the reward: shared by PPO's
    arguments and `PromptArguments`, so the two declare them once."""

    train_tasks: list[str] | None = field(default=None, metadata={
        "help": "Task families (the task column) to train on; the held-out prompts keep every family. "
                "Null: all."})
    reward_model_clip: float | None = field(default=None, metadata={
        "help": "Clip the reward model's score to [-c, c] in the training reward (held-out figures stay raw): "
                "bounds what fooling the reward model can earn against the correctness reward."})


@dataclass
class ReferenceCurveArguments:
    """A reference run whose curves rl_curves.png draws (dashed) under this run's."""

    reference_curves: str | None = field(default=None, metadata={
        "help": "An rl_curves.json: one shipped under recipes/rl/reference_curves/ (the tiny presets' measured "
                "runs) or any earlier run's. A relative path is looked up from the working directory, then "
                "from the repository root. Null: no reference."})


@dataclass
class PromptArguments(RLShapingArguments, ReferenceCurveArguments):
    """Prompts, rewards and held-out evaluation of the online RL recipes (GRPO, RLOO)."""

    dataset_path: str | None = field(default="outputs/sft_data", metadata={
        "help": "Output of data_prep.build_sft_data (messages rows); set to null to use dataset_name."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub prompt set (a prompt or messages column)."})
    dataset_config: str | None = field(default=None)
    dataset_train_split: str = field(default="rl_prompts")
    dataset_test_split: str | None = field(default="test", metadata={"help": "Held-out prompts; 'none' to skip."})
    max_train_prompts: int | None = field(default=None)
    max_prompt_tokens: int | None = field(default=None, metadata={
        "help": "Longer prompts lose their oldest turns (then their first tokens); the count is reported."})
    reward_model_path: str | None = field(default="outputs/reward_tiny", metadata={
        "help": "A recipes/reward output (scalar head); null for the rule-based reward alone."})
    correctness_reward: bool = field(default=False, metadata={
        "help": "Add the rule-based 1/0 reward (check_answer on the task/answer columns) after the reward model."})
    eval_policy: bool = field(default=True, metadata={"help": "Held-out reward, exact match and KL, before and after."})
    eval_max_samples: int | None = field(default=None)
    eval_max_new_tokens: int = field(default=48)
    eval_batch_size: int = field(default=64)

    def __post_init__(self):
        check_settings(self, at_least_1=("eval_batch_size", "eval_max_new_tokens", "eval_max_samples",
                                         "max_train_prompts", "max_prompt_tokens"), positive=("reward_model_clip",))


class OnlineRLChecks:
    """Mixed into TRL's GRPOConfig and RLOOConfig (recipes/rl/grpo.py, rloo.py): their numbers are checked
    before TRL's own __post_init__ (which divides by num_generations), and periodic evaluation is refused:
    the recipe evaluates the held-out prompts before and after training (eval_policy) and gives the trainer
    no eval_dataset, so Trainer would stop at the first evaluation with a traceback."""

    def __post_init__(self):
        check_training_numbers(self)
        # top_p 0 would sample greedily (every reply of a group alike, every advantage 0), a top_p above 1 is
        # ignored, and a negative top_k or a repetition_penalty of 0 fails at the first rollout
        check_settings(self, at_least_1=("max_completion_length", "num_iterations"),
                       positive=("temperature", "top_p", "repetition_penalty"),
                       non_negative=("beta", "top_k", "min_p", "epsilon", "epsilon_high"), at_most_1=("top_p", "min_p"))
        if self.num_generations is not None and self.num_generations < 2:
            raise UserError(f"num_generations must be >= 2 (each reply's advantage is measured against the other "
                            f"replies to its prompt), got {self.num_generations}")
        strategy = getattr(self.eval_strategy, "value", self.eval_strategy)
        if strategy != "no":
            raise UserError(f"eval_strategy: this recipe evaluates the held-out prompts before and after training "
                            f"(eval_policy); set it to \"no\" (got \"{strategy}\")")
        super().__post_init__()


def require_conversational(prompts, what: str, skip: str = "dataset_test_split: none") -> None:
    """The held-out evaluation renders prompts with the chat template: plain-text prompts are refused."""
    if prompts is not None and any(isinstance(p, str) for p in prompts["prompt"]):
        raise UserError(f"{what} needs conversational prompts (lists of messages), and the held-out split has "
                        f"plain-text prompts; set {skip} to skip the evaluation")


def load_policy(model_args, trust_remote_code: bool = False):
    """(model, tokenizer, parent manifest) of ModelConfig's model; generation stops at every end-of-turn and
    end-of-text token."""
    from transformers import AutoModelForCausalLM

    from recipes.eval.generation import stop_token_ids

    model_path = model_args.model_name_or_path
    model, tokenizer, parent = load_pretrained(model_path, AutoModelForCausalLM, trust_remote_code=trust_remote_code,
                                               for_training=True, **model_load_kwargs(model_args))
    if not tokenizer.chat_template:
        raise UserError(f"{model_path}: the tokenizer has no chat template (RL starts from a chat model)")
    # TRL's trainers stop at every id in generation_config.eos_token_id plus the tokenizer's eos
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    model.generation_config.eos_token_id = sorted(set(declared) | set(stop_token_ids(tokenizer)))
    return model, tokenizer, parent


def evaluate_saved_policy(model_path: str, reference_path: str, prompts, scorer, max_new_tokens: int = 48,
                          batch_size: int = 64, trust_remote_code: bool = False, seed: int = 0) -> dict:
    """recipes.rl.policy_eval.evaluate_policy (the one held-out evaluation of every RL method) on the policy
    saved at model_path, against the reference at reference_path, both loaded whole on this process."""
    from transformers import AutoModelForCausalLM

    from recipes.rl.policy_eval import evaluate_policy

    if scorer is None:
        raise UserError("eval_policy scores the held-out replies with the reward model: set reward_model_path, "
                        "or eval_policy: false")
    require_conversational(prompts, "eval_policy")
    with no_zero3_init():
        policy, tokenizer, _ = load_pretrained(model_path, AutoModelForCausalLM, trust_remote_code=trust_remote_code)
        if model_path == reference_path:  # the starting point: its KL to itself is 0 by definition, not measured
            result = evaluate_policy(policy, tokenizer, prompts, scorer, measure_kl=False,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
            return {**result, "kl_per_sequence": 0.0}
        reference, _, _ = load_pretrained(reference_path, AutoModelForCausalLM, trust_remote_code=trust_remote_code)
    return evaluate_policy(policy, tokenizer, prompts, scorer, reference=reference, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, seed=seed)


def summary_line(before: dict, after: dict) -> str:
    return (f"held-out ({after['n']} prompts): reward-model score {before['mean_reward']:.3f} -> "
            f"{after['mean_reward']:.3f}, exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}, "
            f"KL to the reference {after['kl_per_sequence']:.3f} nats/sequence")


REWARD_KEYS = ("reward", "rewards/reward_model/mean", "rewards/correctness_reward/mean", "rewards/margins",
               "rewards/accuracies")
CURVES_FORMAT = "rl_curves/1"
REPO = Path(__file__).resolve().parents[2]


def curve_series(log_history: list[dict], beta: float | None = None) -> dict[str, dict[str, list]]:
    """What rl_curves.png draws, as {"reward": {name: [[step, value], ...]}, "kl": {...}}.

    Online methods log `kl`: PPO per sequence, GRPO/RLOO per token, which is drawn times the mean
    completion length, an estimate per sequence. DPO logs the implicit rewards beta*log(pi/pi_ref) of
    the preference responses; divided by beta they are the log-ratio per sequence on those (not the
    policy's own) responses.
    """
    logs = [h for h in log_history if "step" in h and "train_runtime" not in h]
    reward = {key: [[h["step"], h[key]] for h in logs if key in h and math.isfinite(h[key])] for key in REWARD_KEYS}
    kl = {"KL per sequence (training)": [[h["step"], h["kl"] * h.get("completions/mean_length", 1.0)]
                                         for h in logs if "kl" in h and math.isfinite(h["kl"])]}
    if beta:
        for key in ("rewards/chosen", "rewards/rejected"):
            kl[f"log pi/pi_ref on {key.split('/')[1]} (sequence)"] = [[h["step"], h[key] / beta]
                                                                     for h in logs if key in h]
    return without_repeated_reward({"reward": {k: v for k, v in reward.items() if v},
                                    "kl": {k: v for k, v in kl.items() if v}})


def without_repeated_reward(series: dict) -> dict:
    """Drop the total `reward` where it is one reward function's series point for point (PPO logs the
    reward model's mean as `reward`; so do GRPO/RLOO with one function), so the PNG draws it once,
    under the more telling name."""
    rewards = series["reward"]
    if any(name != "reward" and points == rewards.get("reward") for name, points in rewards.items()):
        rewards = {name: points for name, points in rewards.items() if name != "reward"}
    return {**series, "reward": rewards}


def load_reference_curves(path: str | None) -> dict | None:
    """The rl_curves.json at `path` (see ReferenceCurveArguments), checked; None when path is None."""
    if not path or path.lower() in ("none", "null"):  # on the command line, null arrives as a string
        return None
    candidates = [Path(path)] if Path(path).is_absolute() else [Path(path), REPO / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(f"reference_curves: {path} is not a file (an rl_curves.json from "
                        "recipes/rl/reference_curves/ or from an earlier run's output_dir)")
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{found}: not a JSON file ({err})") from None
    if not (isinstance(data, dict) and data.get("format") == CURVES_FORMAT
            and all(isinstance(data.get(panel), dict) for panel in ("reward", "kl"))):
        raise UserError(f"{found}: not an rl_curves.json (needs \"format\": \"{CURVES_FORMAT}\" and the "
                        "\"reward\" and \"kl\" series)")
    for panel in ("reward", "kl"):
        for name, points in data[panel].items():
            if not (isinstance(points, list) and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p)
                    for p in points)):
                raise UserError(f"{found}: {panel}[{name!r}] is not a list of [step, value] pairs")
    return {**without_repeated_reward(data), "path": path}


def plot_curves(series: dict, path: str | Path, title: str, held_out_kl: tuple[int, float] | None = None,
                reference: dict | None = None):
    """rl_curves.png: curve_series' rewards (left) and KL to the reference model (right), per step, and a
    reference run's (load_reference_curves) dashed in the same colours. `held_out_kl` = (step, value)
    marks the KL measured on held-out prompts after training. Returns the matplotlib Figure."""
    # A bare Figure with an Agg canvas: no pyplot state, so a notebook's inline backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = dict(zip(("reward", "kl"), fig.subplots(1, 2)))
    for panel, ax in axes.items():
        names = list(dict.fromkeys([*series[panel], *(reference or {}).get(panel, {})]))
        for index, name in enumerate(names):
            colour = f"C{index % 10}"
            if series[panel].get(name):
                ax.plot(*zip(*series[panel][name]), marker=".", color=colour, label=name)
            if reference and reference[panel].get(name):
                ax.plot(*zip(*reference[panel][name]), linestyle="--", color=colour, alpha=0.6,
                        label=f"{name}, reference")
    if held_out_kl is not None:
        axes["kl"].plot([0, held_out_kl[0]], [0.0, held_out_kl[1]], "k*", markersize=10, label="held-out KL per sequence")
    axes["reward"].set(xlabel="step", ylabel="reward", title="reward (training batches)")
    axes["kl"].set(xlabel="step", ylabel="nats per sequence", title="KL to the reference")
    for ax in axes.values():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if reference:
        title += f"  (dashed: {Path(reference['path']).name})"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def _recorded_with() -> dict:
    """Where a run's curves were measured: they move with the machine's floating-point kernels."""
    import platform

    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def headline(metrics: dict) -> dict:
    """Flat key figures for the manifest and the model card (the PPO recipe's names)."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for when in ("before", "after"):
        for key in ("mean_reward", "exact_match", "kl_per_sequence"):
            if key in metrics.get(when, {}):
                out[f"{when}_{key}"] = metrics[when][key]
    return out


def finish_run(trainer, staging: Path, stage: str, inputs: dict, options: dict, metrics: dict, title: str,
               summary: str, beta: float | None = None, reference: dict | None = None) -> None:
    """Write metrics.json, trainer_state.json, rl_curves.json and .png, README.md and (last) manifest.json, then
    publish."""
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    trainer.state.save_to_json(str(staging / "trainer_state.json"))
    after = metrics.get("after")
    series = curve_series(trainer.state.log_history, beta)
    held_out = {when: {k: metrics[when].get(k) for k in ("mean_reward", "exact_match", "kl_per_sequence")}
                for when in ("before", "after") if when in metrics}
    curves = {"format": CURVES_FORMAT, "stage": stage, "run": Path(trainer.args.output_dir).name,
              "steps": trainer.state.global_step, **series, "held_out": held_out,
              "settings": options["training"], "recorded_with": _recorded_with()}
    (staging / "rl_curves.json").write_text(json.dumps(curves, indent=1, default=str) + "\n")
    plot_curves(series, staging / "rl_curves.png", f"{title}: {Path(trainer.args.output_dir).name}",
                held_out_kl=(trainer.state.global_step, after["kl_per_sequence"]) if after else None,
                reference=reference)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in headline(metrics).items()}
    if after:
        shown["exact_match_by_task"] = json.dumps(after["by_task"])
    curves_text = "![reward and KL](rl_curves.png)\n\nThe curves' figures: `rl_curves.json`."
    if reference:
        curves_text += (f" Dashed: the reference run `{reference['path']}` (held out: "
                        f"{json.dumps(reference.get('held_out', {}))}).")
    card = model_card(title=title, summary=summary,
                      sections={"Lineage": inputs, "Training": options["training"],
                                "PEFT": options.get("peft") or "full fine-tuning", "Metrics": shown,
                                "Curves": curves_text},
                      tags=[stage, "trl", "rlhf"])
    (staging / "README.md").write_text(card)
    write_manifest(staging, build_manifest(stage, inputs, options, headline(metrics)))
    publish(staging, trainer.args.output_dir, trainer)
