"""Stage outputs: manifests, atomic writes and one-line errors.

Every stage (data_prep script or recipe) writes one output directory with a
`manifest.json` naming its inputs, options and key figures. The manifest is
written last, so a directory without one is incomplete and later stages refuse
it. Directories that a stage owns outright are built under a temporary name and
renamed into place, so an interrupted run never leaves something that looks done.
"""

from __future__ import annotations

import contextlib
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


def parse_config(dataclass_types: list[type], args: list[str] | None = None) -> tuple:
    """Parse `--config file.yaml` plus command-line overrides into dataclasses with TrlParser.

    A YAML key that no dataclass knows or that is given twice, a bad value or a bad flag becomes a
    one-line `UserError` naming the key and the file.
    """
    import dataclasses

    import yaml
    from trl import TrlParser

    class _Parser(TrlParser):
        def error(self, message):  # argparse would print its whole usage text
            raise UserError(f"{config_path or 'command line'}: {message}")

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
            return super().construct_mapping(node, deep=deep)

    args = list(sys.argv[1:] if args is None else args)
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    if config_path is not None:
        if not Path(config_path).is_file():
            raise UserError(f"config file not found: {config_path}")
        try:
            config = yaml.load(Path(config_path).read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
            raise UserError(f"{config_path}:{line}: not valid YAML") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: must hold a mapping of key: value")
        known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)} | {"env"}
        unknown = [key for key in config if key not in known]
        if unknown:
            raise UserError(f"{config_path}: unknown key(s) {', '.join(map(str, unknown))}")
    parser = _Parser(dataclass_types)
    try:
        return parser.parse_args_and_config(args)
    except ValueError as err:
        raise UserError(f"{config_path or 'command line'}: {str(err).splitlines()[0]}") from None


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


def read_manifest(directory: str | Path, what: str = "stage output") -> dict:
    """Load a finished stage's manifest, or fail with a one-line error naming the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{what} directory not found: {directory}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{what} directory {directory} is incomplete: it has no {MANIFEST_NAME}")
    return json.loads(path.read_text())


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `output_dir` only on success."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise UserError(f"output directory already exists: {output_dir} (pass --overwrite true to replace it)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    if output_dir.exists():
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    shutil.rmtree(old, ignore_errors=True)
