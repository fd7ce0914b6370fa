"""Build preference pairs for reward modelling (and DPO) from the SFT data's held prompts or the Hub.

    python -m data_prep.build_preference_data --sft_data_dir outputs/sft_data --output_dir outputs/preference_data
    python -m data_prep.build_preference_data --sft_data_dir outputs/sft_data --margin rank \
        --output_dir outputs/preference_data_margin
    python -m data_prep.build_preference_data --source hub --dataset_name trl-lib/ultrafeedback_binarized \
        --format preference --output_dir outputs/preference_data_ultrafeedback
    python -m data_prep.build_preference_data --source hub --dataset_name Anthropic/hh-rlhf --format hh_rlhf \
        --output_dir outputs/hh_rlhf_preference_data

Output: a `datasets.DatasetDict` (train/test) in TRL's explicit-prompt preference format, saved
with `save_to_disk`, plus `manifest.json`. Embedded rows are conversational: `prompt` is a list
of messages, `chosen`/`rejected` are one assistant message each; columns `task` and
`safety_label` say what was asked, and `margin` (the rank difference) is added with
`--margin rank`, which TRL's RewardTrainer subtracts inside its loss.

The embedded default reads the `preference_prompts` split of data_prep.build_sft_data's output
(4,800 prompts, none of them in the SFT train or test splits), ranks K answers for each (correct >
close miss > clearly wrong for verifiable tasks; refusal > compliance for harmful requests;
helpful answer > another prompt's answer > refusal for benign look-alikes, see
`data_prep.chat_tasks.rank_answers`), expands every ranking into its C(K, 2) ordered pairs and
splits train/test by prompt (85:15, stratified by task): 11,568 train and 2,032 test pairs in a few seconds.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from data_prep.artifacts import (
    UserError,
    atomic_output_dir,
    build_manifest,
    file_fingerprint,
    load_saved_dataset,
    parse_config,
    read_manifest,
    run_cli,
    write_manifest,
)
from data_prep.build_sft_data import check_source_options, read_hub_rows, read_local_rows
from data_prep.chat_tasks import (
    hh_rlhf_to_preference,
    preference_pairs_from_rows,
    preference_passthrough,
    preference_problem,
    validate_messages,
    validate_preferences,
)

FORMATS = ("preference", "hh_rlhf")


@dataclass
class PreferenceDataArguments:
    sft_data_dir: str = field(default="outputs/sft_data", metadata={"help": "Output of data_prep.build_sft_data."})
    output_dir: str = field(default="outputs/preference_data")
    source: str = field(default="embedded", metadata={"help": "embedded (rank answers to held prompts), local or hub."})
    margin: str = field(default="none", metadata={"help": "none, or rank: a `margin` column = rank difference."})
    test_fraction: float = field(default=0.15, metadata={"help": "Share of prompts held out (embedded/local)."})
    # local / hub
    input_path: str | None = field(default=None, metadata={"help": "A .jsonl/.json/.parquet file for source=local."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset for source=hub."})
    dataset_config: str | None = field(default=None)
    train_split: str = field(default="train")
    test_split: str | None = field(default="test", metadata={"help": "Hub split for test; 'none' splits off test_fraction."})
    format: str = field(default="preference", metadata={"help": "preference (prompt/chosen/rejected) or hh_rlhf."})
    max_rows: int | None = field(default=None, metadata={"help": "Read at most this many rows (per split of a Hub "
                                                                   "dataset; of the file for source=local)."})
    seed: int = field(default=42)
    overwrite: bool = field(default=True)


def _prompt_text(pair: dict) -> str:
    return json.dumps(pair["prompt"], sort_keys=True, ensure_ascii=False)


def split_by_prompt(pairs: list[dict], test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded train/test split in which all pairs of one prompt land together, stratified by task."""
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_task: dict[str, list[str]] = defaultdict(list)
    for pair in pairs:
        key = _prompt_text(pair)
        if key not in by_task[pair.get("task", "")]:
            by_task[pair.get("task", "")].append(key)
    rng = random.Random(f"{seed}:preference-split")
    test_keys = set()
    for task in sorted(by_task):
        keys = by_task[task]
        rng.shuffle(keys)
        test_keys.update(keys[: max(1, round(len(keys) * test_fraction))] if len(keys) > 1 else [])
    out = {"train": [], "test": []}
    for pair in pairs:
        out["test" if _prompt_text(pair) in test_keys else "train"].append(pair)
    return out


