"""The pretraining recipe's Muon option: which parameters Muon gets, and its update against torch's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from recipes.pretrain.muon import MuonWithAdamW, hidden_matrices, muon_param_groups

SETTINGS = {"learning_rate": 5e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8,
            "muon_learning_rate": 0.02, "muon_momentum": 0.95, "muon_weight_decay": 0.025}


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_muon_gets_the_block_matrices_and_adamw_the_rest(tied):
    model = tiny_llama(tied)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in hidden_matrices(model)}
    per_layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert muon == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in per_layer}

    groups = muon_param_groups(model, **SETTINGS)
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert set(by_name) == set(names.values())  # every parameter once (a tied head is the embedding)
    assert by_name["model.embed_tokens.weight"]["use_muon"] is False
    assert by_name["model.embed_tokens.weight"]["weight_decay"] == 0.1
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0  # no decay on norms, as Trainer does
    if not tied:
        assert by_name["lm_head.weight"]["use_muon"] is False
    assert by_name["model.layers.0.mlp.up_proj.weight"]["lr"] == 0.02
    assert all(p.use_muon == (names[id(p)] in muon) for p in model.parameters())  # the tag ZeRO reads


def test_muon_half_matches_torch_muon_and_adamw_half_matches_torch_adamw():
    """Five steps on the same gradients. torch.optim.Muon is the reference for the Muon update
    (Nesterov momentum, 5 quintic Newton-Schulz steps, lr x sqrt(max(1, rows/cols)), decoupled
    decay); it orthogonalizes in bf16 and DeepSpeed in fp32 on CPU, hence the tolerance."""
    ours_model, ref_model = tiny_llama(False), tiny_llama(False)
    ours = MuonWithAdamW()(ours_model, **SETTINGS)
    muon_ref = hidden_matrices(ref_model)
    muon_ids = {id(p) for p in muon_ref}
    rest = [p for p in ref_model.parameters() if id(p) not in muon_ids]
    reference = [
        torch.optim.Muon(muon_ref, lr=0.02, weight_decay=0.025, momentum=0.95, nesterov=True,
                         adjust_lr_fn="original"),
        torch.optim.AdamW([{"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.1},
                           {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                          lr=5e-3, betas=(0.9, 0.95), eps=1e-8),
    ]
    generator = torch.Generator().manual_seed(1)
    start = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    for _ in range(5):
        for (_, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        ours.step()
        for optimizer in reference:
            optimizer.step()

    ref_params = dict(ref_model.named_parameters())
    for name, p in ours_model.named_parameters():
        moved, expected = p.detach() - start[name], ref_params[name].detach() - start[name]
        assert moved.abs().max() > 0, name
        if id(ref_params[name]) in muon_ids:
            assert torch.linalg.norm(moved - expected) <= 0.02 * torch.linalg.norm(expected), name
        else:
            torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-7, msg=name)


def test_moe_experts_and_router_stay_on_adamw():
    """transformers keeps MoE experts as 3-D tensors and the router as a bare parameter."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in hidden_matrices(model)} == {
        f"model.layers.0.self_attn.{m}_proj.weight" for m in ("q", "k", "v", "o")}
    adam = {names[id(p)] for g in muon_param_groups(model, **SETTINGS) if not g["use_muon"] for p in g["params"]}
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.down_proj"} <= adam
