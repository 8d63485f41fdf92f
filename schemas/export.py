"""Write the JSON Schemas of the event contracts: `python -m schemas.export [DIR]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.events import EXPORTED, json_schema

DEFAULT_DIR = Path(__file__).parent / "json"


def render(model_file: str) -> str:
    return json.dumps(json_schema(EXPORTED[model_file]), indent=2, ensure_ascii=False) + "\n"


def export(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EXPORTED:
        path = directory / name
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in export(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR):
        sys.stdout.write(f"wrote {path}\n")
