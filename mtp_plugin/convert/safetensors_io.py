"""Sharded safetensors: a streaming writer and a validating reader (Hugging Face's index layout).

model-00001-of-00003.safetensors ...   shards of at most `max_shard_bytes` each (a larger tensor alone)
model.safetensors.index.json           {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFCheckpointError(ValueError):
    """The Hugging Face directory is incomplete or damaged (the message names the file)."""


class ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would pass `max_shard_bytes`, so at most
    one shard's tensors are held; `close()` names the shards `model-0000i-of-0000n` and writes the index."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Own storage per tensor: safetensors refuses views of a shared buffer (a chunk of fc1, an expert).
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self.shards)
        save_file(self.pending, str(self.directory / f"shard-{index}.partial"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        files = []
        for index, names in enumerate(self.shards):
            file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{index}.partial", self.directory / file)
            files.append(file)
            weight_map.update(dict.fromkeys(names, file))
        index_doc = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX).write_text(json.dumps(index_doc, indent=2) + "\n")
        # safetensors creates its files owner-only; give the shards the index's (umask's) permissions.
        mode = (self.directory / INDEX).stat().st_mode & 0o777
        for file in files:
            os.chmod(self.directory / file, mode)
        return files


def _check_shard(file: Path) -> None:
    """The header parses and its last tensor ends exactly at the end of the file (a truncated copy or an
    interrupted download does not)."""
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        raise HFCheckpointError(
            f"{file} is not a readable safetensors file ({err.__class__.__name__}); copy it again"
        ) from None
    size = file.stat().st_size
    if size != 8 + header_len + end:
        raise HFCheckpointError(
            f"{file} is truncated or padded: {size} bytes, its header describes {8 + header_len + end}; copy it again"
        )


class HFCheckpoint:
    """A Hugging Face checkpoint directory: config.json, the weight map, tensors by name (read lazily)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise HFCheckpointError(
                f"{self.directory} is not a directory; pass a Hugging Face checkpoint directory"
            )
        config = self.directory / "config.json"
        try:
            self.config = json.loads(config.read_text())
        except (OSError, ValueError) as err:
            raise HFCheckpointError(f"{config} is missing or not JSON ({err.__class__.__name__})") from None
        self.weight_map = self._weight_map()
        for file in sorted(set(self.weight_map.values())):
            _check_shard(self.directory / file)
        self._open: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise HFCheckpointError(
                    f"{index} is not a safetensors index ({err.__class__.__name__})"
                ) from None
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise HFCheckpointError(
                    f"{index} names {missing[0]}, which does not exist; copy the missing shards"
                )
            return weight_map
        if (self.directory / SINGLE).is_file():
            from safetensors import safe_open

            _check_shard(self.directory / SINGLE)
            with safe_open(str(self.directory / SINGLE), framework="pt") as f:
                return dict.fromkeys(f.keys(), SINGLE)
        shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
        raise HFCheckpointError(
            f"{index} is missing"
            + (
                f" beside {len(shards)} shard(s) ({shards[0]} ...)"
                if shards
                else " and there is no model.safetensors"
            )
            + "; copy the index that came with the checkpoint"
        )

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.directory / file), framework="pt")
        return self._open[file].get_tensor(name)
