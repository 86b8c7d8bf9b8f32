"""The adapter root: adapters found by name under a directory, validated on first use.

At start-up `AdapterIndex.scan` lists the directories under `--adapter-root` that hold an
adapter_config.json (names only: nothing is read, so thousands of adapters cost a directory walk). A
request naming an adapter that is not loaded is resolved here: the name is a path relative to the root
(`team-a/sql`), indexed at start-up or added to the disk since. The directory is then read and validated
like any adapter; one that fails is remembered as invalid (with the reason, until its adapter_config.json
or adapter_model.safetensors changes) so later requests are refused at once with the same message. See docs/adapters.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.engine.adapters import adapter_files_stamp

CONFIG_NAME = "adapter_config.json"
READ_FILES = (CONFIG_NAME, "adapter_model.safetensors")  # all that is read from an adapter directory


def outside_root(root: str | Path, directory: str | Path) -> str | None:
    """None if `directory` and the files read from it (adapter_config.json, adapter_model.safetensors) resolve
    (symlinks followed) inside `root`; else the name of the first that does not: a link leading out of the
    adapter root, never read. Only those two are looked at, so the check costs the same whatever else the
    directory holds (it ran on the event loop for every lookup: a directory of 100 000 files held it 9 s)."""
    real_root = os.path.realpath(root)
    try:
        if os.path.commonpath([real_root, os.path.realpath(directory)]) != real_root:
            return Path(directory).name
        for name in READ_FILES:
            entry = os.path.join(directory, name)
            if os.path.lexists(entry) and os.path.commonpath([real_root, os.path.realpath(entry)]) != real_root:
                return name
    except (OSError, ValueError):
        return Path(directory).name
    return None


def find_adapter_dir(root: str | Path, name: str) -> str | None:
    """The real path of `root/name` when it is a directory holding adapter_config.json that lies inside
    `root` (after symlinks and `..`) with no file linking outside it; None otherwise, including for names
    that are not relative paths and for other spellings of one (`./a`, `a//b`, `a/`, `a/../a`): each spelling
    would be another adapter reading the same directory, so a client could grow the adapters without bound."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name) or len(name) > 4096:
        return None
    if not is_canonical(name):
        return None
    real_root = os.path.realpath(root)
    try:
        path = os.path.realpath(os.path.join(real_root, name))
        inside = os.path.commonpath([real_root, path]) == real_root and path != real_root
        found = inside and os.path.isfile(os.path.join(path, CONFIG_NAME))
        return path if found and outside_root(real_root, path) is None else None
    except (OSError, ValueError):
        return None


def is_canonical(name: str) -> bool:
    """True for a '/'-separated relative path with no empty, '.' or '..' component (the index's form)."""
    return all(part not in ("", ".", "..") for part in name.split("/"))


def scan_adapter_root(root: str | Path, skipped: list[str] | None = None) -> dict[str, str]:
    """name (path relative to root, '/'-separated) -> dir, for every dir below root with adapter_config.json.
    A directory whose adapter files link outside the root is left out (its name appended to `skipped`)."""
    root = Path(root)
    found = {}
    for config in sorted(root.rglob(CONFIG_NAME)):
        if config.parent == root:
            continue
        name = config.parent.relative_to(root).as_posix()
        if outside_root(root, config.parent) is not None:
            if skipped is not None:
                skipped.append(name)
            continue
        found[name] = str(config.parent)
    return found


@dataclass
class AdapterIndex:
    """Names of the adapters under `root` (not yet read) and the ones found invalid on first use.

    `indexed`: name -> directory, from the start-up scan (what /v1/models lists before first use).
    `invalid`: name -> (the directory's adapter_files_stamp when it failed, the AdapterError message)."""

    root: Path
    indexed: dict[str, str] = field(default_factory=dict)
    invalid: dict[str, tuple[float | None, str]] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: str | Path) -> AdapterIndex:
        return cls(Path(root), scan_adapter_root(root))

    def find(self, name: str) -> str | None:
        """The real path of the directory that serves `name`, indexed at start-up or present on disk now; None
        if neither, or if it (or a file in it) now links outside the root: the confinement is checked on every
        lookup, since an indexed directory or its files may have been replaced by links after the scan."""
        path = self.indexed.get(name)
        if path is None or not os.path.isdir(path):
            return find_adapter_dir(self.root, name)
        return os.path.realpath(path) if outside_root(self.root, path) is None else None

    def refusal(self, name: str, path: str) -> str | None:
        """Why `name` was refused before, unless its adapter_config.json or adapter_model.safetensors changed
        since (then it is tried again)."""
        known = self.invalid.get(name)
        if known is None:
            return None
        if known[0] != adapter_files_stamp(path):  # either file saved again (an upload finished): try again
            del self.invalid[name]
            return None
        return known[1]

    def mark_invalid(self, name: str, path: str, message: str) -> None:
        self.invalid[name] = (adapter_files_stamp(path), message)

    def listed(self) -> dict[str, str]:
        """The indexed adapters not (yet) known to be invalid: name -> directory."""
        return {name: path for name, path in self.indexed.items() if name not in self.invalid}
