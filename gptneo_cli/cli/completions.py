"""Generate the shell completion scripts in completions/ from the Typer app.

    python -m gptneo_cli.cli.completions          # rewrite completions/
    python -m gptneo_cli.cli.completions --check  # exit 1 when a committed script is stale

The scripts come from the app itself (Click's `_GPTNEO_COMPLETE=source_<shell>` protocol),
run in a subprocess exactly as a shell would, so they can never drift from the commands.
At completion time the shell calls `gptneo` again, which imports the app but never torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: shell -> file name inside completions/ (zsh wants `_gptneo` on its $fpath)
FILES = {"bash": "gptneo.bash", "zsh": "_gptneo", "fish": "gptneo.fish"}
COMPLETE_VAR = "_GPTNEO_COMPLETE"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "completions"


def script(shell: str) -> str:
    """The completion script for `shell`, as `gptneo` itself emits it."""
    env = {**os.environ, COMPLETE_VAR: f"source_{shell}"}
    done = subprocess.run(
        [sys.executable, "-m", "gptneo_cli.cli"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip() + "\n"


def stale(folder: Path = DEFAULT_DIR) -> list[str]:
    """Names of scripts in `folder` that differ from what the app generates now."""
    out = []
    for shell, name in FILES.items():
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != script(shell):
            out.append(name)
    return out


def write_all(folder: Path = DEFAULT_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shell, name in FILES.items():
        path = folder / name
        path.write_text(script(shell), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    folder = Path(rest[0]) if rest else DEFAULT_DIR
    if check:
        names = stale(folder)
        if names:
            print(f"stale completion scripts in {folder}: {', '.join(names)}", file=sys.stderr)
            print("regenerate them with: python -m gptneo_cli.cli.completions", file=sys.stderr)
            return 1
        return 0
    for path in write_all(folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
