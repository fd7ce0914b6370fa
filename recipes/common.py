"""Small helpers shared by the recipes: loading stage outputs, resume paths, the final-output hand-off
and model cards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from data_prep.artifacts import MANIFEST_NAME, UserError, claim_output_dir, load_saved_dataset, read_manifest


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


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str,
                   written_last: str = "trainer_state.json", optimizer: dict | None = None) -> str | None:
    """`true`/`last` means the newest complete checkpoint in output_dir; anything else is a path, which must be
    a complete checkpoint. Trainer writes checkpoints in place, so a save that died midway leaves a directory
    with the weights but not all the state: complete means it holds `written_last` (the file its save writes
    last) and the random states, which a `save_only_model` checkpoint lacks along with the optimizer.
    `optimizer` (`optimizer_settings`): refuse a checkpoint whose optimizer state was built with others."""
    if not resume_from_checkpoint or resume_from_checkpoint.lower() in ("false", "none"):
        return None
    resume = _complete_checkpoint(resume_from_checkpoint, output_dir, written_last)
    if optimizer is not None:
        _refuse_other_optimizer(resume, optimizer)
    return resume


def _complete_checkpoint(resume_from_checkpoint: str, output_dir: str, written_last: str) -> str:
    if resume_from_checkpoint.lower() not in ("true", "last"):
        if not os.path.isdir(resume_from_checkpoint):
            raise UserError(f"resume_from_checkpoint: directory not found: {resume_from_checkpoint}")
        missing = _incomplete_checkpoint(Path(resume_from_checkpoint), written_last)
        if missing:
            raise UserError(f"resume_from_checkpoint: {resume_from_checkpoint} {missing}")
        return resume_from_checkpoint
    from transformers.trainer_utils import sort_checkpoints  # by step, oldest first

    newest_first = [Path(p) for p in reversed(sort_checkpoints(output_dir))] if os.path.isdir(output_dir) else []
    if not newest_first:
        raise UserError(f"resume_from_checkpoint: no checkpoint-* directory in {output_dir}")
    for checkpoint in newest_first:
        missing = _incomplete_checkpoint(checkpoint, written_last)
        if not missing:
            return str(checkpoint)
        if os.environ.get("RANK", "0") == "0":
            print(f"[resume] passing over {checkpoint.name}: it {missing}", file=sys.stderr)
    raise UserError(f"resume_from_checkpoint: no complete checkpoint in {output_dir} (the newest, "
                    f"{newest_first[0].name}, {_incomplete_checkpoint(newest_first[0], written_last)})")


def _incomplete_checkpoint(checkpoint: Path, written_last: str) -> str | None:
    """What keeps `checkpoint` from continuing a run, or None."""
    if not (checkpoint / written_last).is_file():
        return f"has no {written_last} (a save that was interrupted, or not a checkpoint of this recipe)"
    if written_last.endswith(".json"):
        try:
            state = json.loads((checkpoint / written_last).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            state = None
        if not isinstance(state, dict):  # Trainer would die on it after the model has loaded
            return f"has a damaged {written_last} (not a JSON object: a save that was cut short)"
    if not any(checkpoint.glob("rng_state*.pth")):
        return ("holds no optimizer, schedule or random state (saved with save_only_model), so it cannot continue "
                "a run; start a new run from its weights instead")
    return None


OPTIMIZER_SETTINGS_NAME = "optimizer_settings.json"  # in checkpoint-N: what its optimizer state was built with
OPTIMIZER_STATE_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


def optimizer_settings(training_args, **extra) -> dict:
    """What a checkpoint's optimizer and scheduler state fix: a resume restores each param group's lr, betas,
    eps and weight decay and the schedule's base learning rates, so a new value would be ignored without a
    word (and another optimizer, whose state has other param groups or fields, would not load)."""
    return {"optimizer": str(getattr(training_args.optim, "value", training_args.optim)),
            **{key: getattr(training_args, key) for key in OPTIMIZER_STATE_KEYS}, **extra}


def save_optimizer_settings(trainer, settings: dict) -> None:
    """Write `settings` into every checkpoint, for `resolve_resume(..., optimizer=settings)` to compare."""
    from transformers import TrainerCallback

    class SaveOptimizerSettings(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                (checkpoint / OPTIMIZER_SETTINGS_NAME).write_text(json.dumps(settings, indent=2))

    trainer.add_callback(SaveOptimizerSettings())


def _refuse_other_optimizer(checkpoint: str, settings: dict) -> None:
    try:
        saved = json.loads((Path(checkpoint) / OPTIMIZER_SETTINGS_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # saved before checkpoints recorded them, or by another script: the Trainer loads what it can
    for key, value in settings.items():
        if isinstance(saved, dict) and key in saved and saved[key] != value:
            raise UserError(f"resume_from_checkpoint: {checkpoint} was trained with {key} {saved[key]}, and the "
                            f"settings give {value}; a resume restores the checkpoint's optimizer state, so "
                            "resume with its settings, or start a new run from its weights")


TOKEN_COUNT_NAME = "num_tokens.json"


def keep_token_count_across_resume(trainer, resume: str | None) -> None:
    """TRL's SFT, reward and DPO trainers keep the running count of trained tokens (the logged `num_tokens`)
    outside their checkpoints, so a resumed run would count from 0 again. Save the count into every
    checkpoint and, on resume, start from the one saved there."""
    import json

    from transformers import TrainerCallback

    class SaveTokenCount(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                (checkpoint / TOKEN_COUNT_NAME).write_text(json.dumps({"num_tokens": trainer._total_train_tokens}))

    trainer.add_callback(SaveTokenCount())
    if resume is None:
        return
    saved = Path(resume) / TOKEN_COUNT_NAME
    if saved.is_file():
        trainer._total_train_tokens = json.loads(saved.read_text())["num_tokens"]
    else:  # a checkpoint from elsewhere: its log holds the count as of its last logged step
        state = Path(resume) / "trainer_state.json"
        rows = json.loads(state.read_text()).get("log_history", []) if state.is_file() else []
        counts = [row["num_tokens"] for row in rows if "num_tokens" in row]
        trainer._total_train_tokens = counts[-1] if counts else 0


STAGING_NAMES = (".final-tmp", ".eval-tmp")
PREVIOUS_FINAL_NAME = ".previous-final.json"  # the final files of the run this one replaces


def _kept_across_runs(name: str) -> bool:
    """Checkpoints (for resume), logging folders and our own bookkeeping outlive a run; nothing else does."""
    return name.startswith(("checkpoint-", ".", "_")) or name in ("runs", MANIFEST_NAME)


def claim_run_dir(output_dir: str | Path, stage: str, inputs: dict) -> None:
    """Refuse, before any model loads, an output_dir this recipe must not publish into (`claim_output_dir`):
    one that overlaps an input, another stage's output, or a folder of other files. Accepted without a
    manifest: what an unfinished run of a recipe leaves (checkpoints, logs, the final files of the run it
    was replacing, listed by `mark_incomplete`)."""
    replaced = previous_final_names(output_dir)
    claim_output_dir(output_dir, stage, inputs, ours=lambda name: _kept_across_runs(name) or name in replaced)


def previous_final_names(output_dir: str | Path) -> set[str]:
    """The final files of the run being replaced, as `mark_incomplete` listed them; a damaged list stops here,
    before any work, not in `publish` after the whole run. Only plain names in output_dir count: an entry such
    as "" or "../x" would make `publish` delete output_dir itself or something outside it."""
    previous = Path(output_dir) / PREVIOUS_FINAL_NAME
    if not previous.is_file():
        return set()
    try:
        names = json.loads(previous.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UserError(f"{previous}: damaged (not a JSON list of names); it lists the files of the finished run "
                        "this one replaces, for the new run to remove: delete the stale files and this list, or "
                        "choose another output_dir")
    return {name for name in names if name and name not in (".", "..") and "/" not in name and "\\" not in name
            and not _kept_across_runs(name)}


def mark_incomplete(output_dir: str | Path) -> None:
    """Remove an old manifest first, so a run that dies midway is never taken as finished. The finished run's
    other final files are listed first, for `publish` to remove those this run does not write again: a full
    model published over an earlier LoRA run would otherwise sit beside its stale adapter files, and loading
    the directory would pick the adapter. A staging directory left by a crashed run is cleared."""
    output_dir = Path(output_dir)
    for name in STAGING_NAMES:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    manifest = output_dir / MANIFEST_NAME
    if manifest.is_file():
        previous = sorted(entry.name for entry in output_dir.iterdir() if not _kept_across_runs(entry.name))
        (output_dir / PREVIOUS_FINAL_NAME).write_text(json.dumps(previous) + "\n")
        manifest.unlink()


def publish(staging_dir: str | Path, output_dir: str | Path, trainer=None) -> None:
    """Move a finished staging directory's files into output_dir, the manifest last. With a `trainer` whose
    args say `push_to_hub`, then upload the finished output_dir (model, tokenizer, our model card, metrics and
    manifest; no checkpoints) to the Hub repo that the Trainer created at start."""
    staging_dir, output_dir = Path(staging_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = sorted(staging_dir.iterdir(), key=lambda p: p.name == MANIFEST_NAME)
    previous = output_dir / PREVIOUS_FINAL_NAME
    if previous.is_file():  # the replaced run's final files that this run does not write again
        for name in previous_final_names(output_dir) - {entry.name for entry in entries}:
            stale = output_dir / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        previous.unlink()
    for entry in entries:
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging_dir.rmdir()
    if trainer is not None and trainer.args.push_to_hub:
        _push_output_dir(trainer, output_dir)


def _push_output_dir(trainer, output_dir: Path) -> None:
    from huggingface_hub import HfApi

    trainer._finish_current_push()  # a checkpoint push still in flight must not land after the final files
    try:
        HfApi().upload_folder(  # the token comes from HF_TOKEN or `hf auth login` (parse_config refuses hub_token)
            repo_id=trainer.hub_model_id, folder_path=str(output_dir), revision=trainer.args.hub_revision,
            commit_message=f"{output_dir.name}: final model", ignore_patterns=["checkpoint-*", ".*", "_*"])
    except Exception as error:  # the run itself is complete on disk; say so, in one line without the token
        raise UserError(f"push_to_hub: {output_dir} is complete, but the upload to {trainer.hub_model_id} failed "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"upload it with `hf upload {trainer.hub_model_id} {output_dir}`") from None


def save_trained(trainer, train_result, trainable: int, total: int) -> tuple[Path, dict]:
    """Save a Trainer's model and tokenizer into `<output_dir>/.final-tmp` and return that staging
    directory with the run's standard metrics. Every rank must call this: ZeRO-3 gathers the full
    weights here. The caller adds its files to the staging directory and then publishes it."""
    staging = Path(trainer.args.output_dir) / ".final-tmp"
    trainer.save_model(str(staging), _internal_call=True)  # no push of the unfinished output_dir: publish() pushes
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(staging))
    metrics = {"train_loss": train_result.training_loss, "steps": trainer.state.global_step,
               "trainable_params": trainable, "total_params": total,
               "train_runtime_s": train_result.metrics.get("train_runtime")}
    return staging, metrics


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


@contextlib.contextmanager
def no_zero3_init():
    """Load a model whole on one process although ZeRO-3 is configured (for evaluation after training).

    transformers partitions every model built while a ZeRO-3 config is registered, which is a collective
    call; a single rank loading a copy to evaluate would wait forever for the others.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_splits(path: str, train_split: str, test_split: str, validate) -> tuple[dict, object, object]:
    """(manifest, train, test) of a finished data_prep output, every row checked by `validate(rows, name)`."""
    if train_split == test_split:  # the held-out figures (exact match, pairwise accuracy) would be training ones
        raise UserError(f"dataset_test_split: {test_split} is also the training split, so the held-out evaluation "
                        "would score rows the model trained on; name another split")
    manifest = read_manifest(path, "dataset")
    dataset = load_saved_dataset(path)
    for split in (train_split, test_split):
        if split not in dataset:
            raise UserError(f"{path}: no split '{split}' (has {', '.join(dataset)})")
        validate(dataset[split], f"{path}[{split}]")
    return manifest, dataset[train_split], dataset[test_split]


