"""What the SFT, reward, DPO, pretraining and evaluation recipes refuse before they train or write: numbers no
run can use, an output_dir that is one of the run's inputs, and models or tokenizers that do not fit together.
Each is one line, and a finished output (or an input) is left as it was."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO_ROOT, pretrain_argv
from data_prep.artifacts import UserError
from recipes.eval import eval as eval_recipe
from recipes.pretrain import pretrain
from recipes.reward import reward
from recipes.rl import dpo, grpo, ppo, rloo
from recipes.sft import sft

RL = {"ppo": ppo, "grpo": grpo, "rloo": rloo, "dpo": dpo}
TRAINING = {"sft": (sft, "recipes/sft/tiny.yaml"), "reward": (reward, "recipes/reward/tiny.yaml"),
            "dpo": (dpo, "recipes/rl/dpo_tiny.yaml"), "pretrain": (pretrain, "recipes/pretrain/tiny.yaml")}


@pytest.mark.parametrize("recipe", list(TRAINING))
@pytest.mark.parametrize("flags, message", [
    (("--per_device_train_batch_size", "0"), "per_device_train_batch_size must be >= 1, got 0"),
    (("--per_device_eval_batch_size", "0"), "per_device_eval_batch_size must be >= 1, got 0"),
    (("--gradient_accumulation_steps", "0"), "gradient_accumulation_steps must be >= 1, got 0"),  # ZeroDivisionError
    (("--learning_rate", "-1"), "learning_rate must be >= 0, got -1.0"),
    (("--max_steps", "0"), "max_steps must be >= 1, or -1 to train num_train_epochs epochs; got 0"),  # 1 step
    (("--max_steps", "-1", "--num_train_epochs", "0"), "num_train_epochs must be > 0 (or set max_steps), got 0.0"),
])
def test_training_numbers_no_run_can_use_stop_while_parsing(recipe, flags, message):
    module, config = TRAINING[recipe]
    with pytest.raises(UserError) as err:
        module.parse_args(["--config", str(REPO_ROOT / config), *flags])
    assert str(err.value) == message


@pytest.mark.parametrize("module, config, flags, message", [
    *[(module, config, ("--max_length", "0"), "max_length must be >= 1, got 0")  # refused after the model loaded
      for name, (module, config) in TRAINING.items() if name != "pretrain"],  # pretraining's length is block_size
    (sft, "recipes/sft/tiny.yaml", ("--eval_max_new_tokens", "0"), "eval_max_new_tokens must be >= 1, got 0"),
    (sft, "recipes/sft/tiny.yaml", ("--eval_max_samples", "0"), "eval_max_samples must be >= 1, got 0"),
    (pretrain, "recipes/pretrain/tiny.yaml", ("--peak_tflops", "0"), "peak_tflops must be > 0, got 0.0"),
    (pretrain, "recipes/pretrain/tiny.yaml", ("--max_eval_samples", "0"), "max_eval_samples must be >= 1, got 0"),
    (eval_recipe, "recipes/eval/tiny.yaml", ("--max_new_tokens", "0"), "max_new_tokens must be >= 1, got 0"),
    (eval_recipe, "recipes/eval/tiny.yaml", ("--stride", "0"), "stride must be >= 1, got 0"),
    (eval_recipe, "recipes/eval/tiny.yaml", ("--win_rate_max_samples", "-2"), "win_rate_max_samples must be >= 1, "
                                                                                "got -2"),
    (eval_recipe, "recipes/eval/tiny.yaml", ("--bleu_tokenize", "zh-cn"),  # sacrebleu's KeyError after generating
     "bleu_tokenize: unknown sacrebleu tokenizer 'zh-cn' (use one of none, zh, 13a, intl, char, ja-mecab, ko-mecab, "
     "spm, flores101, flores200, spBLEU-1K)"),
    # PEFT numbers PEFT raised only after the model loaded, or took without a word (lora_alpha 0 zeroes LoRA)
    (sft, "recipes/sft/tiny_lora.yaml", ("--lora_r", "0"), "lora_r must be >= 1, got 0"),
    (sft, "recipes/sft/tiny_lora.yaml", ("--lora_alpha", "0"), "lora_alpha must be > 0, got 0"),
    (sft, "recipes/sft/tiny_lora.yaml", ("--lora_dropout", "1.5"), "lora_dropout must be < 1, got 1.5"),
    (sft, "recipes/sft/tiny_bottleneck.yaml", ("--bottleneck_size", "0"), "bottleneck_size must be >= 1, got 0"),
    (sft, "recipes/sft/tiny_bottleneck.yaml", ("--bottleneck_non_linearity", "tanh"),
     "bottleneck_non_linearity must be one of relu, gelu, silu, got 'tanh'"),
    (sft, "recipes/sft/tiny_lora.yaml", ("--lora_task_type", "SEQ_CLS"),
     "lora_task_type: the sft recipe trains a causal language model, so its adapter's task type is CAUSAL_LM; got "
     "'SEQ_CLS'"),
    (reward, "recipes/reward/tiny_lora.yaml", ("--lora_dropout", "0.1"),  # TRL zeroes it: recorded, never applied
     "lora_dropout 0.1: disable_dropout is true, so the reward trainer sets every dropout to 0, the adapter's "
     "included; set lora_dropout: 0 or disable_dropout: false"),
    (sft, "recipes/sft/tiny.yaml", ("--padding_free", "true"),  # SFTTrainer's ValueError after the model loads
     "padding_free: without packing, TRL does not enforce max_length; set packing: true, or padding_free: false"),
    (sft, "recipes/sft/tiny.yaml", ("--completion_only_loss", "true"),  # the collator's, at the first batch
     "completion_only_loss: the recipe's data are conversations (messages), which TRL does not split into prompt "
     "and completion; use assistant_only_loss: true"),
    (sft, "recipes/sft/tiny.yaml", ("--merge_adapter", "true"),  # refused after the model had loaded
     "merge_adapter: only LoRA adapters can be merged into the base weights"),
    *[(module, config, ("--seed", "-1"), "seed must be in [0, 2**32 - 1], got -1")  # set_seed, after the loads
      for module, config in TRAINING.values()],
    (pretrain, "recipes/pretrain/tiny.yaml", ("--muon", "true", "--muon_momentum", "1.5"),
     "muon_momentum must be < 1, got 1.5"),
    (pretrain, "recipes/pretrain/tiny.yaml", ("--muon_learning_rate", "0.5"),  # AdamW would train without it
     "muon_learning_rate is only read with muon: true, but muon is false"),
    # NaN or inf passed the per-function finite check, then turned every score NaN: a NaN policy published
    (ppo, "recipes/rl/ppo_tiny.yaml", ("--reward_weights", "nan"), "reward_weights must be finite, got [nan]"),
    (ppo, "recipes/rl/ppo_tiny.yaml", ("--missing_eos_penalty", "inf"), "missing_eos_penalty must be finite, got inf"),
    # checked after the policy, critic and reward model had loaded
    (ppo, "recipes/rl/ppo_tiny.yaml", ("--reward_weights", "1.0", "0.5", "2.0"),
     "reward_weights has 3 value(s) for 2 reward function(s) (reward_model, correctness_reward)"),
    (ppo, "recipes/rl/ppo_tiny.yaml", ("--reward_model_path", "", "--correctness_reward", "false"),
     "no reward: set reward_model_path and/or correctness_reward: true"),
    (grpo, "recipes/rl/grpo_tiny.yaml", ("--reward_weights", "1.0", "0.5", "2.0"),
     "reward_weights has 3 value(s) for 2 reward function(s) (reward_model, correctness_reward)"),
    # GRPO/RLOO sampling: top_p 0 samples greedily (a group of equal replies, every advantage 0), top_p 1.5 is
    # ignored, a negative top_k or repetition_penalty 0 fails at the first rollout
    *[(module, f"recipes/rl/{name}_tiny.yaml", flags, message) for name, module in (("grpo", grpo), ("rloo", rloo))
      for flags, message in ((("--top_p", "0"), "top_p must be > 0, got 0.0"),
                             (("--top_p", "1.5"), "top_p must be <= 1, got 1.5"),
                             (("--top_k", "-3"), "top_k must be >= 0, got -3"),
                             (("--repetition_penalty", "0"), "repetition_penalty must be > 0, got 0.0"),
                             (("--min_p", "2"), "min_p must be <= 1, got 2.0"),
                             (("--epsilon", "-1"), "epsilon must be >= 0, got -1.0"))],
])
def test_script_numbers_no_run_can_use_stop_while_parsing(module, config, flags, message):
    with pytest.raises(UserError) as err:
        module.parse_args(["--config", str(REPO_ROOT / config), *flags])
    assert str(err.value) == message


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_an_output_dir_that_is_an_input_is_refused_and_the_input_kept(tiny_data, tiny_pretrained, tiny_sft,
                                                                       tiny_chat_data, tmp_path):
    """Each of these deleted its input before: a stage replaces its whole output directory."""
    cases = [
        (sft, ["--config", str(REPO_ROOT / "recipes/sft/tiny.yaml"), "--model_name_or_path", str(tiny_pretrained),
               "--dataset_path", str(tiny_chat_data["sft"]), "--output_dir", str(tiny_chat_data["sft"])],
         "dataset_path", tiny_chat_data["sft"]),
        (reward, ["--config", str(REPO_ROOT / "recipes/reward/tiny.yaml"), "--model_name_or_path", str(tiny_sft),
                  "--dataset_path", str(tiny_chat_data["preference"]), "--output_dir", str(tiny_sft)],
         "model_name_or_path", tiny_sft),
        (pretrain, pretrain_argv(tiny_data, tiny_data["packed"]), "dataset_path", tiny_data["packed"]),
        (eval_recipe, ["--config", str(REPO_ROOT / "recipes/eval/tiny.yaml"), "--model_name_or_path",
                       str(tiny_sft), "--output_dir", str(tiny_sft)], "model_name_or_path", tiny_sft),
    ]
    for name in ("ppo", "grpo", "rloo", "dpo"):  # the RL recipes had no such check: the SFT policy was replaced
        cases.append((RL[name], ["--config", str(REPO_ROOT / f"recipes/rl/{name}_tiny.yaml"), "--model_name_or_path",
                                 str(tiny_sft), "--output_dir", str(tiny_sft)], "model_name_or_path", tiny_sft))
    for module, argv, key, path in cases:
        before = _listing(path)
        with pytest.raises(UserError) as err:
            module.main(*module.parse_args(argv))
        assert str(err.value).startswith(f"output_dir {path} is {key} {path}: a stage replaces its whole output")
        assert _listing(path) == before


def test_an_output_dir_that_is_not_an_earlier_output_of_the_recipe_is_refused_and_kept(tiny_pretrained, tiny_sft,
                                                                                      tiny_chat_data, tmp_path):
    """Evaluating into another stage's output deleted its model; a training run published over any folder."""
    other_stage = tmp_path / "pretrained_copy"
    shutil.copytree(tiny_pretrained, other_stage)
    users = tmp_path / "notes"
    users.mkdir()
    (users / "todo.txt").write_text("mine\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    evaluate = ["--config", str(REPO_ROOT / "recipes/eval/tiny.yaml"), "--model_name_or_path", str(tiny_sft),
                "--metrics", "perplexity", "--text_dataset_path", str(tiny_chat_data["sft"]), "--max_texts", "2"]
    fine_tune = ["--config", str(REPO_ROOT / "recipes/sft/tiny.yaml"), "--model_name_or_path", str(tiny_pretrained),
                 "--dataset_path", str(tiny_chat_data["sft"])]
    for module, argv, output_dir, message in (
            (eval_recipe, evaluate, other_stage, "holds the output of stage 'pretrain', which this eval stage would replace"),
            (eval_recipe, evaluate, a_file, "is a file"),  # it failed with a traceback once every metric was done
            (sft, fine_tune, users, "is not an earlier sft output (it has no manifest.json) and holds todo.txt"),
            (sft, fine_tune, tiny_sft.parent, "is not an earlier sft output (it has no manifest.json) and holds sft"),
            (reward, ["--config", str(REPO_ROOT / "recipes/reward/tiny.yaml"), "--model_name_or_path", str(tiny_sft),
                      "--dataset_path", str(tiny_chat_data["preference"])], tmp_path / "pretrained_copy",
             "holds the output of stage 'pretrain', which this reward stage would replace")):
        before = _listing(output_dir) if output_dir.is_dir() else None
        with pytest.raises(UserError) as err:
            module.main(*module.parse_args([*argv, "--output_dir", str(output_dir)]))
        assert str(err.value).startswith(f"output_dir {output_dir} {message}")
        assert (_listing(output_dir) if output_dir.is_dir() else None) == before


