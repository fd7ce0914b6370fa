"""The reward recipe: pairwise training from the SFT model, held-out accuracy, LoRA SEQ_CLS, bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO_ROOT, run_interrupted_and_resumed
from data_prep.artifacts import UserError
from recipes.eval.reward_scores import pairwise_accuracy, score_conversations
from recipes.reward import reward


def reward_argv(model_dir, preference_data, output_dir, config="tiny.yaml", *extra):
    return ["--config", str(REPO_ROOT / "recipes/reward" / config), "--model_name_or_path", str(model_dir),
            "--dataset_path", str(preference_data), "--output_dir", str(output_dir), "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--disable_tqdm", "true", *extra]


def run_reward(argv, callbacks=None):
    return reward.main(*reward.parse_args(argv), callbacks=callbacks)


def test_reward_model_trains_scores_pairs_and_reloads(tiny_pretrained, tiny_chat_data, tmp_path):
    from datasets import load_from_disk
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class InitialWeights(TrainerCallback):  # the pretrained backbone and the fresh score head, before step 1
        weights = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    out = tmp_path / "rm"
    initial = InitialWeights()
    metrics = run_reward(reward_argv(tiny_pretrained, tiny_chat_data["preference"], out), callbacks=[initial])
    saved, pretrained = load_file(out / "model.safetensors"), load_file(tiny_pretrained / "model.safetensors")
    assert "score.weight" in saved and set(saved) <= set(initial.weights)
    assert torch.equal(initial.weights["model.layers.0.self_attn.q_proj.weight"],
                       pretrained["model.layers.0.self_attn.q_proj.weight"])  # it did start from the pretrained model
    unchanged = [k for k, v in saved.items() if torch.equal(v, initial.weights[k])]
    assert not unchanged, unchanged  # 4 steps moved the head and every backbone tensor
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 4
    test_pairs = load_from_disk(str(tiny_chat_data["preference"]))["test"]
    assert metrics["pairwise_after"]["n"] == len(test_pairs) > 0
    assert "margin" in test_pairs.column_names  # the fixture asks for rank margins; RewardTrainer uses them

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and (out / "model.safetensors").is_file()
    again = pairwise_accuracy(model, tokenizer, test_pairs)
    assert again["accuracy"] == pytest.approx(metrics["pairwise_after"]["accuracy"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "reward" and manifest["inputs"]["model"] == str(tiny_pretrained)


def test_resume_after_interruption_matches_the_uninterrupted_run(tiny_pretrained, tiny_chat_data, tmp_path):
    """The score head, drawn fresh before step 1, comes back from checkpoint-2 with the backbone; RewardTrainer
    restores the rest, and the recipe passes resume_from_checkpoint on and carries the token count over."""
    def argv(out, *extra):
        return reward_argv(tiny_pretrained, tiny_chat_data["preference"], out, "tiny.yaml", "--save_strategy",
                           "steps", "--save_steps", "2", *extra)

    run_interrupted_and_resumed(run_reward, argv, tmp_path)


def test_group_by_length_batches_pairs_of_similar_length(tiny_pretrained, tiny_chat_data, tmp_path):
    from datasets import load_from_disk

    _, training_args, _, _ = reward.parse_args(reward_argv(tiny_pretrained, tiny_chat_data["preference"], tmp_path))
    assert training_args.train_sampling_strategy == "group_by_length"  # tiny.yaml asks for it
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=1)
    train = load_from_disk(str(tiny_chat_data["preference"]))["train"]
    trainer = reward.PairLengthGroupedRewardTrainer(model=model, args=training_args, train_dataset=train,
                                                    processing_class=AutoTokenizer.from_pretrained(tiny_pretrained))
    lengths = [max(len(c), len(r)) for c, r in zip(trainer.train_dataset["chosen_ids"],
                                                    trainer.train_dataset["rejected_ids"])]
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(train)))  # every pair once

    def padded(indices):  # tokens the collator pads to: both sides of each pair, to the batch's longest
        batches = [indices[i:i + 4] for i in range(0, len(indices), 4)]
        return sum(2 * len(b) * max(lengths[j] for j in b) for b in batches)

    shuffled = random.Random(0).sample(range(len(train)), len(train))  # what the default sampler does
    assert padded(order) < 0.8 * padded(shuffled)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_gives_the_rewards_loss_and_gradients_of_separate_rows(attention, tiny_pretrained,
                                                                             tiny_chat_data, tmp_path):
    from datasets import load_from_disk
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from recipes.reward.shared_prompt import SharedPromptCollator, pairwise_loss, shared_prompt_rewards

    _, training_args, _, _ = reward.parse_args(reward_argv(tiny_pretrained, tiny_chat_data["preference"], tmp_path))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=1,
                                                               attn_implementation=attention)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    trainer = reward.SharedPromptRewardTrainer(model=model, args=training_args, processing_class=tokenizer,
                                               train_dataset=load_from_disk(str(tiny_chat_data["preference"]))["train"])
    examples = [trainer.train_dataset[i] for i in range(8)]
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight)  # a head that tells replies apart

    def loss_and_grads(rewards):
        chosen, rejected = rewards
        loss = pairwise_loss(chosen, rejected, torch.tensor([e["margin"] for e in examples]), 0.01)
        model.zero_grad()
        loss.backward()
        return chosen.detach(), rejected.detach(), loss.item(), [p.grad.clone() for p in model.parameters()]

    separate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    shared = SharedPromptCollator(tokenizer.pad_token_id)(examples)
    reference = loss_and_grads(torch.chunk(model(**separate).logits.squeeze(-1), 2))
    merged = loss_and_grads(shared_prompt_rewards(model, shared))
    assert merged[0] == pytest.approx(reference[0], abs=1e-5) and merged[1] == pytest.approx(reference[1], abs=1e-5)
    assert merged[2] == pytest.approx(reference[2], abs=1e-6)
    for ours, theirs in zip(merged[3], reference[3]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert shared["real_tokens"] < 0.8 * separate["attention_mask"].sum()  # the prompts ran once


def test_shared_prompt_evaluates_like_two_rows(tiny_pretrained, tiny_chat_data, tmp_path):
    """Trainer.evaluate goes through compute_loss: the same loss, accuracy and margin either way."""
    from datasets import load_from_disk

    _, training_args, _, _ = reward.parse_args(reward_argv(tiny_pretrained, tiny_chat_data["preference"], tmp_path))
    pairs = load_from_disk(str(tiny_chat_data["preference"]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=1)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    results = [trainer_cls(model=model, args=training_args, train_dataset=pairs["train"], eval_dataset=pairs["test"],
                           processing_class=tokenizer).evaluate()
               for trainer_cls in (reward.PairLengthGroupedRewardTrainer, reward.SharedPromptRewardTrainer)]
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"):
        assert results[1][key] == pytest.approx(results[0][key], abs=1e-5), key


def test_shared_prompt_needs_a_score_head_and_a_4d_mask(tiny_pretrained):
    from recipes.reward.shared_prompt import (SharedPromptCollator, check_attention_implementation, merge_pair,
                                              score_head)

    with pytest.raises(UserError, match="no `score` head"):
        score_head(torch.nn.Linear(2, 1))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="share_prompt needs attn_implementation sdpa or eager"):
        check_attention_implementation(model)
    row = merge_pair([1, 2, 3], [1, 2, 3])  # identical pairs still score each side on its own last token
    assert row["input_ids"] == [1, 2, 3, 3] and row["position_ids"] == [0, 1, 2, 2]
    assert (row["chosen_end"], row["rejected_end"]) == (2, 3)
    batch = SharedPromptCollator(0, pad_to_multiple_of=8)([{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0, 0, 0]] and batch["real_tokens"] == 4
    assert batch["attention_mask"].shape == (1, 1, 8, 8) and not batch["attention_mask"][0, 0, 3, 2]  # 4 can't see 3


def test_scores_do_not_depend_on_batching_or_padding(tiny_pretrained):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
                     [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Sort these numbers: 3 1 2 9"},
                      {"role": "assistant", "content": "1 2 3 9"}]]
    together = score_conversations(model, tokenizer, conversations, batch_size=2)
    alone = [score_conversations(model, tokenizer, [c], batch_size=1)[0] for c in conversations]
    assert together == pytest.approx(alone, abs=1e-5)


def test_lora_reward_model_reloads_with_identical_scores(tiny_pretrained, tiny_chat_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "rm_lora"
    metrics = run_reward(reward_argv(tiny_pretrained, tiny_chat_data["preference"], out, "tiny_lora.yaml",
                                     "--learning_rate", "0.05"))
    assert metrics["trainable_params"] < metrics["total_params"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in (config["modules_to_save"] or [])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=1)
    model = PeftModel.from_pretrained(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    from datasets import load_from_disk

    test_pairs = load_from_disk(str(tiny_chat_data["preference"]))["test"]
    again = pairwise_accuracy(model, tokenizer, test_pairs)
    assert again["accuracy"] == pytest.approx(metrics["pairwise_after"]["accuracy"])
    assert again["mean_margin"] == pytest.approx(metrics["pairwise_after"]["mean_margin"], abs=1e-5)

    # without our manifest (a Hub adapter) it is still a judge: its task type, not its base's class, says so
    from recipes.common import load_pretrained, refuse_untrained_score_head
    (out / "manifest.json").unlink()
    judge, _, manifest = load_pretrained(str(out), AutoModelForSequenceClassification, num_labels=1)
    refuse_untrained_score_head("reward_model_path", str(out), judge, manifest)


def test_ia3_reward_model_trains_and_prompt_learning_is_refused(tiny_pretrained, tiny_chat_data, tmp_path):
    out = tmp_path / "rm_ia3"
    metrics = run_reward(reward_argv(tiny_pretrained, tiny_chat_data["preference"], out, "tiny_lora.yaml",
                                     "--peft_method", "ia3", "--lora_target_modules", "k_proj", "v_proj", "down_proj",
                                     "--max_steps", "2"))
    assert 0 < metrics["trainable_params"] < metrics["total_params"] and math.isfinite(metrics["train_loss"])
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    for method in ("prefix_tuning", "prompt_tuning"):
        with pytest.raises(UserError, match=f"{method} does not work in the reward recipe"):
            run_reward(reward_argv(tiny_pretrained, tiny_chat_data["preference"], tmp_path / method,
                                   "tiny_lora.yaml", "--peft_method", method))


def test_bad_preference_rows_stop_with_one_line(tiny_pretrained, tmp_path):
    from datasets import Dataset, DatasetDict

    from data_prep.artifacts import build_manifest, write_manifest

    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    good = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": [{"role": "assistant", "content": "6"}]}
    same = {**good, "rejected": good["chosen"]}
    for name, rows, needle in (("same", [good, same], "row 1"), ("columns", [{"prompt": prompt, "chosen": "5"}],
                                                                 "rejected")):
        path = tmp_path / name
        DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}).save_to_disk(str(path))
        write_manifest(path, build_manifest("preference_data", {}, {}, {}))
        with pytest.raises(UserError) as err:
            run_reward(reward_argv(tiny_pretrained, path, tmp_path / f"out_{name}"))
        assert "\n" not in str(err.value) and str(path) in str(err.value) and needle in str(err.value)
        assert not (tmp_path / f"out_{name}" / "manifest.json").exists()


def test_missing_model_directory_is_one_line(tiny_chat_data, tmp_path):
    with pytest.raises(UserError, match="model directory not found: outputs/no_such_sft"):
        run_reward(reward_argv("outputs/no_such_sft", tiny_chat_data["preference"], tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        run_reward(reward_argv(tmp_path / "empty", tiny_chat_data["preference"], tmp_path / "y"))


def test_adapter_whose_base_is_missing_is_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    from recipes.common import load_pretrained

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                             "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="base model .*gone.* is missing"):
        load_pretrained(str(adapter), AutoModelForCausalLM)


def test_pairwise_accuracy_counts_by_hand():
    class Fixed(torch.nn.Module):
        """Scores a conversation by its last assistant message's length: a reward model we can reason about."""

        training = False

        def __init__(self, tokenizer):
            super().__init__()
            self.tokenizer = tokenizer
            self.device = torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": attention_mask.sum(dim=1, keepdim=True).float()})()

    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    prompt = [{"role": "user", "content": "q"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "a b c"}],
             "rejected": [{"role": "assistant", "content": "a"}]},
            {"prompt": prompt, "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "a b"}]},
            {"prompt": prompt, "chosen": [{"role": "assistant", "content": "a b"}],
             "rejected": [{"role": "assistant", "content": "a"}]}]
    result = pairwise_accuracy(Fixed(tokenizer), tokenizer, rows)
    assert result == {"accuracy": pytest.approx(2 / 3), "mean_margin": pytest.approx((2 - 1 + 1) / 3), "n": 3}


def test_pad_token_missing_from_the_vocabulary_is_one_line(tiny_pretrained, tiny_chat_data, tmp_path):
    with pytest.raises(UserError) as err:
        run_reward(reward_argv(tiny_pretrained, tiny_chat_data["preference"], tmp_path / "out", "tiny.yaml",
                               "--pad_token", "<|nope|>"))
    assert str(err.value) == f"pad_token: '<|nope|>' is not in the vocabulary of the tokenizer of {tiny_pretrained}"
    assert not (tmp_path / "out").exists()  # refused before the trainer is built


def test_refused_resume_leaves_a_finished_run_as_it_was(tiny_sft, tiny_reward, tiny_chat_data, tmp_path):
    import shutil

    out = tmp_path / "rm"
    shutil.copytree(tiny_reward, out)
    with pytest.raises(UserError, match="^resume_from_checkpoint: no checkpoint-\\* directory in "):
        run_reward(reward_argv(tiny_sft, tiny_chat_data["preference"], out, "tiny.yaml", "--resume_from_checkpoint",
                               "true"))
    assert (out / "manifest.json").is_file()
