"""Stage outputs: manifests, atomic writes and one-line errors.

Every stage (data_prep script or recipe) writes one output directory with a
`manifest.json` naming its inputs, options and key figures. The manifest is
written last, so a directory without one is incomplete and later stages refuse
it. Directories that a stage owns outright are built under a temporary name and
renamed into place, so an interrupted run never leaves something that looks done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST_NAME = "manifest.json"


class UserError(Exception):
    """Bad input from the user: reported as one line, without a traceback."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's `main`, turning `UserError` (and config typos) into a one-line exit."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    _close_process_group()


def _close_process_group() -> None:
    """End a multi-process run's process group before the interpreter exits. Left to interpreter teardown, a
    rank of a 2-process gloo/DeepSpeed run now and then aborted after its work was done ("terminate called
    without an active exception", exit -6), failing a finished run."""
    dist = sys.modules.get("torch.distributed")  # only a script that imported torch can have one
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parse_config(dataclass_types: list[type], args: list[str] | None = None) -> tuple:
    """Parse `--config file.yaml` plus command-line overrides into dataclasses with TrlParser.

    A YAML key that no dataclass knows or that is given twice, a bad value or a bad flag becomes a
    one-line `UserError` naming the key and the file.
    """
    import dataclasses

    import yaml
    from trl import TrlParser

    class _Parser(TrlParser):
        def error(self, message):  # argparse would print its whole usage text; the YAML was checked above
            raise UserError(f"command line: {message}")

    key_lines: dict = {}  # top-level key -> line, for messages about its value

    class _UniqueKeyLoader(yaml.SafeLoader):  # PyYAML keeps the last of two equal keys without a word
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # SafeLoader reports unhashable keys itself
                if key in seen:
                    raise UserError(f"{config_path}:{key_node.start_mark.line + 1}: key {key} is given twice")
                seen.add(key)
                key_lines.setdefault(key, key_node.start_mark.line + 1)  # the root mapping is built first
            return super().construct_mapping(node, deep=deep)

    args = list(sys.argv[1:] if args is None else args)
    if args.count("--config") > 1:
        raise UserError("--config is given twice")
    config_path, config = None, {}
    if "--config" in args:
        at = args.index("--config")
        if at + 1 == len(args) or args[at + 1].startswith("--"):
            raise UserError("--config needs a YAML file after it")
        config_path = args.pop(at + 1)
        args.pop(at)
        if not Path(config_path).is_file():
            raise UserError(f"config file not found: {config_path}")
        try:
            config = yaml.load(Path(config_path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as err:
            raise UserError(f"{config_path}: not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
            raise UserError(f"{config_path}:{line}: not valid YAML") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: must hold a mapping of key: value")
        fields = {f.name: (cls, f) for cls in dataclass_types for f in dataclasses.fields(cls)}
        unknown = [key for key in config if key not in fields and key != "env"]
        if unknown:
            raise UserError(f"{config_path}: unknown key(s) {', '.join(map(str, unknown))}")
        env = config.pop("env", None) or {}
        if not isinstance(env, dict):
            raise UserError(f"{config_path}:{key_lines.get('env', 0)}: key env: expected a mapping of NAME: value")
        for key, value in config.items():
            cls, field = fields[key]
            try:
                config[key] = _check_value(value, _field_types(cls)[key])
            except _WrongType as wrong:
                raise UserError(f"{config_path}:{key_lines.get(key, 0)}: key {key}: expected {wrong}, "
                                f"got {_short_repr(value)}") from None
            choices = field.metadata.get("choices")  # argparse checks them on the command line only
            given = config[key] if isinstance(config[key], list) else [config[key]]  # a list field: each item
            if choices and any(item is not None and item not in choices for item in given):
                raise UserError(f"{config_path}:{key_lines.get(key, 0)}: key {key}: expected one of "
                                f"{', '.join(map(str, choices))}, got {_short_repr(value)}")
        os.environ.update({str(name): str(value) for name, value in env.items()})
    parser = _Parser(dataclass_types)
    # TrlParser's parse_args_and_config would read the YAML again, without the checks above.
    parser.set_defaults_with_config(**config)
    try:
        parsed = parser.parse_args_into_dataclasses(args=args)
    except ValueError as err:
        if str(err).startswith("Some specified arguments are not used"):  # HfArgumentParser's leftovers
            leftover = str(err).split(": ", 1)[-1]
            flags = [a.split("=")[0] for a in args if a.startswith("--") and repr(a) in leftover]
            raise UserError(f"command line: unknown flag(s) {', '.join(flags)}" if flags else
                            f"command line: arguments that are no flag's value: {leftover}") from None
        raise UserError(f"{config_path or 'command line'}: {str(err).splitlines()[0]}") from None
    if any(getattr(obj, "hub_token", None) for obj in parsed):  # never echo it
        raise UserError(f"{config_path or 'command line'}: hub_token: give the Hub token through HF_TOKEN or "
                        "`hf auth login`, not as a setting (Trainer pickles its settings, the token with them, "
                        "into training_args.bin of every checkpoint and output, and the Hub push uploads that)")
    return parsed


class _WrongType(Exception):
    """A YAML value that does not fit its dataclass field; the message names what would."""


def _field_types(cls: type) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(value: Any, annotation: Any, convert: bool = True) -> Any:
    """`value` from YAML as the dataclass field `annotation` expects it, or `_WrongType`.

    HfArgumentParser converts command-line strings, but a YAML value becomes the field's default as
    it is: a list for a number would reach training, and a bare string for a list field would be
    split into characters later. Numbers for a string field and a single item for a list field are
    converted; everything else must already have the right type.
    """
    import enum
    import types
    import typing

    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (Any, object) or isinstance(annotation, typing.TypeVar):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in members:
            return None
        members = [m for m in members if m is not type(None)]
        for allow_conversion in (False, True):  # an exact fit first, so "a" stays a str in `str | list[str]`
            for member in members:
                try:
                    return _check_value(value, member, allow_conversion)
                except _WrongType:
                    pass
        raise _WrongType(" or ".join(_type_name(m) for m in members))
    if origin is typing.Literal:
        if value in members:
            return value
        raise _WrongType(f"one of {', '.join(map(repr, members))}")
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        item_type = members[0] if members else Any
        if isinstance(value, list):
            return [_check_value(item, item_type) for item in value]
        if convert and value is not None and not isinstance(value, dict):
            return [_check_value(value, item_type)]
        raise _WrongType(_type_name(annotation))
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise _WrongType("a mapping")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [member.value for member in annotation]
        if value in choices or isinstance(value, annotation):
            return value
        raise _WrongType(f"one of {', '.join(map(str, choices))}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
        if convert and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value  # a type we do not know how to check: HfArgumentParser's own rules apply
    raise _WrongType(_type_name(annotation))


def _type_name(annotation: Any) -> str:
    import typing

    if annotation is type(None):
        return "null"
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set):
        return f"a list of {_type_name(members[0])}" if members else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable inputs and options."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def file_fingerprint(paths: list[str | Path]) -> str:
    """Hash of file contents, for manifests that name local input files."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(path.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def build_manifest(stage: str, inputs: dict, options: dict, outputs: dict) -> dict:
    return {
        "stage": stage,
        "created_unix": int(time.time()),
        "inputs": inputs,
        "options": options,
        "outputs": outputs,
        "fingerprint": fingerprint(stage, inputs, options),
        "environment": {"python": platform.python_version(), **_library_versions()},
    }


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "tokenizers", "datasets", "trl", "accelerate", "deepspeed"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write `manifest.json` atomically; it marks the directory as complete."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path, what: str = "stage output", stage: str | tuple[str, ...] = ()) -> dict:
    """Load a finished stage's manifest, or fail with a one-line error naming the directory.

    `stage` names the stage(s) whose output is expected, so that a finished directory of the wrong
    kind (a packed dataset given as a corpus) is refused before it is misread.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{what} directory not found: {directory}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{what} directory {directory} is incomplete: it has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UserError(f"{path}{where}: not a valid manifest (not JSON); rerun the stage that wrote it") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a valid manifest (not a JSON object); rerun the stage that wrote it")
    for key, kind in (("stage", str), ("fingerprint", str), ("inputs", dict), ("options", dict), ("outputs", dict)):
        if not isinstance(manifest.get(key), kind):  # every stage reads these; a KeyError could end a whole run
            problem = f"no '{key}'" if key not in manifest else f"'{key}' is not a {'string' if kind is str else 'mapping'}"
            raise UserError(f"{path}: not a valid manifest ({problem}); rerun the stage that wrote it")
    expected = (stage,) if isinstance(stage, str) else tuple(stage)
    if expected and manifest.get("stage") not in expected:
        raise UserError(f"{directory} is the output of stage '{manifest.get('stage')}', "
                        f"not a {what} ({' or '.join(expected)})")
    return manifest


def refuse_overlap(output_dir: str | Path, inputs: dict[str, str | Path | None] | list[tuple[str, Any]]) -> None:
    """A one-line error when `output_dir` is, contains or lies inside one of the named local inputs.

    A stage replaces its whole output directory, so an output that is an input would delete it (a
    tokenizer written over its corpus), and an output inside an input folder would be read back as
    input by the next run. Names that are not local paths (a Hub dataset id) are passed over.
    """
    out = Path(output_dir).resolve()
    for key, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if not path or not Path(path).exists():
            continue
        given = Path(path).resolve()
        if out == given or given in out.parents or out in given.parents:
            where = "is" if out == given else "lies inside" if given in out.parents else "contains"
            raise UserError(f"output_dir {output_dir} {where} {key} {path}: a stage replaces its whole output "
                            "directory, so it must lie apart from its inputs")


def claim_output_dir(output_dir: str | Path, stage: str, inputs: dict | list = (), ours=None) -> None:
    """Refuse, before any work, an output_dir this stage must not replace: one that overlaps an input
    (`refuse_overlap`), the current directory, a file, another stage's output, or a folder of other files.
    A stage replaces its output directory (a data_prep stage whole, a training recipe all but its
    checkpoints), so it may take only a missing or empty directory or an earlier output of its own stage.
    `ours(name)`: the names an unfinished run of a training recipe leaves without a manifest (checkpoints,
    logs, its bookkeeping); a data_prep stage leaves none, as it builds beside output_dir and renames."""
    refuse_overlap(output_dir, inputs)
    out = Path(output_dir)
    if str(output_dir).strip() == "":
        raise UserError("output_dir is empty; name a directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {output_dir} is a file")
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"output_dir {output_dir} is or holds the current directory, which a stage cannot replace; "
                        "name a directory below it")
    if not out.is_dir():
        return
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
            found = found.get("stage") if isinstance(found, dict) else None
            what = f"the output of stage '{found}'" if found else f"a {MANIFEST_NAME} that names no stage"
        except (UnicodeDecodeError, json.JSONDecodeError):
            found, what = None, f"a damaged {MANIFEST_NAME} (not JSON)"
        if found == stage:
            return
        raise UserError(f"output_dir {output_dir} holds {what}, which this {stage} stage would replace; choose "
                        "another output_dir")
    others = sorted(entry.name for entry in out.iterdir() if not (ours and ours(entry.name)))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"output_dir {output_dir} is not an earlier {stage} output (it has no {MANIFEST_NAME}) and "
                        f"holds {shown}, which this {stage} stage would delete; choose another output_dir or empty it")


def refuse_unread_options(args, choice: str, read_by: dict[str, tuple[str, ...]]) -> None:
    """Refuse an option set away from its default that the chosen `choice` (--source, --kind) never reads: a
    forgotten `--source local` would otherwise build the embedded data, and `--text_field body` change nothing,
    without a word. `read_by` maps an option to the choices that read it."""
    chosen = getattr(args, choice)
    for spec in dataclasses.fields(args):
        if spec.name not in read_by or chosen in read_by[spec.name]:
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if getattr(args, spec.name) != default:
            raise UserError(f"{spec.name} is only read with --{choice} {' or '.join(read_by[spec.name])}, but "
                            f"{choice} is {chosen}")


def load_saved_dataset(path: str | Path):
    """`datasets.load_from_disk` of a finished output, read after its manifest: files damaged behind a valid
    manifest (a truncated arrow file, a half-written state.json) stop in one line that names the directory."""
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, a short read an OSError
        raise UserError(f"{path}: a damaged saved dataset ({str(err).splitlines()[0]})") from None


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `output_dir` only on success (check the stage's
    inputs with `refuse_overlap` before the work starts)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise UserError(f"output directory already exists: {output_dir} (pass --overwrite true to replace it)")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output directory {output_dir} is a file")
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"output directory {output_dir}: a parent of it is a file") from None
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    try:
        if output_dir.exists():
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
    except OSError as err:  # a directory in use, another file system: nothing is half replaced
        if old.exists() and not output_dir.exists():
            os.replace(old, output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"output directory {output_dir}: could not be replaced ({err.strerror})") from None
    shutil.rmtree(old, ignore_errors=True)
