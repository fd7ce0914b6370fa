"""RLOO with TRL's RLOOTrainer: REINFORCE with a leave-one-out baseline; no value model.

    # the tiny SFT model against the tiny reward model, on the embedded RL prompts, CPU
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/rloo.py --config recipes/rl/rloo_tiny.yaml

    # SmolLM2-360M (SFT + reward outputs of the smoltalk/UltraFeedback recipes) on UltraFeedback prompts, 8 GPUs
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/rl/rloo.py \
        --config recipes/rl/rloo_smollm2_360m.yaml

Each prompt gets `num_generations` replies; a reply's advantage is its reward minus the mean reward
of the *other* replies to the same prompt. Unlike GRPO, the KL term is part of the reward, as in
classic RLHF: r = r_model - beta * sum_t (log pi - log pi_ref) over the reply's tokens (TRL's default
beta is 0.05; the YAMLs set it). Everything else (prompts, rewards, evaluation, outputs) is the GRPO
recipe's, so `main` is grpo.main with RLOOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import trl
from trl import ModelConfig

from data_prep.artifacts import parse_config, run_cli
from recipes.common import with_cpu_process_group
from recipes.peft_methods import PeftMethodArguments, check_peft_settings
from recipes.rl import grpo
from recipes.rl.common import OnlineRLChecks, PromptArguments
from recipes.rl.rewards import check_reward_settings


@dataclass
class RLOOConfig(OnlineRLChecks, trl.RLOOConfig):
    """TRL's RLOOConfig; nonsense numbers and periodic evaluation are refused while it is parsed."""


def main(script_args, training_args, model_args, peft_args, callbacks=None) -> dict:
    return grpo.main(script_args, training_args, model_args, peft_args, callbacks, method="rloo")


def parse_args(argv: list[str] | None = None):
    parsed = parse_config([PromptArguments, RLOOConfig, ModelConfig, PeftMethodArguments], with_cpu_process_group(argv))
    check_peft_settings("rloo", parsed[2], parsed[3], parsed[1])
    check_reward_settings(parsed[0].reward_model_path, parsed[0].correctness_reward, parsed[1].reward_weights)
    return parsed


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
