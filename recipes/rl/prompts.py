"""Prompts for RL: the embedded default's held-out prompt splits, or a Hub prompt set.

Embedded default (`dataset_path: outputs/sft_data`, from data_prep.build_sft_data): train on the
`rl_prompts` split and evaluate on `test`, both `messages` rows whose prompt is every message but
the final assistant turn. `task`, `answer` and `safety_label` are kept for the rule-based reward
and the exact-match evaluation.

Hub (`dataset_name`, online users): any dataset with a `prompt` column (a string or a list of
messages, e.g. trl-lib/ultrafeedback-prompt) or a `messages` column (the trailing assistant turn,
if any, is dropped and kept as `answer`). Rows without a task get task "chat" (no exact match).
"""

from __future__ import annotations

from data_prep.artifacts import UserError

KEPT_COLUMNS = ("task", "answer", "safety_label")


def prompt_row(row: dict) -> dict:
    """One RL prompt row: {"prompt": messages or string, "task", "answer", "safety_label"}."""
    if "prompt" in row and row["prompt"] is not None:
        prompt, answer = row["prompt"], row.get("answer")
    elif "messages" in row:
        messages = row["messages"] or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("field 'messages' must be a list of messages with role and content")
        messages = list(messages)
        answer = row.get("answer")
        if messages and messages[-1].get("role") == "assistant":
            answer = answer if answer is not None else messages[-1]["content"]
            messages = messages[:-1]
        prompt = messages
    else:
        raise ValueError("missing field 'prompt' (or 'messages')")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ValueError("field 'prompt' must be a non-empty list of messages with role and content")
        if prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt ends with an assistant turn: nothing is left for the policy to answer")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("field 'prompt' is empty or neither a string nor a list of messages")
    return {"prompt": prompt, "task": row.get("task") or "chat",
            "answer": answer if isinstance(answer, str) else None, "safety_label": row.get("safety_label") or ""}


def to_prompt_dataset(dataset, name: str):
    """Convert a `datasets.Dataset` of messages/prompt rows; a bad row stops with one line naming it."""
    from datasets import Dataset

    rows = []
    for index, row in enumerate(dataset):
        try:
            rows.append(prompt_row(row))
        except ValueError as err:
            raise UserError(f"{name}: row {index}: {err}") from None
    if not rows:
        raise UserError(f"{name}: no prompts")
    return Dataset.from_list(rows)


def load_prompts(dataset_path: str | None, train_split: str, test_split: str | None, dataset_name: str | None = None,
                 dataset_config: str | None = None, max_train: int | None = None, max_test: int | None = None,
                 train_tasks: list[str] | None = None):
    """(inputs for the manifest, train prompts, test prompts or None). `train_tasks` keeps only the training
    prompts of those task families (before `max_train`); the test prompts keep every family."""
    if bool(dataset_path) == bool(dataset_name):
        raise UserError("set exactly one of dataset_path (a data_prep output) and dataset_name (a Hub prompt set)")
    if not train_split or train_split.lower() == "none":
        raise UserError(f"dataset_train_split: name the split of training prompts (got {train_split!r}); only the "
                        "test split can be none")
    if test_split == train_split:  # the before/after figures would be published as held-out
        raise UserError(f"dataset_test_split: {test_split} is also the training split, so the held-out evaluation "
                        "would score prompts the policy trained on; name another split, or none")
    splits = [s for s in (train_split, test_split) if s and s.lower() != "none"]
    if dataset_path:
        from data_prep.artifacts import load_saved_dataset, read_manifest

        manifest = read_manifest(dataset_path, "dataset")
        dataset = load_saved_dataset(dataset_path)
        for split in splits:
            if split not in dataset:
                raise UserError(f"{dataset_path}: no split '{split}' (has {', '.join(dataset)})")
        inputs = {"dataset_path": dataset_path, "dataset_fingerprint": manifest["fingerprint"]}
        raw = {split: dataset[split] for split in splits}
        source = dataset_path
    else:
        from datasets import load_dataset

        raw = {}
        for split in splits:
            try:
                raw[split] = load_dataset(dataset_name, dataset_config, split=split)
            except Exception as err:  # offline, unknown name or split: one line, not a traceback
                raise UserError(f"Hub prompt set {dataset_name} [{split}]: {str(err).splitlines()[0]}") from None
        inputs = {"dataset_name": dataset_name, "dataset_config": dataset_config,
                  "dataset_fingerprint": getattr(raw[train_split], "_fingerprint", None)}
        source = dataset_name
    out = []
    for split, limit in ((train_split, max_train), (test_split, max_test)):
        if split not in raw:
            out.append(None)
            continue
        data = raw[split]
        if train_tasks and split == train_split:
            data = _only_tasks(data, train_tasks, f"{source}[{split}]")
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        out.append(to_prompt_dataset(data, f"{source}[{split}]"))
    if train_tasks:
        inputs["train_tasks"] = list(train_tasks)
    return inputs, out[0], out[1]


def _only_tasks(data, tasks: list[str], name: str):
    if "task" not in data.column_names:
        raise UserError(f"train_tasks: {name} has no task column to select by")
    present = set(data["task"])
    unknown = [t for t in tasks if t not in present]
    if unknown:
        raise UserError(f"train_tasks: {', '.join(unknown)} not among the tasks of {name} "
                        f"({', '.join(sorted(present))})")
    wanted = set(tasks)
    return data.filter(lambda task: task in wanted, input_columns="task")


def truncate_prompts(dataset, tokenizer, max_prompt_tokens: int | None):
    """(dataset, how many prompts were shortened) so that every rendered prompt fits max_prompt_tokens.

    A conversation loses its oldest turns first (the system message stays); a single message that is
    still too long, or a plain-text prompt, keeps its last tokens. A prompt that cannot fit even then
    (its system message and chat template alone are too long) is refused, naming its row.
    """
    if not max_prompt_tokens:
        return dataset, 0

    def length(prompt) -> int:
        if isinstance(prompt, str):
            return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])

    def fit_tail(text: str, rebuild):
        """rebuild(the last n tokens of text) for the largest n that fits. Decoding and re-encoding can
        merge tokens differently, so each try is measured, not assumed."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(ids) - (length(rebuild(text)) - max_prompt_tokens)
        while keep >= 1:
            candidate = rebuild(tokenizer.decode(ids[-keep:]))
            over = length(candidate) - max_prompt_tokens
            if over <= 0:
                return candidate
            keep -= over
        return None

    count = 0

    def shorten(index: int, row):
        nonlocal count
        prompt = row["prompt"]
        if length(prompt) <= max_prompt_tokens:
            return row
        count += 1
        if isinstance(prompt, str):
            fitted = fit_tail(prompt, lambda text: text)
        else:
            system = [m for m in prompt[:1] if m["role"] == "system"]
            rest = prompt[len(system):]
            while len(rest) > 1 and length(system + rest) > max_prompt_tokens:
                rest = rest[1:]
                while len(rest) > 1 and rest[0]["role"] != "user":
                    rest = rest[1:]
            fitted = system + rest
            if length(fitted) > max_prompt_tokens:
                head, last = fitted[:-1], fitted[-1]
                fitted = fit_tail(last["content"], lambda text: head + [{**last, "content": text}])
        if fitted is None:
            raise UserError(f"max_prompt_tokens {max_prompt_tokens}: prompt row {index} cannot be cut to fit (its "
                            "system message and chat template alone are longer); raise max_prompt_tokens or drop "
                            "the row")
        return {**row, "prompt": fitted}

    rows = [shorten(index, row) for index, row in enumerate(dataset)]
    from datasets import Dataset

    return Dataset.from_list(rows), count
