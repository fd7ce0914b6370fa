"""Every recipe YAML parses with its script's parser; presets have the sizes they claim;
accelerate configs hold hardware only; every command in the READMEs points at real files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT
from recipes.pretrain import pretrain
from recipes.pretrain.throughput import active_parameters

PRETRAIN_YAMLS = sorted((REPO_ROOT / "recipes/pretrain").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))

# (total, active) parameters in millions, with a 32,768-token vocabulary.
PRESET_SIZES = {
    "llama_125m_fineweb": (125, 125),
    "llama_350m_fineweb": (350, 350),
    "llama_1b_fineweb": (1000, 1000),
    "mixtral_8x125m_fineweb": (384, 125),
}


class FakeTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 32768


def parse_pretrain_yaml(path: Path):
    # bf16 needs a GPU; the CPU check of the presets overrides only that.
    return pretrain.parse_args(["--config", str(path), "--bf16", "false"])


@pytest.mark.parametrize("path", PRETRAIN_YAMLS, ids=lambda p: p.name)
def test_pretrain_yaml_parses(path):
    script_args, training_args, arch_args = parse_pretrain_yaml(path)
    assert training_args.lr_scheduler_type == "cosine" and training_args.max_grad_norm > 0
    assert training_args.report_to in ([], "none", ["none"]) and not training_args.push_to_hub
    assert Path(training_args.output_dir).parts[0] == "outputs"


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_real_preset_parameter_counts_on_meta_device(name):
    _, _, arch_args = parse_pretrain_yaml(REPO_ROOT / f"recipes/pretrain/{name}.yaml")
    config = pretrain.build_config(arch_args, FakeTokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters()) / 1e6
    active = active_parameters(model) / 1e6
    expected_total, expected_active = PRESET_SIZES[name]
    assert total == pytest.approx(expected_total, rel=0.1)
    assert active == pytest.approx(expected_active, rel=0.15)


def test_key_from_another_model_family_is_refused():
    _, _, arch_args = parse_pretrain_yaml(REPO_ROOT / "recipes/pretrain/tiny.yaml")
    arch_args.num_local_experts = 4
    from data_prep.artifacts import UserError

    with pytest.raises(UserError, match="num_local_experts does not apply to model_type 'llama'"):
        pretrain.build_config(arch_args, FakeTokenizer())


@pytest.mark.parametrize("where", ["yaml", "command line"])
def test_hub_token_as_a_setting_is_refused_without_echoing_it(where, tmp_path):
    from data_prep.artifacts import UserError

    config = tmp_path / "with_token.yaml"
    text = (REPO_ROOT / "recipes/pretrain/tiny.yaml").read_text()
    extra = []
    if where == "yaml":
        text += "\nhub_token: hf_secret_value\n"
    else:
        extra = ["--hub_token", "hf_secret_value"]
    config.write_text(text)
    with pytest.raises(UserError, match=r"hub_token: give the Hub token through HF_TOKEN") as refused:
        pretrain.parse_args(["--config", str(config), *extra])
    assert "hf_secret_value" not in str(refused.value)


SFT_YAMLS = sorted((REPO_ROOT / "recipes/sft").glob("*.yaml"))
REWARD_YAMLS = sorted((REPO_ROOT / "recipes/reward").glob("*.yaml"))


@pytest.mark.parametrize("path", SFT_YAMLS + REWARD_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_post_training_yaml_parses_and_builds_its_peft_config(path):
    from recipes.peft_methods import build_peft_config
    from recipes.reward import reward
    from recipes.sft import sft

    module = sft if path.parent.name == "sft" else reward
    argv = ["--config", str(path), "--bf16", "false"]
    if "load_in_4bit" in path.read_text():
        argv += ["--load_in_4bit", "false"]  # bitsandbytes config needs CUDA; the PEFT part is checked
    script_args, training_args, model_args, peft_args = module.parse_args(argv)
    assert training_args.report_to in ([], "none", ["none"]) and not training_args.push_to_hub
    assert Path(training_args.output_dir).parts[0] == "outputs"
    assert training_args.lr_scheduler_type == "cosine" and training_args.max_grad_norm > 0
    if path.name.startswith("tiny"):  # TRL defaults it on; recomputing costs 20-27% of a step (recipes/sft/README.md)
        assert not training_args.activation_checkpointing
    if module is sft:
        assert training_args.assistant_only_loss, "SFT trains on assistant turns only"
        template = training_args.chat_template_path
        assert template is None or (REPO_ROOT / template).is_file()
    peft_config = build_peft_config(model_args, peft_args)
    assert (peft_config is None) == (not model_args.use_peft)
    if module is reward and peft_config is not None:
        assert peft_config.task_type == "SEQ_CLS"


EVAL_YAMLS = sorted(p for p in (REPO_ROOT / "recipes/eval").glob("*.yaml") if not p.name.startswith("report"))


@pytest.mark.parametrize("path", EVAL_YAMLS, ids=lambda p: p.name)
def test_eval_yaml_parses_and_names_known_metrics(path):
    from recipes.eval import eval as eval_recipe

    (args,) = eval_recipe.parse_args(["--config", str(path)])
    assert args.metrics and set(args.metrics) <= set(eval_recipe.METRICS)
    assert Path(args.output_dir).parts[0] == "outputs" and not args.trust_remote_code
    if "win_rate" in args.metrics:
        assert args.compare_model_name_or_path and args.reward_model_name_or_path


HYPERPARAMETER_KEYS = {"learning_rate", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                       "train_micro_batch_size_per_gpu", "max_steps", "bf16", "fp16", "optimizer", "scheduler"}


def _all_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _all_keys(value)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_hardware_only(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert not HYPERPARAMETER_KEYS & set(_all_keys(yaml.safe_load(path.read_text())))


def test_expected_accelerate_configs_exist():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"cpu", "cpu_2proc", "single_gpu", "multi_gpu", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
            "zero3_offload", "fsdp2", "multi_node"} <= names
    multi_node = (REPO_ROOT / "accelerate_configs/multi_node.yaml").read_text()
    for documented in ("machine_rank", "main_process_ip", "num_machines"):
        assert re.search(rf"#.*{documented}", multi_node), documented


def _readme_commands():
    for readme in [REPO_ROOT / "README.md", REPO_ROOT / "data_prep/README.md", *REPO_ROOT.glob("recipes/**/*.md")]:
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    yield readme.relative_to(REPO_ROOT), line
        for line in re.findall(r"`((?:accelerate launch|python -m|python|bash) [^`]+)`", readme.read_text()):
            yield readme.relative_to(REPO_ROOT), line


def test_readme_commands_point_at_existing_files():
    checked = 0
    for readme, command in _readme_commands():
        for token in shlex.split(command):
            if re.search(r"\.(ya?ml|py|sh|ipynb)$", token) and "/" in token:
                assert (REPO_ROOT / token).is_file(), f"{readme}: {command} -> missing {token}"
                checked += 1
        module = re.search(r"python -m ((?:data_prep|recipes)\.[\w.]+)", command)
        if module:
            assert (REPO_ROOT / (module.group(1).replace(".", "/") + ".py")).is_file(), f"{readme}: {command}"
            checked += 1
    assert checked >= 10