TRAINING_SUMMARY_KEYS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "learning_rate", "lr_scheduler_type", "warmup_steps", "max_length", "bf16", "seed", "world_size")


def training_summary(args, extra: tuple[str, ...] = ()) -> dict:
    """The training settings a model card and manifest record."""
    return {k: getattr(args, k) for k in TRAINING_SUMMARY_KEYS + extra if hasattr(args, k)}


def check_settings(config, at_least_1=(), positive=(), non_negative=(), at_most_1=()) -> None:
    """Refuse numbers no run can use while the settings are parsed, before any model loads, in one line
    naming the key (a zero batch size or temperature otherwise fails mid-run with a ZeroDivisionError, a
    NaN or a hang). A key set to None (optional, unset) is not checked."""
    rules = [(at_least_1, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
             (non_negative, lambda v: v >= 0, ">= 0"), (at_most_1, lambda v: v <= 1, "<= 1")]
    for keys, holds, wanted in rules:
        for key in keys:
            value = getattr(config, key)
            if value is not None and not holds(value):
                raise UserError(f"{key} must be {wanted}, got {value}")


def check_training_numbers(args, epochs_matter: bool = True) -> None:
    """TrainingArguments numbers no run can use, refused while the settings are parsed (Trainer would fail
    on them mid-run, or train 0 or 1 steps and publish that as a finished run). `epochs_matter` False: the
    run's length is set otherwise (PPO's total_episodes)."""
    check_settings(args, at_least_1=("per_device_train_batch_size", "per_device_eval_batch_size",
                                     "gradient_accumulation_steps"), non_negative=("learning_rate",))
    for key in ("seed", "data_seed"):  # set_seed's ValueError came after the data and the model had loaded
        value = getattr(args, key, None)
        if value is not None and not 0 <= value < 2**32:
            raise UserError(f"{key} must be in [0, 2**32 - 1], got {value}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"max_steps must be >= 1, or -1 to train num_train_epochs epochs; got {args.max_steps}")
    if epochs_matter and args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UserError(f"num_train_epochs must be > 0 (or set max_steps), got {args.num_train_epochs}")
    if hasattr(args, "max_length"):  # SFT, reward, DPO; a zero length tokenized every row to nothing
        check_settings(args, at_least_1=("max_length",))


def account_for_dropped_rows(trainer, given: dict[str, int], why: str, log) -> None:
    """TRL drops rows while it prepares a split, without a word: SFT a conversation that truncation to
    max_length leaves no assistant token, RewardTrainer a pair with a side longer than max_length. Say how
    many went, and refuse a split left empty (Trainer would stop on it with an IndexError, or at the end,
    in evaluation). `given`: rows per split before TRL ("train", "test")."""
    prepared = {"train": trainer.train_dataset, "test": trainer.eval_dataset}
    for split, count in given.items():
        kept = len(prepared[split])
        if kept == 0:
            raise UserError(f"max_length {trainer.args.max_length}: all {count} {split} rows were dropped ({why}); "
                            "raise max_length")
        if kept < count:
            log(f"{count - kept} of {count} {split} rows dropped at max_length {trainer.args.max_length} ({why})")


MERGEABLE_ADAPTERS = ("LORA", "IA3")


def model_load_kwargs(model_args) -> dict:
    """TRL ModelConfig's `dtype`, `attn_implementation` and `model_revision` as from_pretrained keywords."""
    import torch

    dtype = model_args.dtype
    return {"attn_implementation": model_args.attn_implementation, "revision": model_args.model_revision,
            "dtype": getattr(torch, dtype) if dtype not in (None, "auto") else "auto"}


def load_pretrained(path: str, auto_class, trust_remote_code: bool = False, for_training: bool = False, **kwargs):
    """(model, tokenizer, parent manifest) from a stage output, a PEFT adapter directory or a Hub id.

    Weights load from safetensors only. An adapter directory loads its base model first, then the
    adapter (our bottleneck adapters included). Missing pieces give one line naming the directory.
    An adapter is merged into its base (LoRA, IA3) where the model starts a training run (`for_training`:
    PEFT would load it frozen, and SFT trained 0 parameters) or takes another head than the adapter's task
    (an SFT adapter as the start of a reward model: PEFT's causal-LM wrapper crashed on the classifier).
    """
    import json

    from transformers import AutoTokenizer

    import recipes.bottleneck_adapter  # noqa: F401  registers the BOTTLENECK PEFT type for from_pretrained

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    local = Path(path)
    adapter_config = local / "adapter_config.json"
    if local.is_dir() and adapter_config.is_file():
        from peft import PeftConfig, PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path or (_looks_local(base_path) and not (Path(base_path) / "config.json").is_file()):
            raise UserError(f"adapter {path}: its base model {base_path!r} is missing")
        base, tokenizer, _ = load_pretrained(base_path, auto_class, trust_remote_code, **kwargs)
        config = PeftConfig.from_pretrained(str(local))
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        task = getattr(config.task_type, "value", config.task_type)
        head = "SEQ_CLS" if auto_class.__name__ == "AutoModelForSequenceClassification" else "CAUSAL_LM"
        merge = for_training or (task is not None and task != head)
        why = "start a training run" if for_training else f"serve as a {head} model (it is a {task} adapter)"
        if merge and peft_type not in MERGEABLE_ADAPTERS:
            raise UserError(f"{path}: a {peft_type} adapter cannot be merged into its base to {why}; start from its "
                            f"base model {base_path}, or from a LoRA or IA3 output")
        if merge and kwargs.get("quantization_config") is not None:  # a lossy merge into 4/8-bit weights
            raise UserError(f"{path}: an adapter cannot be merged into a quantized base to {why}; start from a "
                            "merged output (the SFT recipe's merge_adapter: true) or load the base unquantized")
        if merge and task != head:
            config.task_type = None  # PEFT's plain wrapper: the adapter's layers onto this head's backbone
        model = PeftModel.from_pretrained(base, str(local), config=config)
        if merge:
            model = model.merge_and_unload().requires_grad_(True)  # PEFT froze the base; a new run trains it
            # TRL builds DPO/GRPO/RLOO references from this name: the adapter directory (base + adapter,
            # the policy as it starts), not the base the merge came from
            model.config._name_or_path = model.name_or_path = str(local)
        if (local / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)
        return model, tokenizer, _read_parent(local)
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"{path}: not a model checkpoint (no config.json)")
    if not local.is_dir() and _looks_local(path):
        raise UserError(f"model directory not found: {path}")
    from safetensors import SafetensorError

    try:
        model, loading = auto_class.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                    output_loading_info=True, **kwargs)
    except (OSError, SafetensorError) as err:  # missing files, or a truncated or corrupt weights file
        raise UserError(f"{path}: {str(err).splitlines()[0]}") from None
    try:
        # the model's revision for its tokenizer too: a pinned model with the tokenizer of another commit
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  **({"revision": kwargs["revision"]} if kwargs.get("revision") else {}))
    except (OSError, ValueError) as err:  # no tokenizer files: transformers asks for sentencepiece or tiktoken
        raise UserError(f"{path}: no usable tokenizer ({str(err).splitlines()[0]})") from None
    model.weights_missing_at_load = sorted(loading["missing_keys"])  # initialised fresh: refuse_untrained_score_head
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        raise UserError(f"{path}: the tokenizer has {len(tokenizer)} tokens and the model's embedding "
                        f"{embeddings.num_embeddings} rows, so some token ids index past it; resize the embedding "
                        "or use the tokenizer the model was trained with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, _read_parent(local)


def refuse_untrained_score_head(key: str, path: str, model, manifest: dict) -> None:
    """A model that never had a score head loads as a reward model with a fresh random one, and judges at
    chance (an SFT model's reward_accuracy came out 0.5). Ours say what they are in the manifest; a Hub
    adapter in its task type; a Hub model by the weights its checkpoint lacked (`load_pretrained`)."""
    stage = manifest.get("stage")
    if stage is not None:
        if stage != "reward":
            raise UserError(f"{key}: {path} is a {stage} output, not a reward model (its score head would be "
                            "untrained); pass the reward recipe's output")
        return
    adapters = getattr(model, "peft_config", None)  # a PEFT adapter's base config names the causal LM
    if adapters:
        task = getattr(next(iter(adapters.values())), "task_type", None)
        if getattr(task, "value", task) != "SEQ_CLS":
            raise UserError(f"{key}: {path} is a {getattr(task, 'value', task)} adapter, not a SEQ_CLS one (its "
                            "score head would be untrained)")
        return
    fresh = getattr(model, "weights_missing_at_load", [])
    if fresh:
        saved_as = (getattr(model.config, "architectures", None) or ["model without architectures"])[0]
        raise UserError(f"{key}: {path} is a {saved_as}, not a trained sequence classifier (its score head would be "
                        f"untrained: {', '.join(fresh)} not in its weights)")


def check_special_tokens(training_args, tokenizer, model_path: str) -> None:
    """TRL's trainers refuse an `eos_token`/`pad_token` missing from the vocabulary with a multi-line
    traceback; refuse it here in one line, before the trainer is built."""
    vocab = tokenizer.get_vocab()
    for key in ("eos_token", "pad_token"):
        token = getattr(training_args, key, None)  # not every config has both, and TRL deprecates pad_token
        if token is not None and token not in vocab:
            raise UserError(f"{key}: {token!r} is not in the vocabulary of the tokenizer of {model_path}")


def check_max_length(training_args, model, model_path: str) -> None:
    """A max_length past the model's positions fails at the first long batch (an index error, learned
    positions) or trains on positions it never saw (RoPE); refused before the trainer is built."""
    max_length = training_args.max_length
    if max_length is None:
        return
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise UserError(f"max_length {max_length} is longer than max_position_embeddings {positions} of "
                        f"{model_path}")


def _looks_local(path: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else, or a path under outputs/, is a local directory."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).parts[0] == "outputs"


def _read_parent(directory: Path) -> dict:
    try:
        return read_manifest(directory)
    except UserError:
        return {}


def fused_head_on_labelled_positions_only() -> bool:
    """Make TRL's fused LM head score only the positions that carry loss on a CPU too, not only under Triton.

    TRL 1.16 computes the SFT/DPO/GRPO losses through a chunked, fused LM head. With Triton (CUDA, XPU)
    it projects only the labelled positions; elsewhere it projects every position of the padded
    batch, so that compiled backends (Neuron) see one tile shape. On a CPU, in eager mode, there is
    nothing to recompile, and under assistant-only loss only ~24% of the tokens of the embedded chat
    data carry loss: that head took 59% of an SFT step's time (recipes/sft/README.md, profile). The
    math per position is the same either way; only the rows fed to the projection change. Returns
    whether the switch was made (False when this TRL version lacks the hook, then nothing changes).
    """
    try:
        import trl.trainer.utils as trl_utils
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        return False
    if not callable(getattr(trl_utils, "_use_triton", None)):
        return False
    trl_utils._use_triton = lambda device: _use_triton(device) or device.type == "cpu"
    return True