def _without_chat_template(model_dir, copy):
    shutil.copytree(model_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return copy


def test_a_tokenizer_the_model_cannot_read_is_one_line(tiny_pretrained, tiny_chat_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.common import load_pretrained

    wide = tmp_path / "wide_tokenizer"
    shutil.copytree(tiny_pretrained, wide)
    tokenizer = AutoTokenizer.from_pretrained(wide)
    size = len(tokenizer)
    tokenizer.add_tokens([f"<|new{i}|>" for i in range(8)])
    tokenizer.save_pretrained(wide)
    with pytest.raises(UserError) as err:
        load_pretrained(str(wide), AutoModelForCausalLM)
    assert str(err.value).startswith(f"{wide}: the tokenizer has {size + 8} tokens and the model's embedding ")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_pretrained, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError, match=f"^{truncated}: "):
        load_pretrained(str(truncated), AutoModelForCausalLM)

    untemplated = _without_chat_template(tiny_pretrained, tmp_path / "no_template")
    for module, config_file, data in ((sft, "recipes/sft/tiny.yaml", tiny_chat_data["sft"]),
                                      (reward, "recipes/reward/tiny.yaml", tiny_chat_data["preference"])):
        with pytest.raises(UserError, match=f"^{untemplated}: the tokenizer has no chat template"):
            module.main(*module.parse_args(["--config", str(REPO_ROOT / config_file), "--model_name_or_path",
                                            str(untemplated), "--dataset_path", str(data), "--output_dir",
                                            str(tmp_path / "out"), "--assistant_only_loss", "false"]
                                           if module is sft else
                                           ["--config", str(REPO_ROOT / config_file), "--model_name_or_path",
                                            str(untemplated), "--dataset_path", str(data), "--output_dir",
                                            str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_pretraining_refuses_another_tokenizer_and_a_resume_of_another_architecture(tiny_data, tmp_path):
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_data["tokenizer"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * len(manifest["fingerprint"])
    (other / "manifest.json").write_text(json.dumps(manifest))
    argv = pretrain_argv(tiny_data, tmp_path / "run", "--max_steps", "2", "--save_steps", "1",
                         "--eval_on_start", "false")
    with pytest.raises(UserError, match=f"^tokenizer_path: {other} is not the tokenizer that packed "):
        pretrain.main(*pretrain.parse_args([*argv, "--tokenizer_path", str(other)]))
    assert not (tmp_path / "run").exists()

    pretrain.main(*pretrain.parse_args(argv))
    hidden = json.loads((tmp_path / "run" / "config.json").read_text())["hidden_size"]
    with pytest.raises(UserError) as err:
        pretrain.main(*pretrain.parse_args([*argv, "--resume_from_checkpoint", "true", "--hidden_size",
                                            str(hidden * 2)]))
    assert str(err.value) == (f"resume_from_checkpoint: {tmp_path / 'run' / 'checkpoint-2'} holds a model with "
                              f"hidden_size {hidden}, and the settings build {hidden * 2}; resume with the "
                              "checkpointed run's architecture")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    for flags, message in ((("--rope_theta", "1234.0"), "holds a model with rope_parameters "),
                           (("--muon", "true"), "was trained with optimizer adamw_torch"),  # param groups differ
                           (("--learning_rate", "0.5"), "was trained with learning_rate ")):  # restored, ignored
        with pytest.raises(UserError, match=f"^resume_from_checkpoint: {checkpoint} {message}"):
            pretrain.main(*pretrain.parse_args([*argv, "--resume_from_checkpoint", "true", *flags]))
    assert (tmp_path / "run" / "manifest.json").is_file()  # the finished run is left as it was


@pytest.mark.parametrize("flags, message", [
    (("--hidden_size", "31"), "hidden_size 31 must be a multiple of num_attention_heads 2"),  # a config validator
    (("--num_attention_heads", "4", "--num_key_value_heads", "3"),  # built, then a shape error in the first forward
     "num_attention_heads 4 must be a multiple of num_key_value_heads 3 (each key/value head serves a group)"),
    (("--num_attention_heads", "0"), "num_attention_heads must be >= 1, got 0"),  # ZeroDivisionError
    (("--intermediate_size", "-1"), "intermediate_size must be >= 1, got -1"),  # "negative dimension"
    (("--num_hidden_layers", "0"), "num_hidden_layers must be >= 1, got 0"),  # a model of embeddings alone
    (("--model_type", "mixtral", "--num_local_experts", "2", "--num_experts_per_tok", "4"),
     "num_experts_per_tok 4 is more than num_local_experts 2"),
])
def test_an_architecture_no_model_can_have_stops_while_parsing(flags, message, tiny_data, tmp_path):
    with pytest.raises(UserError) as err:
        pretrain.parse_args(pretrain_argv(tiny_data, tmp_path / "run", *flags))
    assert str(err.value) == message


@pytest.mark.parametrize("flags, message", [
    (("--model_type", "t5"), "key model_type: 't5' has no causal LM class in transformers (an encoder or "
                             "encoder-decoder family); pretraining builds AutoModelForCausalLM"),
    (("--attn_implementation", "flash"), "key attn_implementation: unknown 'flash' (one of eager, "),
    (("--attn_implementation", "flash_attention_2"), "attn_implementation 'flash_attention_2': FlashAttention2 "),
    # settings a family has no field for built nothing, while the manifest recorded them as the architecture
    (("--model_type", "gpt2", "--intermediate_size", "999"),
     "key intermediate_size does not apply to model_type 'gpt2' (GPT2Config has no such setting)"),
])
def test_a_family_or_attention_that_cannot_be_built_is_one_line(flags, message, tiny_data, tmp_path):
    if "flash_attention_2" in flags:
        import importlib.util
        if importlib.util.find_spec("flash_attn"):
            pytest.skip("flash-attn is installed here")
    with pytest.raises(UserError) as err:
        pretrain.main(*pretrain.parse_args(pretrain_argv(tiny_data, tmp_path / "run", *flags)))
    assert str(err.value).startswith(message)
    assert not (tmp_path / "run").exists()


def test_an_encoder_family_is_built_as_a_decoder(tiny_data):
    """BERT-like configs attend both ways unless is_decoder is set: next-token loss would read the answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_prep.train_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_data["tokenizer"]))
    config = pretrain.build_config(pretrain.ArchitectureArguments(
        model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), tokenizer)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 50, (1, 10))
    changed_last = tokens.clone()
    changed_last[0, -1] = (tokens[0, -1] + 1) % 50
    assert torch.allclose(model(tokens).logits[0, :-1], model(changed_last).logits[0, :-1])


@pytest.mark.parametrize("recipe, why", [("sft", "no assistant token left after truncation"),
                                         ("reward", "a side longer than max_length"),
                                         ("dpo", "the prompt alone fills max_length, so no reply token is left")])
def test_rows_trl_drops_at_max_length_are_counted_and_an_emptied_split_refused(recipe, why, tiny_sft, tiny_chat_data,
                                                                               tmp_path, capsys):
    """TRL drops these rows without a word; every one dropped stopped Trainer with an IndexError (SFT, reward)
    or a ValueError (DPO)."""
    module, config = TRAINING[recipe]
    data = tiny_chat_data["sft" if recipe == "sft" else "preference"]
    base = ["--config", str(REPO_ROOT / config), "--model_name_or_path", str(tiny_sft), "--dataset_path", str(data),
            "--disable_tqdm", "true"]
    from datasets import load_from_disk
    rows = len(load_from_disk(str(data))["train"])
    no_eval = {"sft": "--eval_exact_match", "reward": "--eval_pairwise_accuracy", "dpo": "--eval_policy"}[recipe]
    base += [no_eval, "false"]
    with pytest.raises(UserError) as err:
        module.main(*module.parse_args([*base, "--output_dir", str(tmp_path / "empty"), "--max_length", "4"]))
    assert str(err.value) == f"max_length 4: all {rows} train rows were dropped ({why}); raise max_length"
    assert not list((tmp_path / "empty").glob("*"))  # Trainer makes the directory; nothing is written in it

    partial = {"sft": "40", "reward": "64", "dpo": "36"}[recipe]  # DPO: the median prompt here is 36 tokens
    module.main(*module.parse_args([*base, "--output_dir", str(tmp_path / "partial"), "--max_length", partial,
                                    "--max_steps", "1", "--eval_strategy", "no"]))
    logged = [line for line in capsys.readouterr().out.splitlines() if "rows dropped" in line]
    assert len(logged) == 1 and logged[0].endswith(f" of {rows} train rows dropped at max_length {partial} ({why})")


def test_a_judge_without_a_trained_score_head_is_refused(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """Such a judge loads with a fresh random head: the SFT model's reward_accuracy came out 0.5."""
    hub_like = tmp_path / "causal_lm_without_manifest"
    shutil.copytree(tiny_sft, hub_like)
    (hub_like / "manifest.json").unlink()
    unnamed = tmp_path / "causal_lm_without_architectures"  # the config that named its class was all we read
    shutil.copytree(hub_like, unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["architectures"]
    (unnamed / "config.json").write_text(json.dumps(config))
    base = ["--config", str(REPO_ROOT / "recipes/eval/tiny.yaml"), "--model_name_or_path", str(tiny_sft),
            "--metrics", "reward_accuracy", "--preference_dataset_path", str(tiny_chat_data["preference"])]
    fresh = "(its score head would be untrained: score.weight not in its weights)"
    for judge, message in (
            (tiny_sft, f"{tiny_sft} is a sft output, not a reward model (its score head would be untrained)"),
            (hub_like, f"{hub_like} is a LlamaForCausalLM, not a trained sequence classifier {fresh}"),
            (unnamed, f"{unnamed} is a model without architectures, not a trained sequence classifier {fresh}")):
        with pytest.raises(UserError) as err:
            eval_recipe.main(*eval_recipe.parse_args([*base, "--reward_model_name_or_path", str(judge),
                                                      "--output_dir", str(tmp_path / "eval")]))
        assert str(err.value).startswith(f"reward_model_name_or_path: {message}")
        assert not (tmp_path / "eval" / "manifest.json").exists()
    from recipes.rl.rewards import RewardModelScorer  # GRPO, RLOO, PPO and DPO's scorer
    with pytest.raises(UserError, match=f"^reward_model_path: {tiny_sft} is a sft output, not a reward model"):
        RewardModelScorer(str(tiny_sft))
    hub_reward = tmp_path / "reward_model_without_manifest"  # a Hub reward model: judged by its weights alone
    shutil.copytree(tiny_reward, hub_reward)
    (hub_reward / "manifest.json").unlink()
    for judge, out in ((tiny_reward, "eval"), (hub_reward, "eval_hub")):
        eval_recipe.main(*eval_recipe.parse_args([*base, "--reward_model_name_or_path", str(judge),
                                                  "--output_dir", str(tmp_path / out)]))
        assert (tmp_path / out / "manifest.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (("--no_such_flag", "3", "--other=2"), "command line: unknown flag(s) --no_such_flag, --other"),
    (("stray",), "command line: arguments that are no flag's value: ['stray']"),
    (("--learning_rate", "abc"), "command line: argument --learning_rate/--learning-rate: invalid float value: "
                                 "'abc'"),
])
def test_a_bad_flag_is_reported_against_the_command_line_not_the_yaml(flags, message):
    """The YAML's keys and values are checked against the file first; these were blamed on it."""
    with pytest.raises(UserError) as err:
        sft.parse_args(["--config", str(REPO_ROOT / "recipes/sft/tiny.yaml"), *flags])
    assert str(err.value) == message


def test_a_yaml_value_outside_a_fields_choices_names_file_line_and_key(tmp_path):
    """argparse checks `choices` on the command line only: `zeros` from a YAML kept the reward model's value
    head in PPO's critic without a word, while the manifest recorded `zeros`."""
    config = tmp_path / "ppo.yaml"
    config.write_text((REPO_ROOT / "recipes/rl/ppo_tiny.yaml").read_text() + "value_head_init: zeros\n")
    line = len(config.read_text().splitlines())
    with pytest.raises(UserError) as err:
        ppo.parse_args(["--config", str(config)])
    assert str(err.value) == f"{config}:{line}: key value_head_init: expected one of reward_model, zero, got 'zeros'"
    config.write_text((REPO_ROOT / "recipes/sft/tiny.yaml").read_text().replace(
        "train_sampling_strategy: group_by_length", "train_sampling_strategy: by_length"))
    with pytest.raises(UserError, match=r":\d+: key train_sampling_strategy: expected one of random, sequential, "):
        sft.parse_args(["--config", str(config)])


@pytest.mark.parametrize("flags, message", [
    (("--batch_size", "0"), "batch_size must be >= 1, got 0"),
    (("--seq_len", "0"), "seq_len must be >= 2, got 0"),  # a reshape RuntimeError
    (("--vocab_size", "0"), "vocab_size must be >= 3, got 0"),  # an IndexError
    (("--seed", "-1"), "seed must be in [0, 2**32 - 1], got -1"),
])
def test_benchmark_numbers_no_run_can_use_are_one_line(flags, message):
    from data_prep.artifacts import parse_config
    from recipes.pretrain import benchmark

    with pytest.raises(UserError) as err:
        benchmark.main(*parse_config([benchmark.BenchmarkArguments, pretrain.ArchitectureArguments], list(flags)))
    assert str(err.value) == message


def test_a_reward_adapter_is_a_sequence_classifier_and_records_the_dropout_it_gets():
    """`--use_peft true` on the reward recipe took TRL's CAUSAL_LM task type and crashed inside the trainer;
    ModelConfig's default dropout 0.05 was recorded though the trainer zeroes it."""
    _, training_args, model_args, _ = reward.parse_args(["--config", str(REPO_ROOT / "recipes/reward/tiny.yaml"),
                                                         "--use_peft", "true"])
    assert (model_args.lora_task_type, model_args.lora_dropout, training_args.disable_dropout) == ("SEQ_CLS", 0.0, True)
    with pytest.raises(UserError, match="^lora_task_type: the reward recipe trains a sequence classifier, so its "
                                        "adapter's task type is SEQ_CLS; got 'TOKEN_CLS'$"):
        reward.parse_args(["--config", str(REPO_ROOT / "recipes/reward/tiny.yaml"), "--use_peft", "true",
                           "--lora_task_type", "TOKEN_CLS"])


def test_peft_targets_that_are_not_adaptable_layers_are_one_line():
    """A one-item list reaches us as a string (TRL's ModelConfig), which skipped the check: PEFT's
    NoMatchingPeftModuleError; a block such as self_attn made PEFT print the whole module tree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes.peft_methods import check_target_modules

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UserError, match="^lora_target_modules: q_projx not found in LlamaForCausalLM"):
        check_target_modules(model, ["q_projx"], "lora")
    check_target_modules(model, ["model.layers.0.self_attn.q_proj", "v_proj"], "lora")  # PEFT takes whole names too
    with pytest.raises(UserError, match="^lora_target_modules: self_attn in LlamaForCausalLM are not layers lora can "
                                        "adapt .*; its linear layers are down_proj, gate_proj, k_proj"):
        check_target_modules(model, ["q_proj", "self_attn"], "lora")
    check_target_modules(model, ["mlp"], "bottleneck")  # bottleneck adapters wrap blocks
    check_target_modules(model, ".*proj", "lora")  # a regex is PEFT's to resolve
    # TRL turns a one-item list into a string, which PEFT would read as a regex of whole names (matching nothing)
    _, _, model_args, _ = sft.parse_args(["--config", str(REPO_ROOT / "recipes/sft/tiny_lora.yaml"),
                                          "--lora_target_modules", "q_proj"])
    assert model_args.lora_target_modules == ["q_proj"]


def test_a_damaged_list_of_the_replaced_runs_files_stops_before_any_work(tmp_path):
    """publish read it with json.loads after the whole run; an entry "" would have deleted output_dir."""
    from recipes.common import PREVIOUS_FINAL_NAME, claim_run_dir, previous_final_names

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / PREVIOUS_FINAL_NAME).write_text('["model.safetens')
    with pytest.raises(UserError, match=f"^{out / PREVIOUS_FINAL_NAME}: damaged \\(not a JSON list of names\\)"):
        claim_run_dir(str(out), "sft", {})
    (out / PREVIOUS_FINAL_NAME).write_text(json.dumps(["", ".", "..", "../elsewhere", "adapter_model.safetensors"]))
    assert previous_final_names(out) == {"adapter_model.safetensors"}


def test_a_test_split_that_is_the_training_split_is_refused(tiny_chat_data):
    from recipes.common import load_splits

    with pytest.raises(UserError, match="^dataset_test_split: train is also the training split"):
        load_splits(str(tiny_chat_data["sft"]), "train", "train", lambda rows, name: None)


def test_rl_prompt_splits_and_rows_that_cannot_work_are_one_line(tiny_chat_data):
    from datasets import Dataset

    from recipes.rl.prompts import load_prompts, to_prompt_dataset

    data = str(tiny_chat_data["sft"])
    with pytest.raises(UserError, match="^dataset_test_split: test is also the training split, so the held-out "):
        load_prompts(data, "test", "test")  # the policy would be scored on the prompts it trained on
    with pytest.raises(UserError, match="^dataset_train_split: name the split of training prompts"):
        load_prompts(data, "none", "test")  # an AttributeError after every model had loaded
    for messages in ("hello", ["hi", "there"]):  # an AttributeError traceback
        with pytest.raises(UserError, match="^prompts: row 0: field 'messages' must be a list of messages"):
            to_prompt_dataset(Dataset.from_list([{"messages": messages}]), "prompts")


def test_ppo_replies_longer_than_the_policys_context_are_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    positions = json.loads((tiny_sft / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(UserError) as err:
        ppo.main(*ppo.parse_args(["--config", str(REPO_ROOT / "recipes/rl/ppo_tiny.yaml"), "--model_name_or_path",
                                  str(tiny_sft), "--reward_model_path", str(tiny_reward), "--dataset_path",
                                  str(tiny_chat_data["sft"]), "--response_length", str(positions),
                                  "--output_dir", str(tmp_path / "ppo")]))
    assert str(err.value) == (f"response_length {positions} and a prompt do not fit max_position_embeddings "
                              f"{positions} of {tiny_sft}")
    assert not (tmp_path / "ppo").exists()


def test_generation_stops_at_eos_where_it_is_also_the_unknown_token():
    """GPT-2's <|endoftext|> is eos, bos and unk at once: filtering unk dropped the only stop id, so replies ran
    to max_new_tokens and PPO penalised every one as unfinished."""
    from types import SimpleNamespace

    from recipes.eval.generation import stop_token_ids

    gpt2_like = SimpleNamespace(eos_token_id=50256, unk_token_id=50256, name_or_path="gpt2",
                                convert_tokens_to_ids=lambda token: 50256)  # unknown markers come back as unk
    assert stop_token_ids(gpt2_like) == [50256]
    no_stop = SimpleNamespace(eos_token_id=None, unk_token_id=0, name_or_path="bare", convert_tokens_to_ids=lambda t: 0)
    with pytest.raises(UserError, match="^bare: the tokenizer has no eos token and no <|end|> marker to stop at$"):
        stop_token_ids(no_stop)


def test_ppo_from_a_model_without_a_chat_template_is_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """The rollouts render every prompt with the chat template: a ValueError once all four models had loaded."""
    untemplated = _without_chat_template(tiny_sft, tmp_path / "no_template")
    with pytest.raises(UserError) as err:
        ppo.main(*ppo.parse_args(["--config", str(REPO_ROOT / "recipes/rl/ppo_tiny.yaml"), "--model_name_or_path",
                                  str(untemplated), "--reward_model_path", str(tiny_reward), "--dataset_path",
                                  str(tiny_chat_data["sft"]), "--output_dir", str(tmp_path / "ppo")]))
    assert str(err.value) == f"{untemplated}: the tokenizer has no chat template (RL starts from a chat model)"
    assert not (tmp_path / "ppo").exists()


def test_perplexity_of_a_field_that_is_not_text_is_one_line(tiny_pretrained, tiny_chat_data, tmp_path):
    with pytest.raises(UserError) as err:  # the tokenizer's ValueError came after the model had loaded
        eval_recipe.main(*eval_recipe.parse_args([
            "--config", str(REPO_ROOT / "recipes/eval/tiny.yaml"), "--model_name_or_path", str(tiny_pretrained),
            "--metrics", "perplexity", "--text_dataset_path", str(tiny_chat_data["sft"]), "--text_split", "test",
            "--text_field", "messages", "--output_dir", str(tmp_path / "eval")]))
    assert str(err.value) == (f"{tiny_chat_data['sft']}[test]: row 0: field 'messages' is not a string; perplexity "
                              "reads text")
    assert not (tmp_path / "eval").exists()


def test_eval_of_chat_metrics_without_a_chat_template_is_one_line(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    """transformers stopped mid-run with a ValueError; the win_rate opponent only after the other metrics."""
    untemplated = _without_chat_template(tiny_sft, tmp_path / "no_template")
    base = ["--config", str(REPO_ROOT / "recipes/eval/tiny.yaml"), "--chat_dataset_path", str(tiny_chat_data["sft"]),
            "--max_samples", "2", "--max_new_tokens", "2", "--output_dir", str(tmp_path / "eval")]
    with pytest.raises(UserError) as err:
        eval_recipe.main(*eval_recipe.parse_args([*base, "--model_name_or_path", str(untemplated),
                                                  "--metrics", "exact_match", "safety"]))
    assert str(err.value) == (f"model_name_or_path: the tokenizer of {untemplated} has no chat template, which "
                              "exact_match, safety need (evaluate a chat model, e.g. the SFT recipe's output)")
    assert not (tmp_path / "eval").exists()
    with pytest.raises(UserError) as err:
        eval_recipe.main(*eval_recipe.parse_args([*base, "--model_name_or_path", str(tiny_sft), "--metrics", "win_rate",
                                                  "--reward_model_name_or_path", str(tiny_reward),
                                                  "--compare_model_name_or_path", str(untemplated)]))
    assert str(err.value).startswith(f"compare_model_name_or_path: the tokenizer of {untemplated} has no chat "
                                     "template, which win_rate need")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("recipe", ["sft", "reward", "dpo"])
def test_a_max_length_past_the_models_positions_is_refused(recipe, tiny_sft, tiny_chat_data, tmp_path):
    module, config = TRAINING[recipe]
    data = tiny_chat_data["sft" if recipe == "sft" else "preference"]
    positions = json.loads((tiny_sft / "config.json").read_text())["max_position_embeddings"]
    argv = ["--config", str(REPO_ROOT / config), "--model_name_or_path", str(tiny_sft), "--dataset_path", str(data),
            "--output_dir", str(tmp_path / "out"), "--max_length", str(positions + 1)]
    with pytest.raises(UserError) as err:
        module.main(*module.parse_args([*argv, "--eval_policy", "false"] if recipe == "dpo" else argv))
    assert str(err.value) == (f"max_length {positions + 1} is longer than max_position_embeddings {positions} of "
                              f"{tiny_sft}")
    assert not (tmp_path / "out").exists()
