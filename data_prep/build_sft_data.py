"""Build the chat data for SFT (and the held prompts for reward modelling and RL).

    python -m data_prep.build_sft_data --output_dir outputs/sft_data                        # embedded default
    python -m data_prep.build_sft_data --source local --input_path chats.jsonl --format messages \
        --output_dir outputs/my_sft_data
    python -m data_prep.build_sft_data --source hub --dataset_name HuggingFaceH4/ultrachat_200k \
        --train_split train_sft --test_split test_sft --max_rows 200000 --output_dir outputs/sft_data_ultrachat
    python -m data_prep.build_sft_data --source hub --dataset_name tatsu-lab/alpaca --format alpaca \
        --test_split none --output_dir outputs/alpaca_sft_data

Output: a `datasets.DatasetDict` saved with `save_to_disk`, columns `messages` (TRL's
conversational format: system/user/assistant, ending with the assistant), `task`, `answer` (the
last assistant message, the reference for `data_prep.chat_tasks.check_answer`) and
`safety_label`, plus `manifest.json` with rows per split and per task.

The embedded default (data_prep/chat_tasks.py) writes four splits with no prompt in two of
them: `train` (72,000 rows, SFT), `test` (300, held-out SFT evaluation, 50 per family),
`preference_prompts` (4,800, for data_prep.build_preference_data) and `rl_prompts` (2,000, for RL);
it takes about 2 minutes: no prompt may repeat, so once the families with few distinct questions
(docstring, units, safety, arithmetic) run out of single-turn ones, draws are redrawn or become
multi-turn. Hub and local sources give `train` and `test` (task "chat"); without a test split,
`test_fraction` of the unique prompts is held out.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.artifacts import (
    UserError,
    atomic_output_dir,
    build_manifest,
    claim_output_dir,
    file_fingerprint,
    fingerprint,
    parse_config,
    refuse_unread_options,
    run_cli,
    write_manifest,
)
from data_prep.chat_tasks import (
    FAMILIES,
    SPLITS,
    ChatTaskGenerator,
    alpaca_to_messages,
    message_problem,
    prompt_key,
    validate_messages,
)
from data_prep.steps import json_records, read_parquet, read_utf8

FORMATS = ("messages", "alpaca")


@dataclass
class SFTDataArguments:
    output_dir: str = field(default="outputs/sft_data", metadata={"help": "Where the DatasetDict and manifest go."})
    source: str = field(default="embedded", metadata={"help": "embedded (generated tasks), local or hub."})
    # embedded
    train_size: int = field(default=72000, metadata={"help": "SFT rows (embedded)."})
    test_size: int = field(default=300, metadata={"help": "Held-out SFT evaluation rows, balanced over families."})
    preference_size: int = field(default=4800, metadata={"help": "Prompts kept for the reward model's data."})
    rl_size: int = field(default=2000, metadata={"help": "Prompts kept for RL."})
    families: list[str] = field(default_factory=lambda: list(FAMILIES), metadata={"help": "Task families to generate."})
    system_fraction: float = field(default=0.3, metadata={"help": "Share of rows with a system prompt."})
    multi_turn_fraction: float = field(default=0.3, metadata={"help": "Share of rows with 2-3 user turns."})
    max_docstring_functions: int = field(default=40, metadata={"help": "Stdlib functions in the docstring family."})
    train_followup_fraction: float | None = field(
        default=None, metadata={"help": "Share of train rows, among those whose question has a follow-up ('Now "
                                        "reverse it.'), that end with one (made two-turn if needed; held-out splits "
                                        "unchanged). Default: half of the multi-turn rows."})
    train_family_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per family, in the order of --families: their shares of the "
                                        "train rows (held-out splits stay balanced). Default: equal."})
    # local / hub
    input_path: str | None = field(default=None, metadata={"help": "A .jsonl/.json/.parquet file for source=local."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset for source=hub."})
    dataset_config: str | None = field(default=None)
    train_split: str = field(default="train")
    test_split: str | None = field(default="test", metadata={"help": "Hub split for test; 'none' splits off test_fraction."})
    format: str = field(default="messages", metadata={"help": "messages (a `messages` column) or alpaca."})
    max_rows: int | None = field(default=None, metadata={"help": "Read at most this many rows (per split of a Hub "
                                                                   "dataset; of the file for source=local)."})
    test_fraction: float = field(default=0.05, metadata={"help": "Held out when there is no test split."})
    seed: int = field(default=42)
    overwrite: bool = field(default=True)


# ----------------------------------------------------------------------------- readers
def read_local_rows(path: str) -> tuple[list, list[str]]:
    """(rows, where each row is) of a .jsonl, .json (a list of objects) or .parquet file: `where` names the file
    and the line (.jsonl, from 1, as an editor shows it), item (.json) or row (.parquet), for later errors."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"input file not found: {file}")
    if file.suffix == ".parquet":
        rows = read_parquet(file).to_pylist()
        return rows, [f"{file}: row {index}" for index in range(len(rows))]
    if file.suffix not in (".jsonl", ".json"):
        raise UserError(f"{file}: unsupported file type (use .jsonl, .json or .parquet)")
    records = list(json_records(file, read_utf8(file)))
    return ([row for _, row, _ in records],
            [f"{file}:{position}" if unit == "line" else f"{file}: item {position}" for position, _, unit in records])


