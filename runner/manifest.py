"""manifest.json and prompts.jsonl: what a run needs to be understood and re-run later."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from runner.client.record import Prompt

PACKAGES = ("runner", "aiohttp", "hydra-core", "omegaconf", "transformers", "tokenizers", "pandas", "numpy",
            "rich", "matplotlib", "uvloop", "orjson")
REPO_DIR = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict[str, Any]:
    """Return the runner checkout's commit and whether it had uncommitted changes (None outside git)."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def write_prompts(prompts: list[Prompt], path: Path) -> None:
    """Write the prompts, one JSON object per line, exactly as they were sent."""
    with path.open("w", encoding="utf-8") as handle:
        for prompt in prompts:
            fields = {"text": prompt.text, "messages": prompt.messages, "token_ids": prompt.token_ids,
                      "prompt_tokens": prompt.prompt_tokens, "max_tokens": prompt.max_tokens}
            handle.write(json.dumps(fields, ensure_ascii=False))
            handle.write("\n")


def read_prompts(path: Path) -> list[Prompt]:
    with path.open(encoding="utf-8") as handle:
        return [Prompt(**json.loads(line)) for line in handle if line.strip()]


def write_manifest(path: Path, fields: dict[str, Any]) -> None:
    manifest = {
        "runner_command": [Path(sys.executable).name, "-m", "runner", *sys.argv[1:]],
        "versions": package_versions(),
        "git": git_revision(),
        "platform": {"system": platform.system(), "machine": platform.machine(), "node": platform.node()},
    } | fields
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
