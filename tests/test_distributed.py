"""Real `accelerate launch` runs of the recipes on 2 CPU processes under DeepSpeed and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import REPO_ROOT, pretrain_argv

pytestmark = pytest.mark.slow


def accelerate_launch(config: str, script: str, argv: list[str], port: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / config),
               "--num_processes", "2", "--main_process_port", str(port), str(REPO_ROOT / script), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)


LAUNCHES = [  # accelerate config, what the recipe must report, whether zero.Init partitioned it, port
    pytest.param("deepspeed_zero2", "DEEPSPEED ZeRO-2", False, 29602, id="deepspeed_zero2"),
    pytest.param("deepspeed_zero3", "DEEPSPEED ZeRO-3", True, 29603, id="deepspeed_zero3"),
    pytest.param("cpu_2proc", "MULTI_CPU", False, 29604, id="cpu_2proc"),  # DDP over gloo
]


@pytest.mark.parametrize("config,mode,partitioned,port", LAUNCHES)
def test_two_cpu_processes(config, mode, partitioned, port, tiny_data, tmp_path):
    out = tmp_path / config
    result = accelerate_launch(f"accelerate_configs/{config}.yaml", "recipes/pretrain/pretrain.py",
                               pretrain_argv(tiny_data, out, "--max_steps", "3", "--logging_steps", "1",
                                             "--save_steps", "100", "--per_device_train_batch_size", "2"),
                               port=port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = result.stdout + result.stderr
    assert f"[pretrain] {mode} on 2 process(es); parameters partitioned at init: {partitioned}" in log

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["eval_loss"] == metrics["eval_loss"]  # finite, not NaN
    assert metrics["final_train_loss"] < 1.2 * metrics["init_eval_loss"]  # averaged over ranks, not summed

    # The saved file holds every full-size tensor (ZeRO-3 gathered its shards before saving).
    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(p.shape) for name, p in reference.state_dict().items()}
    with safe_open(out / "model.safetensors", "pt") as handle:
        saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    for name, shape in saved.items():
        assert expected[name] == shape, name
    assert sum(torch.Size(s).numel() for s in saved.values()) >= metrics["params"] - config.vocab_size * config.hidden_size

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(p.abs().sum() > 0 for p in model.parameters())
    assert metrics["params"] == sum(p.numel() for p in model.parameters())


def test_muon_under_zero2_matches_ddp_and_clipping_is_refused(tiny_data, tmp_path):
    """DeepSpeed orthogonalizes each whole matrix before ZeRO-2 partitions it, so the per-step losses
    equal those of DDP, where every rank runs Muon on the full matrix. With clipping on, ZeRO would
    clip the orthogonalized update instead of the gradient, so the recipe refuses it."""
    losses = {}
    for config, port in (("cpu_2proc", 29609), ("deepspeed_zero2", 29610)):
        out = tmp_path / config
        result = accelerate_launch(f"accelerate_configs/{config}.yaml", "recipes/pretrain/pretrain.py",
                                   pretrain_argv(tiny_data, out, "--max_steps", "5", "--logging_steps", "1",
                                                 "--warmup_steps", "0", "--per_device_train_batch_size", "2",
                                                 "--eval_on_start", "false", "--muon", "true",
                                                 "--max_grad_norm", "0"), port=port)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        state = json.loads((out / "trainer_state.json").read_text())
        losses[config] = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses["cpu_2proc"]) == 5 and losses["cpu_2proc"][-1] < losses["cpu_2proc"][0]
    assert losses["deepspeed_zero2"] == pytest.approx(losses["cpu_2proc"], rel=1e-4)

    refused = accelerate_launch("accelerate_configs/deepspeed_zero2.yaml", "recipes/pretrain/pretrain.py",
                                pretrain_argv(tiny_data, tmp_path / "clipped", "--max_steps", "2", "--muon", "true"),
                                port=29611)
    assert refused.returncode != 0
    assert "error: muon: true under DeepSpeed ZeRO needs max_grad_norm: 0" in refused.stdout + refused.stderr
    assert not (tmp_path / "clipped" / "manifest.json").exists()


def test_sft_then_reward_under_zero3_on_two_cpu_processes(tiny_pretrained, tiny_chat_data, tmp_path):
    """Full SFT, then a reward model from it, each a real 2-process DeepSpeed ZeRO-3 launch."""
    from test_reward import reward_argv
    from test_sft import sft_argv

    sft_out, rm_out = tmp_path / "sft", tmp_path / "rm"
    result = accelerate_launch("accelerate_configs/deepspeed_zero3.yaml", "recipes/sft/sft.py",
                               sft_argv(tiny_pretrained, tiny_chat_data["sft"], sft_out, "tiny.yaml",
                                        "--per_device_train_batch_size", "2"), port=29605)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "parameters trainable" in result.stdout
    sft_metrics = json.loads((sft_out / "metrics.json").read_text())
    assert sft_metrics["steps"] == 3 and sft_metrics["total_params"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_pretrained).parameters())
    assert "exact_match_after" in sft_metrics  # rank 0 reloaded the gathered model and generated with it

    result = accelerate_launch("accelerate_configs/deepspeed_zero3.yaml", "recipes/reward/reward.py",
                               reward_argv(sft_out, tiny_chat_data["preference"], rm_out,
                                           "tiny.yaml", "--per_device_train_batch_size", "2"), port=29606)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rm_metrics = json.loads((rm_out / "metrics.json").read_text())
    assert rm_metrics["steps"] == 4 and rm_metrics["pairwise_after"]["n"] > 0
    model, info = AutoModelForSequenceClassification.from_pretrained(rm_out, output_loading_info=True)
    assert not info["missing_keys"] and model.score.weight.abs().sum() > 0


LORA = ("--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj")


@pytest.mark.parametrize("policy,weights_file,ports", [
    pytest.param((), "model.safetensors", (29607, 29608), id="full"),
    pytest.param(LORA, "adapter_model.safetensors", (29611, 29612), id="lora"),
])
def test_ppo_under_zero2_and_zero3_on_two_cpu_processes_agree(policy, weights_file, ports, tiny_sft, tiny_reward,
                                                              tiny_chat_data, tmp_path):
    """ZeRO-3 gathers the partitioned policy for the rollouts and the critic's head for zeroing: the same seeded
    run under ZeRO-2 and ZeRO-3 (with activation checkpointing) logs the same rollouts and losses and saves the
    same weights (or adapter)."""
    from safetensors.torch import load_file
    from test_ppo import ppo_argv

    runs = {}
    for stage, port in zip(("zero2", "zero3"), ports):
        out = tmp_path / f"ppo_{stage}"
        argv = ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, *policy, "--num_mini_batches", "1",
                        "--eval_max_samples", "8", "--value_head_init", "zero", "--learning_rate", "1e-3",
                        "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2",
                        # recomputing activations (the 360M preset's setting) under ZeRO-3 changes no figure
                        "--activation_checkpointing", "true" if stage == "zero3" else "false")
        result = accelerate_launch(f"accelerate_configs/deepspeed_{stage}.yaml", "recipes/rl/ppo.py", argv, port=port)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert f"[ppo] DEEPSPEED ZeRO-{stage[-1]} on 2 process(es)" in result.stdout
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["updates"] == 2 and "after" in metrics  # 16 episodes / (4 rollouts x 2 processes)
        logs = [row for row in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss/value" in row]
        runs[stage] = logs, load_file(out / weights_file)

    (logs2, weights2), (logs3, weights3) = runs["zero2"], runs["zero3"]
    assert len(logs2) == len(logs3) == 2
    for row2, row3 in zip(logs2, logs3):
        for key in ("reward", "kl", "loss/value", "loss/policy", "response_length"):
            assert row3[key] == pytest.approx(row2[key], rel=1e-4, abs=1e-6), key
    # a zeroed critic head values every token 0, so the first value loss is 0.5 * mean(return^2) > 0 under both
    assert logs2[0]["loss/value"] > 0
    shared = [k for k in weights3 if k in weights2]  # ZeRO-2 also writes the tied lm_head of a full policy
    assert shared and all(torch.allclose(weights2[k], weights3[k], atol=1e-5) for k in shared)
    if weights_file == "model.safetensors":
        start = load_file(tiny_sft / "model.safetensors")
        assert any(not torch.equal(weights3[k], start[k]) for k in shared)  # the policy did train
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_zero3", output_loading_info=True)
        assert not info["missing_keys"]
    else:  # LoRA's B starts at zero: a trained adapter has moved it
        assert any(weights3[k].abs().max() > 0 for k in weights3 if "lora_B" in k)

    if weights_file == "model.safetensors":
        # Resumed from ZeRO-3's checkpoint-1 (the DeepSpeed engine restores its partitioned weights and optimizer
        # state), update 2 is the one the straight run made.
        out = tmp_path / "ppo_zero3"
        argv = ppo_argv(tiny_sft, tiny_reward, tiny_chat_data, out, *policy, "--num_mini_batches", "1",
                        "--eval_max_samples", "8", "--value_head_init", "zero", "--learning_rate", "1e-3",
                        "--resume_from_checkpoint", str(out / "checkpoint-1"))
        result = accelerate_launch("accelerate_configs/deepspeed_zero3.yaml", "recipes/rl/ppo.py", argv, port=29613)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        logs = [row for row in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss/value" in row]
        assert [row["episode"] for row in logs] == [row["episode"] for row in logs3]
        for row3, row in zip(logs3, logs):
            for key in ("reward", "kl", "loss/value", "loss/policy", "response_length"):
                assert row[key] == pytest.approx(row3[key], rel=1e-5, abs=1e-7), key
        resumed = load_file(out / weights_file)
        assert all(torch.allclose(resumed[k], weights3[k], atol=1e-6) for k in weights3)
