"""The pretraining recipe in-process: a few steps, reloadable output, resume, bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import REPO_ROOT, pretrain_argv, pushed_when_finished
from data_prep.artifacts import UserError
from recipes.pretrain import pretrain


def run_pretrain(argv, callbacks=None):
    return pretrain.main(*pretrain.parse_args(argv), callbacks=callbacks)


class InitialWeights(TrainerCallback):
    """A copy of the model's weights as training begins (after initialisation, before the first step)."""

    weights = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_every_saved_tensor_changed(saved_file, initial):
    from safetensors.torch import load_file

    saved = load_file(saved_file)
    assert saved and set(saved) <= set(initial)
    unchanged = [k for k, v in saved.items() if torch.equal(v, initial[k])]
    assert not unchanged, unchanged


def test_few_steps_save_reloadable_model_with_card(tiny_data, tmp_path):
    out = tmp_path / "run"
    initial = InitialWeights()
    metrics = run_pretrain(pretrain_argv(tiny_data, out, "--max_steps", "6", "--logging_steps", "2",
                                         "--save_steps", "100"), callbacks=[initial])
    assert_every_saved_tensor_changed(out / "model.safetensors", initial.weights)  # 6 steps trained every tensor
    assert math.isfinite(metrics["eval_loss"]) and metrics["steps"] == 6
    assert metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"] < 1.5
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    # weights only as safetensors (training_args.bin is Trainer's pickled arguments, not weights)
    assert (out / "model.safetensors").is_file() and not list(out.glob("pytorch_model*.bin"))
    card = (out / "README.md").read_text()
    for needle in ("max_steps", "eval_loss", str(tiny_data["packed"]), "hidden_size"):
        assert needle in card
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["dataset_path"] == str(tiny_data["packed"])
    assert not (out / ".final-tmp").exists()
    batch = torch.tensor(_first_blocks(tiny_data, 4))
    with torch.inference_mode():
        loss = model(input_ids=batch, labels=batch).loss
    assert math.isfinite(loss.item())


def test_push_to_hub_uploads_checkpoints_then_the_finished_output_dir(fake_hub, tiny_data, tmp_path):
    """Trainer's push of each checkpoint (hub_strategy every_save) stays; the final upload is the published
    output_dir, after its manifest is written."""
    out = tmp_path / "pushed"
    run_pretrain(pretrain_argv(tiny_data, out, "--max_steps", "4", "--save_steps", "2", "--push_to_hub", "true",
                               "--hub_model_id", "me/tiny-llama", "--eval_on_start", "false"))
    pushed_when_finished(fake_hub, out, "me/tiny-llama", "pretrained from scratch", checkpoint_pushes=2)


def _first_blocks(tiny_data, n):
    from datasets import load_from_disk

    return list(load_from_disk(str(tiny_data["packed"]))["validation"]["input_ids"])[:n]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("optimizer", [[], ["--muon", "true"]], ids=["adamw", "muon"])
def test_resume_after_interruption_matches_uninterrupted_run(optimizer, tiny_data, tmp_path):
    common = ["--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--eval_on_start", "false", *optimizer]
    straight = run_pretrain(pretrain_argv(tiny_data, tmp_path / "straight", *common))

    interrupted_dir = tmp_path / "interrupted"
    with pytest.raises(SystemExit):  # the "crash": stop at step 4, after checkpoint-4 was written
        run_pretrain(pretrain_argv(tiny_data, interrupted_dir, *common), callbacks=[Crash(4)])
    assert (interrupted_dir / "checkpoint-4").is_dir() and not (interrupted_dir / "manifest.json").exists()
    resumed = run_pretrain(pretrain_argv(tiny_data, interrupted_dir, *common, "--resume_from_checkpoint", "true"))

    assert resumed["steps"] == straight["steps"] == 8
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)


