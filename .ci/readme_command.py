"""Print one of the README's set-up commands: `bench` (command 1) or `test` (command 2).

Each command is the single line inside the fenced block that follows a
`<!-- kdzoo:command NAME -->` marker in README.md.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(name: str, readme: Path = README) -> str:
    match = re.search(
        rf"<!-- kdzoo:command {re.escape(name)} -->\s*```(?:bash|sh)?\n(.+?)\n```",
        readme.read_text(),
        flags=re.S,
    )
    if match is None:
        raise SystemExit(f"README.md has no `<!-- kdzoo:command {name} -->` block")
    command = match.group(1).strip()
    if "\n" in command:
        raise SystemExit(f"README command {name!r} must be a single line")
    return command


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
