"""Benchmark records: every figure we publish is a JSON file naming the card, date, commit and command."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from typing import Any

import torch


def git_commit() -> str:
    """The commit the figures come from; HIGHSPEED_COMMIT names it where the tree has no .git (a device copy)."""
    if os.environ.get("HIGHSPEED_COMMIT"):
        return os.environ["HIGHSPEED_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev or 0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def base_record(**fields: Any) -> dict[str, Any]:
    command = ("highspeed " + " ".join(sys.argv[1:]) if sys.argv and "highspeed" in sys.argv[0]
               else " ".join([os.path.basename(sys.executable)] + sys.argv))
    # Switches that change what runs (HIGHSPEED_PDL=0, ...) are part of the command that made the figure.
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith("HIGHSPEED_") and k != "HIGHSPEED_COMMIT")
    rec = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": f"{env} {command}" if env else command,
        "torch": torch.__version__,
    }
    rec.update(fields)
    return rec


def write_record(rec: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