def read_hub_rows(name: str, config: str | None, split: str, max_rows: int | None) -> list[dict]:
    """Stream one split of a Hub dataset (online users only)."""
    from datasets import load_dataset

    try:
        stream = load_dataset(name, config, split=split, streaming=True)
        rows = []
        for row in stream:
            if max_rows is not None and len(rows) >= max_rows:
                break
            rows.append(row)
    except Exception as err:  # the Hub raises many types; the user needs one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"could not open Hub dataset {name} split {split} ({type(err).__name__}: {first})") from None
    return rows


def to_chat_rows(rows: list[dict], fmt: str, name: str, where: list[str] | None = None) -> list[dict]:
    """Convert to {messages, task, answer, safety_label}, keeping only role/content in each message. Errors
    name `where[i]` (a local file's line) or else `name: row i` (a Hub split's row)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (use {' or '.join(FORMATS)})")
    out = []
    for index, row in enumerate(rows):
        at = where[index] if where else f"{name}: row {index}"
        if fmt == "alpaca":
            try:
                row = alpaca_to_messages(row)
            except ValueError as err:
                raise UserError(f"{at}: {err}") from None
        problem = message_problem(row)
        if problem:
            raise UserError(f"{at}: {problem}")
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        out.append({"messages": messages, "task": "chat", "answer": messages[-1]["content"], "safety_label": ""})
    return out


def dedup(rows: list[dict], seen: set[str]) -> list[dict]:
    """Keep the first row of each prompt not in `seen` (and add it there)."""
    kept = []
    for row in rows:
        key = prompt_key(row["messages"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


# ----------------------------------------------------------------------------- build
EMBEDDED_OPTIONS = ("train_size", "test_size", "preference_size", "rl_size", "families", "train_family_weights",
                    "system_fraction", "multi_turn_fraction", "max_docstring_functions", "train_followup_fraction")
# the sources that read each option: another source refuses it when set, and leaves it out of the manifest
SOURCE_OPTIONS = {**dict.fromkeys(EMBEDDED_OPTIONS, ("embedded",)), "input_path": ("local",),
                  **dict.fromkeys(("dataset_name", "dataset_config", "train_split", "test_split"), ("hub",)),
                  **dict.fromkeys(("format", "max_rows", "test_fraction"), ("local", "hub"))}


def check_source_options(args, local_path: str | None, stage: str, read_by: dict[str, tuple[str, ...]]) -> None:
    """Refuse options of another source (a forgotten --source would otherwise build the embedded data instead),
    a max_rows below 1, and an output_dir this `stage` must not replace (the local input's, another stage's)."""
    if args.max_rows is not None and args.max_rows < 1:
        raise UserError(f"max_rows must be >= 1 (or unset, for all), got {args.max_rows}")
    refuse_unread_options(args, "source", read_by)
    claim_output_dir(args.output_dir, stage, {"input_path": args.input_path, "dataset_name": args.dataset_name,
                                              "sft_data_dir": local_path})


def build_splits(args: SFTDataArguments) -> tuple[dict[str, list[dict]], dict]:
    """The rows of each split and the manifest's `inputs`."""
    check_source_options(args, None, "sft_data", SOURCE_OPTIONS)
    if args.source == "embedded":
        generator = ChatTaskGenerator(args.seed, args.families, args.system_fraction, args.multi_turn_fraction,
                                      max_docstring_functions=args.max_docstring_functions,
                                      train_family_weights=args.train_family_weights,
                                      train_followup_fraction=args.train_followup_fraction)
        sizes = dict(zip(SPLITS, (args.train_size, args.test_size, args.preference_size, args.rl_size)))
        inputs = {"source": "embedded", "python": sys.version.split()[0],
                  "docstring_pool": fingerprint(generator.pool), "docstring_functions": len(generator.pool)}
        return generator.generate(sizes), inputs
    if args.source == "local":
        if not args.input_path:
            raise UserError("source=local needs --input_path")
        rows, where = read_local_rows(args.input_path)
        rows = to_chat_rows(rows[: args.max_rows], args.format, args.input_path, where)
        inputs = {"source": "local", "path": args.input_path, "hash": file_fingerprint([args.input_path]),
                  "max_rows": args.max_rows}
        return split_off_test(dedup(rows, set()), args), inputs
    if args.source == "hub":
        if not args.dataset_name:
            raise UserError("source=hub needs --dataset_name")
        name = args.dataset_name
        seen: set[str] = set()
        train = dedup(to_chat_rows(read_hub_rows(name, args.dataset_config, args.train_split, args.max_rows),
                                   args.format, f"{name}:{args.train_split}"), seen)
        inputs = {"source": "hub", "dataset": name, "config": args.dataset_config,
                  "splits": [args.train_split, args.test_split], "max_rows": args.max_rows}
        if args.test_split in (None, "", "none"):
            return split_off_test(train, args), inputs
        test = dedup(to_chat_rows(read_hub_rows(name, args.dataset_config, args.test_split, args.max_rows),
                                  args.format, f"{name}:{args.test_split}"), seen)
        for split, rows in ((args.train_split, train), (args.test_split, test)):
            if not rows:  # an empty split would be dropped from the DatasetDict without a word
                raise UserError(f"{name}:{split}: no conversations"
                                + (" that the train split does not already hold" if split == args.test_split else ""))
        return {"train": train, "test": test}, inputs
    raise UserError(f"unknown source '{args.source}' (use embedded, local or hub)")


