"""Muon for the hidden weight matrices and AdamW for the rest, as one optimizer that Trainer builds.

Muon (MomentUm Orthogonalized by Newton-Schulz, K. Jordan et al., 2024) keeps SGD momentum for each
hidden matrix and replaces the update by its nearest semi-orthogonal matrix, a few Newton-Schulz
iterations away, so that every direction of the update moves at the same rate. It is meant for the
matrices inside the transformer blocks only: the token embedding, the LM head (tied to it or not),
norms and biases keep AdamW. Muon takes the weights of `nn.Linear` layers; transformers stores the
experts of an MoE model (mixtral, qwen2_moe) as 3-D tensors and its router as a bare parameter, so
there only the attention projections get Muon and the experts and router stay on AdamW.

The optimizer is DeepSpeed's `MuonWithAuxAdam` (deepspeed.runtime.zero.muon), which runs the two
updates from one `step()`. This module only decides which parameter goes where and hands Trainer a
factory (`optimizer_cls_and_kwargs`), so Trainer's own LR scheduler drives both halves: the Muon
group starts at `muon_learning_rate`, the AdamW groups at `learning_rate`, and the cosine schedule
scales each by the same factor.

Where it runs: one process, DDP (every rank orthogonalizes the full, all-reduced matrix), and
DeepSpeed ZeRO-2 (ZeRO-1 shares its code in DeepSpeed but is not run here), which reads the
`use_muon` tag set here on every parameter and orthogonalizes a whole matrix before partitioning
it; under ZeRO-2 on 2 processes the per-step losses equal DDP's (tests/test_distributed.py). ZeRO
writes the orthogonalized update into the gradient buffer before it clips, so under ZeRO the recipe
asks for `max_grad_norm: 0`; under DDP clipping acts on the raw gradients as usual (Muon's half is
scale-free, so it only changes the AdamW half). ZeRO-3 needs `reduce_scatter: false`, and FSDP,
which shards matrices across ranks, is refused.

Weight decay: AdamW groups use `weight_decay` (none on norms and biases, as Trainer does); the Muon
group shrinks its matrices by `muon_learning_rate x muon_weight_decay` per step, which is why its
decay is given separately.
"""

from __future__ import annotations

from torch import nn


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Weights of the model's linear layers, less the input and output embeddings."""
    seen = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    found = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen and module.weight.requires_grad:
            seen.add(id(module.weight))
            found.append(module.weight)
    return found


def muon_param_groups(model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float],
                      eps: float, muon_learning_rate: float, muon_momentum: float,
                      muon_weight_decay: float) -> list[dict]:
    """Param groups for MuonWithAuxAdam: one Muon group, then AdamW with and without weight decay."""
    muon = hidden_matrices(model)
    muon_ids = {id(p) for p in muon}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in muon_ids]
    # Under ZeRO-3 a parameter is an empty placeholder at this point; ds_shape keeps its real shape.
    decay = [p for p in rest if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in rest if len(getattr(p, "ds_shape", p.shape)) < 2]
    for p in model.parameters():
        p.use_muon = id(p) in muon_ids
    adam = {"use_muon": False, "lr": learning_rate, "betas": betas, "eps": eps}
    groups = [{"params": muon, "use_muon": True, "lr": muon_learning_rate, "momentum": muon_momentum,
               "weight_decay": muon_weight_decay},
              {"params": decay, **adam, "weight_decay": weight_decay},
              {"params": no_decay, **adam, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MuonWithAdamW:
    """The factory Trainer calls as `MuonWithAdamW()(model, **kwargs)` (kwargs: muon_param_groups's)."""

    def __call__(self, model: nn.Module, **kwargs):
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        return MuonWithAuxAdam(muon_param_groups(model, **kwargs))


def muon_optimizer_kwargs(training_args, muon_learning_rate: float, muon_momentum: float,
                          muon_weight_decay: float) -> dict:
    """The factory's kwargs: AdamW's settings from TrainingArguments, Muon's from the recipe."""
    return {"learning_rate": training_args.learning_rate, "weight_decay": training_args.weight_decay,
            "betas": (training_args.adam_beta1, training_args.adam_beta2), "eps": training_args.adam_epsilon,
            "muon_learning_rate": muon_learning_rate, "muon_momentum": muon_momentum,
            "muon_weight_decay": muon_weight_decay}
