"""Shared fixtures: offline mode, and a tiny corpus/tokenizer/packed dataset built once per run
by the project's own data_prep functions."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


class StepsTrained(TrainerCallback):
    """Records the step of every optimizer step a trainer takes: a resumed run takes only the steps after its
    checkpoint (its log, restored from the checkpoint, cannot tell)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture
def fake_hub(monkeypatch):
    """Stands in for the Hub API that Trainer (repo creation, checkpoint pushes) and our publish() call. Each
    upload is recorded with the files and the model card that its folder held at that moment."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    import huggingface_hub
    import transformers.trainer

    class FakeHub:
        created, uploads = [], []

        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            FakeHub.created.append(repo_id)
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, folder_path, **kwargs):
            folder = Path(folder_path)
            card = folder / "README.md"
            FakeHub.uploads.append({**kwargs, "folder_path": folder_path, "card": card.read_text() if card.is_file()
                                    else None, "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                                                               if p.is_file())})
            if kwargs.get("run_as_future"):  # Trainer's checkpoint pushes wait on a Future
                done = Future()
                done.set_result(None)
                return done

    FakeHub.created, FakeHub.uploads = [], []
    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHub)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def pushed_when_finished(hub, output_dir, repo_id, card_title, checkpoint_pushes=0):
    """A run's uploads: Trainer's `checkpoint_pushes` during training, then one of the finished output_dir
    (manifest and our model card in it) to `repo_id`; nothing from the unfinished output_dir."""
    assert hub.created == [repo_id]
    messages = [u["commit_message"] for u in hub.uploads]
    assert len(messages) == checkpoint_pushes + 1, messages
    assert all(m.startswith("Training in progress") for m in messages[:-1]), messages
    upload = hub.uploads[-1]
    assert upload["repo_id"] == repo_id and upload["folder_path"] == str(output_dir)
    assert {"manifest.json", "metrics.json", "model.safetensors", "README.md"} <= set(upload["files"])
    assert card_title in upload["card"]  # ours, not Trainer's generated card
    assert not any(f.startswith(".final-tmp") for f in upload["files"])
    assert "checkpoint-*" in upload["ignore_patterns"]


def run_interrupted_and_resumed(run, argv, tmp_path, drop_from_checkpoint=()):
    """Run 4 steps straight; copy its checkpoint-2 (less the `drop_from_checkpoint` files) into a fresh output_dir,
    which is what an interrupted run leaves, and resume there. The resumed run must take only steps 3 and 4, log
    the same figures (but wall times) and save the same weights. `run(argv, callbacks)` runs the recipe;
    `argv(out, *extra)` gives its arguments for 4 steps with a checkpoint every 2."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(argv(straight), None)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    for name in drop_from_checkpoint:
        (resumed / "checkpoint-2" / name).unlink()
    # the restored optimizer and schedule state would keep the checkpoint's learning rate: a new one is refused
    from data_prep.artifacts import UserError
    from recipes.common import OPTIMIZER_SETTINGS_NAME

    assert (resumed / "checkpoint-2" / OPTIMIZER_SETTINGS_NAME).is_file()
    with pytest.raises(UserError, match=f"^resume_from_checkpoint: {resumed / 'checkpoint-2'} was trained with "
                                        "learning_rate .*, and the settings give 0.123; "):
        run(argv(resumed, "--resume_from_checkpoint", "true", "--learning_rate", "0.123"), None)
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint-2"]
    trained = StepsTrained()
    run(argv(resumed, "--resume_from_checkpoint", "true"), [trained])
    assert trained.steps == [3, 4]  # it went on from the checkpoint
    assert json.loads((resumed / "manifest.json").read_text())["inputs"]["resumed_from"] == str(
        resumed / "checkpoint-2")

    def logged(out):
        rows = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [{k: v for k, v in row.items() if not any(t in k for t in ("time", "runtime", "per_second"))}
                for row in rows if "loss" in row]

    rows_straight, rows_resumed = logged(straight), logged(resumed)
    assert [row["step"] for row in rows_resumed] == [1, 2, 3, 4]
    for row_straight, row_resumed in zip(rows_straight, rows_resumed):
        assert row_resumed.keys() == row_straight.keys()
        for key, value in row_straight.items():
            assert row_resumed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (row_straight["step"], key)
    weights_straight, weights_resumed = (load_file(out / "model.safetensors") for out in (straight, resumed))
    assert weights_resumed.keys() == weights_straight.keys()
    assert all(torch.allclose(weights_resumed[k], weights_straight[k], atol=1e-6) for k in weights_straight)


