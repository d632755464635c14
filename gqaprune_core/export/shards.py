"""Sharded safetensors, the Hugging Face way: write tensors as they come, read them lazily.

A weights folder holds either one ``model.safetensors`` or, once the tensors exceed one shard,
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``::

    {"metadata": {"total_size": BYTES},
     "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors", ...}}

which is what ``transformers``, ``accelerate``, vLLM and llama.cpp's converter read. Shards hold
at most ``max_shard_bytes`` of tensor data (5 GB by default, as ``save_pretrained``), except a
single tensor larger than that, which gets a shard of its own.

:class:`ShardWriter` streams: each tensor's bytes go to disk as it is added, so it holds one tensor
(plus the open shard's names, shapes and offsets) in memory, and a model can be written layer by
layer (the layer-wise pipeline) without ever being whole. :class:`LazyWeights`
reads one tensor at a time from either layout. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB" in save_pretrained's sense


class ShardError(ValueError):
    """A weights folder whose files or index are missing, unreadable or inconsistent."""


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes from ``"5GB"``, ``"200MB"``, ``"1.5GiB"`` or an int (GB = 10**9, GiB = 2**30, as
    ``save_pretrained``'s ``max_shard_size``).

    Raises:
        ValueError: not a positive size with one of :data:`SIZE_UNITS`.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).lower() if match else None
        if unit not in SIZE_UNITS:
            raise ValueError(f"shard size {size!r} is not a size such as '5GB', '200MB' or "
                             f"'1GiB' (units: {', '.join(u.upper() for u in SIZE_UNITS if u)})")
        value = int(float(match.group(1)) * SIZE_UNITS[unit])
    if value < 1:
        raise ValueError(f"shard size {size!r} must be at least 1 byte")
    return value


def format_size(size: int) -> str:
    """``812 B``, ``45.2 KiB``, ``3.7 GiB`` (binary units, one decimal above bytes)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