def test_resume_passes_over_an_interrupted_save_and_refuses_a_model_only_checkpoint(tiny_data, tmp_path, capsys):
    """Trainer writes a checkpoint in place, trainer_state.json last. `true` must take the newest complete one,
    not a save that died midway (it would load the weights and silently start a fresh optimizer), and a
    save_only_model checkpoint cannot continue a run at all."""
    import shutil

    from recipes.common import resolve_resume

    common = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--eval_on_start", "false"]
    out = tmp_path / "run"
    run_pretrain(pretrain_argv(tiny_data, out, *common))
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    for name in ("trainer_state.json", *(p.name for p in (out / "checkpoint-6").glob("rng_state*.pth"))):
        (out / "checkpoint-6" / name).unlink()  # the weights and optimizer are on disk, the rest never came
    assert resolve_resume("true", str(out)) == str(out / "checkpoint-4")
    assert "[resume] passing over checkpoint-6: it has no trainer_state.json" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"checkpoint-6 has no trainer_state.json \(a save that was interrupted"):
        resolve_resume(str(out / "checkpoint-6"), str(out))
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    state = out / "checkpoint-8" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # a disk that filled while it was written
    assert resolve_resume("true", str(out)) == str(out / "checkpoint-4")
    assert "passing over checkpoint-8: it has a damaged trainer_state.json (not a JSON object" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"checkpoint-8 has a damaged trainer_state.json"):
        resolve_resume(str(out / "checkpoint-8"), str(out))

    model_only = tmp_path / "model_only"
    run_pretrain(pretrain_argv(tiny_data, model_only, *common, "--save_only_model", "true"))
    with pytest.raises(UserError, match=r"no complete checkpoint in .*model_only \(the newest, checkpoint-4, holds no "
                                        r"optimizer, schedule or random state \(saved with save_only_model\)"):
        run_pretrain(pretrain_argv(tiny_data, model_only, *common, "--resume_from_checkpoint", "true"))


class Crash(TrainerCallback):
    """Dies right after the checkpoint of `step` is on disk, like a killed job."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise SystemExit("simulated crash")


def test_block_larger_than_context_is_refused(tiny_data, tmp_path):
    with pytest.raises(UserError, match="max_position_embeddings 32"):
        run_pretrain(pretrain_argv(tiny_data, tmp_path / "x", "--max_position_embeddings", "32"))


def test_unknown_model_family_is_one_short_line(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"^key model_type: unknown model family 'lama' \(did you mean llama"):
        run_pretrain(pretrain_argv(tiny_data, tmp_path / "x", "--model_type", "lama"))
    assert not (tmp_path / "x").exists()


def test_corpus_given_as_the_packed_dataset_is_refused(tiny_data, tmp_path):
    argv = pretrain_argv(tiny_data, tmp_path / "x")
    argv[argv.index("--dataset_path") + 1] = str(tiny_data["corpus"])
    with pytest.raises(UserError, match=r"is the output of stage 'corpus', not a packed dataset \(packed\)$"):
        run_pretrain(argv)
    assert not (tmp_path / "x").exists()


def test_missing_tokenizer_directory_is_refused(tiny_data, tmp_path):
    with pytest.raises(UserError, match="tokenizer directory not found"):
        run_pretrain(pretrain_argv(tiny_data, tmp_path / "x", "--tokenizer_path", str(tmp_path / "nope")))


def test_unknown_yaml_key_is_one_line_error(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text((REPO_ROOT / "recipes/pretrain/tiny.yaml").read_text() + "learning_rat: 0.1\n")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "recipes/pretrain/pretrain.py"), "--config", str(config)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {config}: unknown key(s) learning_rat"]
    assert "Traceback" not in result.stderr


def test_yaml_key_given_twice_is_one_line_error(tmp_path):
    preset = (REPO_ROOT / "recipes/pretrain/tiny.yaml").read_text()
    config = tmp_path / "twice.yaml"
    config.write_text(preset + "max_steps: 5\n")  # YAML itself would keep the last value silently
    line = len(preset.splitlines()) + 1
    with pytest.raises(UserError, match=rf"^{re.escape(str(config))}:{line}: key max_steps is given twice$"):
        pretrain.parse_args(["--config", str(config)])


def test_refused_resume_leaves_a_finished_run_as_it_was(tiny_data, tiny_pretrained, tmp_path):
    import shutil

    out = tmp_path / "pretrain"
    shutil.copytree(tiny_pretrained, out)  # a finished run, manifest included
    with pytest.raises(UserError, match="^resume_from_checkpoint: directory not found: "):
        run_pretrain(pretrain_argv(tiny_data, out, "--max_steps", "2", "--eval_on_start", "false",
                                   "--resume_from_checkpoint", str(out / "checkpoint-99")))
    assert (out / "manifest.json").is_file()