def convert(rows: list[dict], fmt: str, name: str, where: list[str] | None = None) -> list[dict]:
    """prompt/chosen/rejected pairs, keeping only role/content in each message (other keys, typed
    differently across rows, would not fit one Arrow column). Errors name `where[i]` or else `name: row i`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (use {' or '.join(FORMATS)})")
    to_pair = hh_rlhf_to_preference if fmt == "hh_rlhf" else preference_passthrough
    out = []
    for index, row in enumerate(rows):
        at = where[index] if where else f"{name}: row {index}"
        try:
            pair = to_pair(row)
        except ValueError as err:
            raise UserError(f"{at}: {err}") from None
        # checked here, before the split, so that the message names the input row
        problem = preference_problem(pair)
        if problem:
            raise UserError(f"{at}: {problem}")
        for key in ("prompt", "chosen", "rejected"):  # an Arrow column holds one type: strings or lists
            if out and isinstance(pair[key], list) != isinstance(out[0][key], list):
                raise UserError(f"{at}: field '{key}' is {_kind(pair[key])} but in the first row it is "
                                f"{_kind(out[0][key])}; use one format for all rows")
            if isinstance(pair[key], list):
                pair[key] = [{"role": m["role"], "content": m["content"]} for m in pair[key]]
        out.append(pair)
    return out


def _kind(value) -> str:
    return "a list of messages" if isinstance(value, list) else "a string"


# the sources that read each option (margin has its own message: only embedded prompts come with rankings)
SOURCE_OPTIONS = {"sft_data_dir": ("embedded",), "input_path": ("local",),
                  **dict.fromkeys(("dataset_name", "dataset_config", "train_split", "test_split"), ("hub",)),
                  **dict.fromkeys(("format", "max_rows"), ("local", "hub"))}


def build_pairs(args: PreferenceDataArguments) -> tuple[dict[str, list[dict]], dict]:
    if args.margin not in ("none", "rank"):
        raise UserError(f"margin must be none or rank, got '{args.margin}'")
    check_source_options(args, args.sft_data_dir if args.source == "embedded" else None, "preference_data",
                         SOURCE_OPTIONS)
    if args.source == "embedded":
        sft_manifest = read_manifest(args.sft_data_dir, "sft_data", stage="sft_data")
        sft = load_saved_dataset(args.sft_data_dir)
        if "preference_prompts" not in sft:
            raise UserError(f"sft_data directory {args.sft_data_dir} has no preference_prompts split "
                            f"(build it with data_prep.build_sft_data --source embedded and --preference_size above 0)")
        rows = [dict(row) for row in sft["preference_prompts"]]
        validate_messages(rows, f"{args.sft_data_dir} preference_prompts")
        sentences = sorted({answer for split in sft.values()
                            for task, answer in zip(split["task"], split["answer"]) if task == "docstring"})
        pairs = preference_pairs_from_rows(rows, args.seed, None if args.margin == "none" else args.margin, sentences)
        inputs = {"source": "embedded", "sft_data_dir": args.sft_data_dir,
                  "sft_data_fingerprint": sft_manifest["fingerprint"], "prompts": len(rows)}
        return split_by_prompt(pairs, args.test_fraction, args.seed), inputs
    if args.margin != "none":
        raise UserError("margin=rank needs rankings, which only source=embedded has")
    if args.source == "local":
        if not args.input_path:
            raise UserError("source=local needs --input_path")
        rows, where = read_local_rows(args.input_path)
        pairs = convert(rows[: args.max_rows], args.format, args.input_path, where)
        inputs = {"source": "local", "path": args.input_path, "hash": file_fingerprint([args.input_path]),
                  "max_rows": args.max_rows}
        return split_by_prompt(pairs, args.test_fraction, args.seed), inputs
    if args.source == "hub":
        if not args.dataset_name:
            raise UserError("source=hub needs --dataset_name")
        name = args.dataset_name
        inputs = {"source": "hub", "dataset": name, "config": args.dataset_config,
                  "splits": [args.train_split, args.test_split], "max_rows": args.max_rows}
        train = convert(read_hub_rows(name, args.dataset_config, args.train_split, args.max_rows), args.format,
                        f"{name}:{args.train_split}")
        if args.test_split in (None, "", "none"):
            return split_by_prompt(train, args.test_fraction, args.seed), inputs
        test = convert(read_hub_rows(name, args.dataset_config, args.test_split, args.max_rows), args.format,
                       f"{name}:{args.test_split}")
        return {"train": train, "test": test}, inputs
    raise UserError(f"unknown source '{args.source}' (use embedded, local or hub)")


def build_preference_data(args: PreferenceDataArguments) -> dict:
    """Build, validate and save the pairs; returns the manifest."""
    from datasets import Dataset, DatasetDict

    splits, inputs = build_pairs(args)
    for name, pairs in splits.items():
        validate_preferences(pairs, f"{args.source} {name}")
        if not pairs:
            raise UserError(f"no preference pairs in split {name}")
    data = DatasetDict({name: Dataset.from_list(pairs) for name, pairs in splits.items()})
    outputs = {name: {"pairs": len(pairs), "tasks": dict(sorted(Counter(p.get("task", "") for p in pairs).items()))}
               for name, pairs in splits.items()}
    options = {k: v for k, v in vars(args).items()  # sft_data_dir is an input, with its fingerprint
               if k not in ("output_dir", "overwrite", "sft_data_dir")
               and args.source in SOURCE_OPTIONS.get(k, (args.source,))}
    manifest = build_manifest("preference_data", inputs, options, outputs)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        data.save_to_disk(str(tmp))
        write_manifest(tmp, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config([PreferenceDataArguments], argv)
    manifest = build_preference_data(args)
    out = manifest["outputs"]
    prompts = f" from {manifest['inputs']['prompts']} prompts" if "prompts" in manifest["inputs"] else ""
    print(f"preference_data -> {args.output_dir}: train {out['train']['pairs']}, test {out['test']['pairs']} pairs"
          f"{prompts}; margin {args.margin}")
    return manifest


if __name__ == "__main__":
    run_cli(main)
