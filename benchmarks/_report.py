"""Where the device scripts leave their numbers: ``<stem>.json`` and ``<stem>.md`` in ``out``, and a
copy of both in ``copy_to`` (the device tool brings back what a command writes under ``$OUT``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def write(out: Path, stem: str, report: dict[str, Any], text: str, copy_to: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(text + "\n")
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md"):
            shutil.copy(out / f"{stem}{suffix}", Path(copy_to) / f"{stem}{suffix}")
