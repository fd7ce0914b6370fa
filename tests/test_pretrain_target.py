"""The quickstart's chain with every default: the tiny preset on the embedded default.

The issue's target is a final validation loss of at most 40% of its value at initialisation.
Measured: 38.1% (4 layers, 512-token tokenizer, 900 steps, whole standard library; recipes/pretrain/README.md,
"Sizing the tiny preset"). The 4,096-token tokenizer with 3 layers and 680 steps reached 47%."""

from __future__ import annotations

import json

import pytest

from conftest import REPO_ROOT
from recipes import summary
from recipes.pretrain import pretrain

import os

# The full preset takes 5-13 of the suite's minutes (machine-dependent); with the RL, eval and notebook
# tests the suite would pass the 25-minute CI budget, so this measurement runs on request (README, "Tests").
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("RUN_FULL_PRESET") != "1",
    reason="full tiny-preset pretraining (5-13 min): run with RUN_FULL_PRESET=1 bash tests/run.sh -k target")]


def test_tiny_preset_on_embedded_default_reaches_40_percent_of_initial_loss(tmp_path):
    from data_prep import build_corpus, pack_dataset, train_tokenizer

    out = tmp_path / "outputs"
    build_corpus.main(["--output_dir", str(out / "corpus")])
    train_tokenizer.main(["--corpus_dir", str(out / "corpus"), "--output_dir", str(out / "tokenizer")])
    pack_dataset.main(["--corpus_dir", str(out / "corpus"), "--tokenizer_dir", str(out / "tokenizer"),
                       "--output_dir", str(out / "packed")])
    metrics = pretrain.main(*pretrain.parse_args([
        "--config", str(REPO_ROOT / "recipes/pretrain/tiny.yaml"), "--dataset_path", str(out / "packed"),
        "--tokenizer_path", str(out / "tokenizer"), "--output_dir", str(out / "pretrain_tiny"), "--disable_tqdm", "true",
    ]))

    print(json.dumps(metrics, indent=2))
    assert metrics["init_eval_loss"] > 5.0  # about ln(vocab) for an untrained model
    stages = {stage: figures for stage, _, figures in summary.summarize(out)}
    assert set(stages) == {"corpus", "tokenizer", "packed", "pretrain"}
    assert "of init" in stages["pretrain"]
    ratio = metrics["eval_loss"] / metrics["init_eval_loss"]
    assert ratio <= 0.40, f"validation loss is {ratio:.1%} of its initial value (target 40%, measured 38.1%)"
