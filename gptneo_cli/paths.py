"""What a checkpoint may reference: files inside its own folder, nothing else.

A shard index (and any other file a checkpoint names) comes from whoever published the
model, so a name such as `../../.ssh/id_rsa` or `/etc/passwd` must never be opened. Names
are checked twice, before anything is opened: as text (relative, no `..`, no drive, no
NUL), then as a path (after following symlinks it lies inside the model folder). The one
place a symlink may lead out of the folder is the Hugging Face cache layout, where
`<repo>/snapshots/<commit>/<file>` links to `<repo>/blobs/<hash>` of the same repo.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a file of a model folder, or None when it can (text only)."""
    if not isinstance(name, str) or not name.strip():
        return "not a file name"
    if "\x00" in name:
        return "contains a NUL byte"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name[0] in "/\\":
        return "is an absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "leads out of the model folder (..)"
    return None


def allowed_roots(folder: Path) -> list[Path]:
    """The folders files of `folder` may resolve into: itself, and for a Hugging Face cache
    snapshot, the blobs folder of the same repo."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def resolves_inside(folder: Path, path: Path) -> bool:
    """Whether `path` (symlinks followed) lies inside `folder` or its cache blobs."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return any(real == root or real.is_relative_to(root) for root in allowed_roots(folder))


def model_file(folder: Path, name: str) -> tuple[Path, str | None]:
    """(folder / name, problem): problem is None only when the file may be opened."""
    problem = name_problem(name)
    if problem is not None:
        return folder / "_", problem
    path = folder / name
    if not resolves_inside(folder, path):
        return path, "resolves outside the model folder"
    return path, None
