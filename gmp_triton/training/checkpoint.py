"""Checkpoints and run-folder files, written so that a killed run never leaves a broken one.

Each file is written to a temporary name in the same folder, flushed to disk, then renamed over
the old one: a rename within a folder is atomic, so a reader sees the old file or the new one.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import InputError

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
CHECKPOINT_FORMAT = 1


def _replace_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def save_checkpoint(path: Path, state: dict) -> None:
    _replace_atomically(path, lambda file: torch.save(state, file))


def write_json(path: Path, values: dict) -> None:
    text = json.dumps(values, indent=2) + "\n"
    _replace_atomically(path, lambda file: file.write(text.encode()))


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file of ``path``, a run folder or the file itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"no checkpoint at {str(path)!r}")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; plain tensors and Python values only,
    so that reading one runs no code from the file."""
    path = checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise InputError(
            f"cannot read checkpoint {str(path)!r}: the file is damaged or is not a gmp-triton "
            f"checkpoint ({type(error).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{str(path)!r} is not a gmp-triton training checkpoint")
    return state


def random_state(generator: torch.Generator) -> dict:
    """Every random state a run draws from: torch's, numpy's (the sampler) and the batches'."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "batches": generator.get_state(),
    }


def restore_random_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["name"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    generator.set_state(state["batches"])