def split_off_test(rows: list[dict], args: SFTDataArguments) -> dict[str, list[dict]]:
    """Seeded split of unique prompts into train and test."""
    if not 0 < args.test_fraction < 1:
        raise UserError(f"test_fraction must be in (0, 1), got {args.test_fraction}")
    if len(rows) < 2:
        raise UserError(f"need at least 2 unique conversations, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    n_test = max(1, round(len(rows) * args.test_fraction))
    if n_test == len(rows):  # an empty train split would be dropped from the DatasetDict without a word
        raise UserError(f"test_fraction {args.test_fraction} of {len(rows)} unique conversations holds out all "
                        f"{n_test} and leaves no train rows; lower test_fraction or add rows")
    test = set(order[:n_test])
    return {"train": [r for i, r in enumerate(rows) if i not in test], "test": [r for i, r in enumerate(rows) if i in test]}


def split_stats(rows: list[dict]) -> dict:
    users = [sum(m["role"] == "user" for m in r["messages"]) for r in rows]
    return {
        "rows": len(rows),
        "tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
        "safety_labels": dict(sorted(Counter(r["safety_label"] for r in rows if r["safety_label"]).items())),
        "multi_turn": sum(u > 1 for u in users),
        "with_system": sum(r["messages"][0]["role"] == "system" for r in rows),
    }


def build_sft_data(args: SFTDataArguments) -> dict:
    """Build, validate and save the splits; returns the manifest."""
    from datasets import Dataset, DatasetDict

    splits, inputs = build_splits(args)
    for name, rows in splits.items():
        validate_messages(rows, f"{args.source} {name}")
    data = DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items() if rows})
    outputs = {name: split_stats(rows) for name, rows in splits.items()}
    options = {k: v for k, v in vars(args).items()
               if k not in ("output_dir", "overwrite") and args.source in SOURCE_OPTIONS.get(k, (args.source,))}
    manifest = build_manifest("sft_data", inputs, options, outputs)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        data.save_to_disk(str(tmp))
        write_manifest(tmp, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config([SFTDataArguments], argv)
    manifest = build_sft_data(args)
    out = manifest["outputs"]
    sizes = ", ".join(f"{name} {stats['rows']}" for name, stats in out.items())
    tasks = Counter()
    for stats in out.values():
        tasks.update(stats["tasks"])
    total = sum(stats["rows"] for stats in out.values())
    multi = sum(stats["multi_turn"] for stats in out.values()) / max(total, 1)
    system = sum(stats["with_system"] for stats in out.values()) / max(total, 1)
    print(f"sft_data -> {args.output_dir}: {sizes} rows; tasks " + " ".join(f"{k} {v}" for k, v in sorted(tasks.items()))
          + f"; {multi:.0%} multi-turn, {system:.0%} with a system prompt")
    return manifest


if __name__ == "__main__":
    run_cli(main)
