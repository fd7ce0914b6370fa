"""Benchmark: one RL iteration split into generate, score and train, PPO (ours) against GRPO (TRL).

    python recipes/rl/benchmark.py                       # the speedrun's tiny SFT and reward models
    python recipes/rl/benchmark.py --iterations 10 --replies 64 --response_length 48
    python recipes/rl/benchmark.py --num_ppo_epochs 4          # PPO's main cost is its epochs

Both methods run their tiny preset (recipes/rl/ppo_tiny.yaml, grpo_tiny.yaml) on the same batch: the
same prompts, `replies` replies of at most `response_length` tokens at one temperature, the same
reward functions (reward model + correctness). Each keeps its own update, which is the point of the
comparison: PPO scores with the policy, the reference and the critic and then takes
num_ppo_epochs x num_mini_batches optimizer steps on policy and critic; GRPO samples groups of
`num_generations` replies per prompt, scores with the reference and takes one step.

Phases: generate = sampling the replies; score = reward functions, reference (and for PPO policy and
value) forward passes, advantages; train = the rest of the iteration (forward, backward, optimizer).
Prints the median seconds of each phase over the iterations after the first (warm-up), and the ratio
PPO / GRPO per phase; the target is a total ratio <= 2. Compare only figures of one run: this
machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from data_prep.artifacts import UserError, run_cli

REPO = Path(__file__).resolve().parents[2]
PHASES = ("generate", "score", "train")


def common_overrides(args, output_dir: Path) -> list[str]:
    return ["--model_name_or_path", args.policy, "--reward_model_path", args.reward_model,
            "--dataset_path", args.dataset_path, "--temperature", str(args.temperature),
            "--output_dir", str(output_dir), "--logging_steps", "1", "--disable_tqdm", "true",
            "--seed", str(args.seed), "--bf16", "false"]


def time_ppo(args, output_dir: Path) -> list[dict]:
    from recipes.rl import ppo

    argv = ["--config", str(REPO / "recipes/rl/ppo_tiny.yaml"), *common_overrides(args, output_dir),
            "--dataset_test_split", "none", "--total_episodes", str(args.replies * args.iterations),
            "--per_device_train_batch_size", str(args.replies // 2), "--num_mini_batches", "2",
            "--local_rollout_forward_batch_size", str(args.replies), "--response_length", str(args.response_length),
            *(["--num_ppo_epochs", str(args.num_ppo_epochs)] if args.num_ppo_epochs else [])]
    ppo.main(*ppo.parse_args(argv))
    # our trainer logs each update's phase seconds (time/<phase>_s) at logging_steps 1
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [{phase: row[f"time/{phase}_s"] for phase in PHASES} for row in history if "time/train_s" in row]


@contextlib.contextmanager
def timed_grpo(iterations: list[dict]):
    """Time TRL's GRPOTrainer phases by wrapping its generation and scoring methods for the duration."""
    import trl
    from transformers import TrainerCallback

    cls = trl.GRPOTrainer
    original_generate, original_score = cls._generate, cls._generate_and_score_completions
    current: dict = {}

    def generate(self, *a, **k):
        started = time.perf_counter()
        try:
            return original_generate(self, *a, **k)
        finally:
            current["generate"] = current.get("generate", 0.0) + time.perf_counter() - started

    def generate_and_score(self, *a, **k):
        started = time.perf_counter()
        try:
            return original_score(self, *a, **k)
        finally:
            current["generate_and_score"] = current.get("generate_and_score", 0.0) + time.perf_counter() - started

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["started"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - current["started"]
            iterations.append({"generate": current["generate"],
                               "score": current["generate_and_score"] - current["generate"],
                               "train": total - current["generate_and_score"]})

    cls._generate, cls._generate_and_score_completions = generate, generate_and_score
    try:
        yield StepClock()
    finally:
        cls._generate, cls._generate_and_score_completions = original_generate, original_score


def time_grpo(args, output_dir: Path) -> list[dict]:
    from recipes.rl import grpo

    argv = ["--config", str(REPO / "recipes/rl/grpo_tiny.yaml"), *common_overrides(args, output_dir),
            "--eval_policy", "false", "--max_steps", str(args.iterations),
            "--per_device_train_batch_size", str(args.replies), "--gradient_accumulation_steps", "1",
            "--num_generations", str(args.num_generations), "--max_completion_length", str(args.response_length)]
    iterations: list[dict] = []
    with timed_grpo(iterations) as clock:
        grpo.main(*grpo.parse_args(argv), callbacks=[clock])
    return iterations


def medians(iterations: list[dict]) -> dict:
    measured = iterations[1:] or iterations  # the first iteration warms up allocators and caches
    result = {phase: statistics.median(it[phase] for it in measured) for phase in PHASES}
    result["total"] = statistics.median(sum(it[p] for p in PHASES) for it in measured)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="outputs/sft_tiny")
    parser.add_argument("--reward_model", default="outputs/reward_tiny")
    parser.add_argument("--dataset_path", default="outputs/sft_data")
    parser.add_argument("--iterations", type=int, default=6, help="Per method; the first is a warm-up.")
    parser.add_argument("--replies", type=int, default=32, help="Replies per iteration (both methods).")
    parser.add_argument("--num_generations", type=int, default=4, help="GRPO group size.")
    parser.add_argument("--num_ppo_epochs", type=int, default=None, help="PPO epochs per batch (default: the preset's).")
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_json", default=None, help="Also write the figures here.")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        raise UserError("--iterations: at least 2 (the first is a warm-up)")
    if args.replies % 2 or args.replies % args.num_generations:
        raise UserError(f"--replies {args.replies}: must be even (PPO's 2 minibatches) and a multiple of "
                        f"--num_generations {args.num_generations}")
    for path in (args.policy, args.reward_model, args.dataset_path):
        if not Path(path).is_dir():
            raise UserError(f"{path}: not found (run bash recipes/speedrun_cpu.sh, or pass --policy, "
                            "--reward_model and --dataset_path)")

    with tempfile.TemporaryDirectory(prefix="rl_benchmark_") as scratch:
        runs = {"ppo": time_ppo(args, Path(scratch) / "ppo"), "grpo": time_grpo(args, Path(scratch) / "grpo")}
    figures = {name: medians(iterations) for name, iterations in runs.items()}
    ratio = {phase: figures["ppo"][phase] / max(figures["grpo"][phase], 1e-9) for phase in (*PHASES, "total")}

    print(f"\nOne iteration of {args.replies} replies (<= {args.response_length} tokens), median of "
          f"{args.iterations - 1} after a warm-up, seconds:")
    print(f"{'phase':<10}{'PPO':>10}{'GRPO':>10}{'PPO/GRPO':>11}")
    for phase in (*PHASES, "total"):
        print(f"{phase:<10}{figures['ppo'][phase]:>10.2f}{figures['grpo'][phase]:>10.2f}{ratio[phase]:>11.2f}")
    print(f"PPO / GRPO per iteration: {ratio['total']:.2f} (target <= 2: {'met' if ratio['total'] <= 2 else 'not met'})")
    result = {"settings": vars(args), "seconds": figures, "ratio": ratio, "iterations": runs}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
