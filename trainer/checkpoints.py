"""Checkpoints that a crash can never leave half-valid.

A checkpoint directory (written by the HF Trainer: adapter, optimizer, scheduler, RNG, trainer state with step and
data position) counts only once `COMPLETE` is in it: a manifest of every file's size and SHA-256, written last and
fsynced. At start the newest checkpoint whose files still match their manifest is resumed; a newer one that does
not (killed mid-save, or damaged since) is moved aside as `incomplete-checkpoint-N`, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from .files import fsync_tree, write_text_atomically

log = logging.getLogger(__name__)

MANIFEST = "COMPLETE"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST)


def mark_complete(checkpoint: Path) -> None:
    fsync_tree(checkpoint)
    manifest = {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in _files(checkpoint)}
    write_text_atomically(checkpoint / MANIFEST, json.dumps(manifest, indent=1))
    fsync_tree(checkpoint)


def problem_with(checkpoint: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except FileNotFoundError:
        return "no COMPLETE manifest (the save did not finish)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its manifest"
    if "trainer_state.json" not in manifest:
        return "no trainer_state.json"
    return None


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_intact_checkpoint(run_dir: Path) -> Path | None:
    for checkpoint in checkpoints_newest_first(run_dir):
        problem = problem_with(checkpoint)
        if problem is None:
            return checkpoint
        aside = checkpoint.with_name(f"incomplete-{checkpoint.name}")
        log.warning("skipping %s: %s; moved to %s", checkpoint, problem, aside.name)
        if aside.exists():
            aside = checkpoint.with_name(f"incomplete-{checkpoint.name}-{os.getpid()}")
        os.replace(checkpoint, aside)
    return None