SAFETENSORS_DTYPES = {  # the dtypes ShardWriter stores, by their names in a safetensors header
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2"}
COPY_CHUNK_BYTES = 1 << 24  # the buffer when the OS cannot copy file to file by itself


def _write_all(file, data) -> None:
    """Write every byte of ``data`` to an unbuffered file (whose ``write`` may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[file.write(view):]


def _append_file(source: Path, target) -> None:
    """Append ``source`` to the unbuffered ``target`` in bounded chunks, kernel-side if it can."""
    with open(source, "rb", buffering=0) as src:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining and hasattr(os, "copy_file_range"):
                copied = os.copy_file_range(src.fileno(), target.fileno(), min(remaining, 1 << 30))
                if copied == 0:
                    break
                remaining -= copied
        except OSError:
            pass  # e.g. a file system without it: continue below from where it stopped
        while remaining:
            chunk = src.read(min(remaining, COPY_CHUNK_BYTES))
            if not chunk:
                raise OSError(f"{source} ended {remaining} bytes early")
            _write_all(target, chunk)
            remaining -= len(chunk)


class ShardWriter:
    """Write tensors into ``directory`` as shards of at most ``max_shard_bytes``.

    Usage::

        with ShardWriter(staging, max_shard_bytes=2 * 10**9) as writer:
            for name, tensor in tensors:
                writer.add(name, tensor)
        writer.files  # the file names written, in order

    Memory: the tensor being added (a CPU copy if it was elsewhere or not contiguous) and the
    open shard's header: names, dtypes, shapes, offsets. ``add`` appends the bytes to
    ``.shard-0000i.data.partial``; a full shard (or ``close``) writes the header to
    ``.shard-0000i.partial``, appends the data file in chunks, deletes it. Tensors lie in the
    order added (``save_file`` sorts by dtype and name; readers follow the header's offsets).
    Bytes are in host order: safetensors is little-endian, as x86 and ARM are.

    Shards are renamed when the count is known (on ``close``); with one shard the file is
    ``model.safetensors`` and no index is written. The directory should be a staging folder
    that is published as a whole: an exception leaves the provisional files behind for the
    caller's cleanup.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError(f"safetensors metadata must map str to str, got {self.metadata!r}")
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._entries: dict[str, dict] = {}  # the open shard's header entries, in order
        self._pending_bytes = 0
        self._provisional: list[Path] = []
        self._closed = False

    def _shard_path(self, suffix: str) -> Path:
        return self.directory / f".shard-{len(self._provisional) + 1:05d}{suffix}"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor's bytes to the open shard; starts a new shard when it is full.

        Raises:
            ValueError: ``name`` was added before or is ``__metadata__``, or a dtype that
                safetensors cannot store (see :data:`SAFETENSORS_DTYPES`).
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if name in self.weight_map or name in self._entries:
            raise ValueError(f"tensor {name!r} added twice")
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__' in safetensors")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors "
                             f"cannot store (it stores {sorted(map(str, SAFETENSORS_DTYPES))})")
        size = tensor_bytes(tensor)
        if self._entries and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # A uint8 view of the CPU copy; no numpy dtype is needed, so bf16 and float8 work too.
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        mode = "ab" if self._entries else "wb"  # a new shard starts an empty data file
        with open(self._shard_path(".data.partial"), mode, buffering=0) as file:
            _write_all(file, data)
        self._entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype],
                               "shape": list(tensor.shape),
                               "data_offsets": [self._pending_bytes, self._pending_bytes + size]}
        self._pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        """Header, then the data file: the open shard as a safetensors file."""
        header = json.dumps({"__metadata__": self.metadata, **self._entries},
                            separators=(",", ":"), ensure_ascii=False).encode()
        header += b" " * (-len(header) % 8)  # 8 + len(header) aligned to 8, as safetensors does
        path, data = self._shard_path(".partial"), self._shard_path(".data.partial")
        with open(path, "wb", buffering=0) as file:
            _write_all(file, len(header).to_bytes(8, "little") + header)
            if data.exists():
                _append_file(data, file)
        data.unlink(missing_ok=True)
        self._provisional.append(path)
        self.weight_map.update(dict.fromkeys(self._entries, path.name))
        self._entries, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index; returns the
        file names (weights, then the index if any)."""
        if self._closed:
            return self.files
        if self._entries or not self._provisional:
            self._flush()
        count = len(self._provisional)
        final = {p.name: (SINGLE_NAME if count == 1 else shard_name(i, count))
                 for i, p in enumerate(self._provisional, start=1)}
        for path in self._provisional:
            os.replace(path, self.directory / final[path.name])
        self.weight_map = {name: final[file] for name, file in self.weight_map.items()}
        self.files = list(final.values())
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
            self.files.append(INDEX_NAME)
        self._closed = True
        return self.files

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()


def has_weights(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds ``model.safetensors`` or a safetensors index."""
    path = Path(directory)
    return (path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file()


def weight_map(directory: str | os.PathLike) -> dict[str, str]:
    """Tensor name → file name, from the index, or from the header of ``model.safetensors``.

    Raises:
        ShardError: no weights, an unreadable index, or an index naming a missing file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(directory)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ShardError(f"{index}: unreadable safetensors index: {err}") from err
        if not isinstance(mapping, dict):
            raise ShardError(f"{index}: weight_map is not an object")
        missing = sorted({f for f in mapping.values() if not (path / f).is_file()})
        if missing:
            raise ShardError(f"{index} names shard files that are missing: {missing[:3]}")
        return dict(mapping)
    single = path / SINGLE_NAME
    if not single.is_file():
        raise ShardError(f"{str(path)!r} has neither {SINGLE_NAME} nor {INDEX_NAME}")
    try:
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_NAME)
    except (SafetensorError, OSError) as err:
        raise ShardError(f"{single}: unreadable safetensors file: {err}") from err


class LazyWeights:
    """Read tensors one at a time from a weights folder (single file or shards).

    ``shapes()`` reads only the headers; ``get(name)`` reads one tensor. File handles are opened
    on demand and kept until ``close`` (use as a context manager).
    """

    def __init__(self, directory: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.directory = Path(directory)
        self.device = str(device)
        self.map = weight_map(self.directory)
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt",
                                                device=self.device)
            except (SafetensorError, OSError) as err:
                raise ShardError(f"{self.directory / file}: unreadable safetensors file: "
                                 f"{err}") from err
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.map)

    def __contains__(self, name: str) -> bool:
        return name in self.map

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers alone."""
        return {name: tuple(self._handle(file).get_slice(name).get_shape())
                for name, file in self.map.items()}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.map:
            raise ShardError(f"{self.directory}: no tensor named {name!r}")
        file = self.map[name]
        try:
            return self._handle(file).get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for corrupt data
            raise ShardError(f"{self.directory / file}: cannot read tensor {name!r}: {err}") from err

    def items(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every name starting with ``prefix``, one tensor at a time."""
        for name in self.map:
            if name.startswith(prefix):
                yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> LazyWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
