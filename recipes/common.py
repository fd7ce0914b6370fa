"""Small helpers shared by the recipes: resume paths, the final-output hand-off and model cards."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from data_prep.artifacts import MANIFEST_NAME, UserError


def with_cpu_process_group(argv: list[str] | None) -> list[str]:
    """Make multi-process runs on machines without CUDA join one gloo process group.

    accelerate's PartialState only picks a CPU backend when told the run is on CPU. Under
    `accelerate launch` with DeepSpeed it would otherwise fall back to one process although
    DeepSpeed already joined all ranks (and DeepSpeed's batch-size check fails); under torchrun
    DDP it would run every rank alone, without gradient all-reduce. So: `--ddp_backend gloo`
    always, and `--use_cpu true` for DDP (DeepSpeed must not be told it runs on CPU).
    """
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.cuda.is_available():
        if "--ddp_backend" not in argv:
            argv += ["--ddp_backend", "gloo"]
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" and "--use_cpu" not in argv:
            argv += ["--use_cpu", "true"]
    return argv


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`true`/`last` means the newest checkpoint in output_dir; anything else is a path."""
    from transformers.trainer_utils import get_last_checkpoint

    if not resume_from_checkpoint or resume_from_checkpoint.lower() in ("false", "none"):
        return None
    if resume_from_checkpoint.lower() in ("true", "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise UserError(f"resume_from_checkpoint: no checkpoint-* directory in {output_dir}")
        return last
    if not os.path.isdir(resume_from_checkpoint):
        raise UserError(f"resume_from_checkpoint: directory not found: {resume_from_checkpoint}")
    return resume_from_checkpoint


def mark_incomplete(output_dir: str | Path) -> None:
    """Remove an old manifest first, so a run that dies midway is never taken as finished."""
    (Path(output_dir) / MANIFEST_NAME).unlink(missing_ok=True)


def publish(staging_dir: str | Path, output_dir: str | Path) -> None:
    """Move a finished staging directory's files into output_dir, the manifest last."""
    staging_dir, output_dir = Path(staging_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = sorted(staging_dir.iterdir(), key=lambda p: p.name == MANIFEST_NAME)
    for entry in entries:
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging_dir.rmdir()


def model_card(title: str, summary: str, sections: dict[str, dict | str], tags: list[str]) -> str:
    """A README.md with Hub front matter and one table per section. Never include tokens or keys."""
    lines = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---", "", f"# {title}", "", summary, ""]
    for heading, body in sections.items():
        lines += [f"## {heading}", ""]
        if isinstance(body, dict):
            lines += ["| key | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in body.items()], ""]
        else:
            lines += [body, ""]
    return "\n".join(lines)
