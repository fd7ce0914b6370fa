"""Bottleneck adapters as a registered PEFT method: identity at start, training touches only the
adapter, save/reload (also in a fresh interpreter) and disable_adapter are exact, SEQ_CLS works."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from recipes import bottleneck_adapter
from recipes.bottleneck_adapter import BottleneckConfig

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def tiny(cls_name: str = "LlamaForCausalLM", seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(transformers.LlamaConfig(**SHAPE, **overrides)).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, SHAPE["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(seed))


def train(model, steps: int, **inputs) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained():
    """A CAUSAL_LM bottleneck model before and after 8 steps on one fixed batch."""
    from peft import get_peft_model

    ids = batch()
    base_logits = tiny()(ids).logits
    model = get_peft_model(tiny(), BottleneckConfig(task_type="CAUSAL_LM", bottleneck_size=8))
    fresh_logits = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, 8, input_ids=ids, labels=ids)
    return dict(model=model, ids=ids, base_logits=base_logits, fresh_logits=fresh_logits, before=before, losses=losses)


def test_fresh_adapter_leaves_logits_unchanged(trained):
    assert torch.equal(trained["fresh_logits"], trained["base_logits"])


def test_training_changes_only_adapter_weights(trained):
    model, before = trained["model"], trained["before"]
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable / total < 0.05
    assert trained["losses"][-1] < trained["losses"][0] - 0.1, trained["losses"]
    wrapped = [n for n, m in model.named_modules() if isinstance(m, bottleneck_adapter.BottleneckLayer)]
    assert len(wrapped) == 4 and all(n.endswith(("self_attn", "mlp")) for n in wrapped)
    for name, param in model.named_parameters():
        if ".bottleneck_" in name:
            assert param.requires_grad and not torch.equal(param, before[name]), name
        else:
            assert not param.requires_grad and torch.equal(param, before[name]), name


def test_disable_adapter_gives_base_logits_and_merge_refuses(trained):
    model, ids = trained["model"], trained["ids"]
    adapted = model(ids).logits
    assert not torch.allclose(adapted, trained["base_logits"])
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, trained["base_logits"])
    assert torch.equal(model(ids).logits, adapted)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_unload_restores_the_base_modules():
    from peft import get_peft_model

    ids = batch()
    model = get_peft_model(tiny(), BottleneckConfig(task_type="CAUSAL_LM", init_scale=0.1))
    assert not torch.equal(model(ids).logits, tiny()(ids).logits)
    base = model.unload()
    assert type(base.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert torch.equal(base(ids).logits, tiny()(ids).logits)


def test_save_and_reload_in_a_fresh_interpreter(trained, tmp_path):
    """PeftModel.from_pretrained finds the method after nothing but `import recipes.bottleneck_adapter`."""
    model, ids = trained["model"], trained["ids"]
    model.save_pretrained(tmp_path / "adapter")
    tiny().save_pretrained(tmp_path / "base")  # the same weights the adapter was trained on
    torch.save(ids, tmp_path / "ids.pt")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    assert (tmp_path / "adapter/adapter_model.safetensors").is_file()

    script = (
        "import sys, torch, recipes.bottleneck_adapter\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "d = sys.argv[1]\n"
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d + '/base'), d + '/adapter').eval()\n"
        "torch.save(model(torch.load(d + '/ids.pt')).logits, d + '/logits.pt')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=120)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), model(ids).logits)


def test_seq_cls_with_score_head_trains_saves_and_reloads(tmp_path):
    from peft import PeftModel, get_peft_model

    ids, labels = batch(), torch.tensor([0.0, 1.0, 2.0, 3.0])
    config = BottleneckConfig(task_type="SEQ_CLS", bottleneck_size=8, modules_to_save=["score"])
    model = get_peft_model(tiny("LlamaForSequenceClassification", num_labels=1), config)
    score_before = model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    losses = train(model, 8, input_ids=ids, labels=labels)
    assert losses[-1] < losses[0], losses
    assert not torch.equal(model.base_model.model.score.modules_to_save["default"].weight, score_before)

    model.save_pretrained(tmp_path)
    fresh_base = tiny("LlamaForSequenceClassification", num_labels=1)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path)
    assert type(reloaded).__name__ == "PeftModelForSequenceClassification"
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_unknown_target_module_is_named():
    from peft import get_peft_model

    with pytest.raises(ValueError, match="no_such_block"):
        get_peft_model(tiny(), BottleneckConfig(target_modules=["self_attn", "no_such_block"]))


def test_running_the_module_again_does_not_raise():
    """A second execution (the file run as a script while also imported) must not register twice."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    runpy.run_path(bottleneck_adapter.__file__, run_name="bottleneck_adapter_again")
    assert PEFT_TYPE_TO_TUNER_MAPPING["BOTTLENECK"] is bottleneck_adapter.BottleneckModel
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="tanh")