# Model shape for fast tests: 2 layers, hidden 32. The recipe YAML stays the source of every
# other setting; tests only override what makes the run small.
TINY_MODEL_OVERRIDES = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--num_key_value_heads", "2", "--max_position_embeddings", "64",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Corpus (60 stdlib modules) -> byte-level BPE (vocab 512) -> blocks of 64 tokens."""
    from data_prep import build_corpus, pack_dataset, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    paths = {"corpus": root / "corpus", "tokenizer": root / "tokenizer", "packed": root / "packed"}
    build_corpus.main(["--output_dir", str(paths["corpus"]), "--max_stdlib_files", "60"])
    train_tokenizer.main(["--corpus_dir", str(paths["corpus"]), "--output_dir", str(paths["tokenizer"]),
                          "--vocab_size", "512"])
    pack_dataset.main(["--corpus_dir", str(paths["corpus"]), "--tokenizer_dir", str(paths["tokenizer"]),
                       "--output_dir", str(paths["packed"]), "--block_size", "64", "--num_proc", "1"])
    return paths


def pretrain_argv(tiny_data: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    """Command-line for the pretraining recipe: tiny.yaml, the tiny fixture data, a tiny model."""
    return [
        "--config", str(REPO_ROOT / "recipes/pretrain/tiny.yaml"),
        "--dataset_path", str(tiny_data["packed"]), "--tokenizer_path", str(tiny_data["tokenizer"]),
        "--output_dir", str(output_dir), "--max_eval_samples", "16", "--disable_tqdm", "true",
        *TINY_MODEL_OVERRIDES, *extra,
    ]


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory) -> Path:
    """The pretraining recipe's output after 2 steps: a real stage-output directory to fine-tune."""
    from recipes.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny_pretrained") / "pretrain"
    argv = pretrain_argv(tiny_data, out, "--max_steps", "2", "--eval_on_start", "false", "--save_steps", "100",
                         "--logging_steps", "1", "--max_position_embeddings", "256")
    pretrain.main(*pretrain.parse_args(argv))
    return out


@pytest.fixture(scope="session")
def tiny_chat_data(tmp_path_factory) -> dict[str, Path]:
    """Small SFT and preference datasets from the embedded task generators."""
    from data_prep import build_preference_data, build_sft_data

    root = tmp_path_factory.mktemp("chat_data")
    paths = {"sft": root / "sft", "preference": root / "preference"}
    build_sft_data.main(["--output_dir", str(paths["sft"]), "--train_size", "120", "--test_size", "24",
                         "--preference_size", "60", "--rl_size", "24", "--max_docstring_functions", "12"])
    build_preference_data.main(["--sft_data_dir", str(paths["sft"]), "--output_dir", str(paths["preference"]),
                                "--margin", "rank"])
    return paths


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrained, tiny_chat_data, tmp_path_factory) -> Path:
    """The SFT recipe's output after 4 steps on the tiny chat data: a real chat policy directory for RL."""
    from recipes.sft import sft

    out = tmp_path_factory.mktemp("tiny_sft") / "sft"
    sft.main(*sft.parse_args([
        "--config", str(REPO_ROOT / "recipes/sft/tiny.yaml"), "--model_name_or_path", str(tiny_pretrained),
        "--dataset_path", str(tiny_chat_data["sft"]), "--output_dir", str(out), "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--learning_rate", "0.01", "--warmup_steps", "0", "--logging_steps", "1",
        "--eval_exact_match", "false", "--disable_tqdm", "true"]))
    return out


@pytest.fixture(scope="session")
def tiny_reward(tiny_sft, tiny_chat_data, tmp_path_factory) -> Path:
    """The reward recipe's output after 4 steps from tiny_sft on the tiny preference pairs (a scalar head)."""
    from recipes.reward import reward

    out = tmp_path_factory.mktemp("tiny_reward") / "reward"
    reward.main(*reward.parse_args([
        "--config", str(REPO_ROOT / "recipes/reward/tiny.yaml"), "--model_name_or_path", str(tiny_sft),
        "--dataset_path", str(tiny_chat_data["preference"]), "--output_dir", str(out), "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--warmup_steps", "0", "--logging_steps", "1",
        "--eval_pairwise_accuracy", "false", "--disable_tqdm", "true"]))
    return out
