"""Safetensors checkpoints on disk: the one place that parses their headers, reads their tensors and
writes them.

- `read_header` parses one file's header and checks the file has exactly the size it describes;
  `check_safetensors` does that for every file a model directory's loader would read (no tensor is
  read), raising `BrokenCheckpointError` naming the file.
- `CheckpointTensors` reads a checkpoint's tensors by their on-disk names (`read`, with `get_slice`
  keys: ranges and index lists) or by the model's own names (`rows`, `full`), in either layout: the
  model's fused names, or one tensor per expert under the family's names (what transformers 5
  `save_pretrained` writes and the Hub holds), assembled into the fused tensor from just the experts
  asked for. Every read opens the file afresh: safetensors memory-maps it, and every page a read
  touches stays resident while the file is open, so a file kept open would end up wholly in RSS.
- `hub_tensors` is the Hub layout itself: the tensors `save_pretrained` writes for one model tensor
  (a fused expert tensor becomes one tensor per expert and projection, under the family's names)
  and where each lies in the model tensor. `CheckpointTensors` reads by the same description
  (`per_expert_patterns`): the layout the fsdp stage writes and the one it reads are defined once.
- `write_sharded` writes tensors one piece at a time into shards whose headers are computed before
  any data is read, under Hugging Face's rule (`save_pretrained`'s): one file is `model.safetensors`
  with no index; more files are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
- `checkpoint_dtype` is the float dtype a checkpoint stores, from the headers alone.

torch and safetensors are imported where they are used: the workflow's validation calls
`check_safetensors` and must not spend seconds importing torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from slimmoe.tasks.core.storage import write_json_atomic

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The most bytes one written file holds (a tensor larger than this gets a file of its own).
MAX_SHARD_BYTES = 2 * 1024**3
# What transformers checks in a safetensors header before it loads the file.
METADATA = {"format": "pt"}
# torch dtype names -> the dtype codes of a safetensors header.
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32",
          "uint64": "U64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# The 16-bit float dtypes, narrowest first after float32 (`checkpoint_dtype`).
_NARROW_FLOATS = {"BF16": "bfloat16", "F16": "float16"}


class BrokenCheckpointError(ValueError):
    """A model directory whose safetensors files cannot be loaded: truncated, not safetensors, or missing."""


# -- headers ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a header describes it."""

    file: Path
    dtype: str  # the safetensors dtype code ("BF16", "F32", ...)
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # where its data starts, counted from the end of the header


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors one safetensors file holds, from its header, after checking the file holds exactly
    what the header describes (safetensors refuses anything else). Raises BrokenCheckpointError."""
    path = Path(path)
    again = "; copy or download it again"
    size = path.stat().st_size
    if size < 8:
        raise BrokenCheckpointError(f"{path} is truncated: {size} bytes, not even the 8-byte header length{again}")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            raise BrokenCheckpointError(f"{path} is truncated: {size} bytes, but its header alone is {8 + header_len} "
                                        f"bytes (or it is not a safetensors file){again}")
        raw = f.read(header_len)
    try:
        entries = {}
        for name, t in json.loads(raw).items():
            if name == "__metadata__":
                continue
            start, end = (int(x) for x in t["data_offsets"])
            entries[name] = TensorEntry(path, t["dtype"], tuple(int(d) for d in t["shape"]), end - start, start)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise BrokenCheckpointError(f"{path} is not a safetensors file (its header is not a safetensors "
                                    f"tensor table){again}") from None
    expected = 8 + header_len + max((e.offset + e.nbytes for e in entries.values()), default=0)
    if size < expected:
        raise BrokenCheckpointError(f"{path} is truncated: {size} bytes, but its header describes {expected} bytes "
                                    f"({expected - size} missing){again}")
    if size > expected:
        raise BrokenCheckpointError(f"{path} is corrupt: {size} bytes, {size - expected} more than the {expected} "
                                    f"its header describes{again}")
    return entries


def _weight_files(model_dir: Path) -> list[Path]:
    """The files `from_pretrained` would read: those the index names, or else every *.safetensors."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise BrokenCheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map); "
                                        "copy or download it again") from None
        files = [model_dir / n for n in names]
        missing = [n for n, f in zip(names, files) if not f.is_file()]
        if missing:
            raise BrokenCheckpointError(f"{index} names {len(missing)} file(s) that {model_dir} lacks: "
                                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                        "copy or download the missing shards")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BrokenCheckpointError(f"{model_dir} holds no *.safetensors weights; save the model with "
                                    "safe_serialization=True (slimmoe loads safetensors only)")
    return files


def read_headers(model_dir: str | Path) -> dict[Path, dict[str, TensorEntry]]:
    """Every weight file of a model directory with its tensors, each file checked (`read_header`)."""
    return {f: read_header(f) for f in _weight_files(Path(model_dir))}


def check_safetensors(model_dir: str | Path) -> list[Path]:
    """Check the weights `load_model` would read, from their headers only (no tensor is read): each
    file an index names exists, and each file has the size its header implies. Returns the files;
    raises BrokenCheckpointError naming the file."""
    return list(read_headers(model_dir))


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The float dtype the checkpoint's weights are stored in ("bfloat16", "float16" or "float32"),
    from the headers alone: the narrowest one present."""
    stored = {e.dtype for entries in read_headers(model_dir).values() for e in entries.values()}
    return next((name for code, name in _NARROW_FLOATS.items() if code in stored), "float32")


# -- the Hub layout ---------------------------------------------------------------------------------

def per_expert_patterns(model_name: str, adapter) -> list[str] | None:
    """The on-disk names (one `{e}` each) of the tensors a fused expert tensor is stored as, one set per
    expert, in the order their rows make up that expert's slice along dim 1 (gate_up_proj [E, 2I, H]:
    gate rows, then up rows; down_proj [E, H, I]: one tensor). None: the tensor is stored whole."""
    names = adapter.checkpoint_expert_names if adapter is not None else None
    if not names:
        return None
    for fused, parts in (("gate_up_proj", names[:2]), ("down_proj", names[2:])):
        if model_name.endswith(".experts." + fused):
            prefix = adapter.checkpoint_name(model_name[: -len(fused)])
            return [prefix + "{e}." + p + ".weight" for p in parts]
    return None


@dataclass(frozen=True)
class HubTensor:
    """One tensor of the Hub layout, and where it lies in the model tensor it is cut from."""

    name: str
    shape: tuple[int, ...]
    expert: int | None = None  # None: the whole model tensor
    rows: tuple[int, int] = (0, 0)  # [start, end) along dim 1 of the model tensor, within `expert` (if any)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This tensor out of the whole model tensor: a view, contiguous when `full` is."""
        if self.expert is None:
            return full
        return full[self.expert, self.rows[0]:self.rows[1]]


def hub_tensors(model_name: str, shape: Sequence[int], adapter) -> list[HubTensor]:
    """The tensors transformers 5 `save_pretrained` writes for the model tensor `model_name` of (global)
    `shape`, experts in order: a fused expert tensor [E, R, ...] becomes E x n tensors of [R / n, ...]
    under the family's n per-expert names; anything else is one tensor under its on-disk name."""
    shape = tuple(shape)
    patterns = per_expert_patterns(model_name, adapter)
    if patterns is None:
        return [HubTensor(adapter.checkpoint_name(model_name) if adapter is not None else model_name, shape)]
    per, rest = divmod(shape[1], len(patterns))
    if rest:
        raise ValueError(f"{model_name} {shape}: dim 1 does not split into {len(patterns)} equal parts "
                         f"({', '.join(p.format(e=0) for p in patterns)})")
    return [HubTensor(p.format(e=e), (per, *shape[2:]), e, (i * per, (i + 1) * per))
            for e in range(shape[0]) for i, p in enumerate(patterns)]


# -- reading ----------------------------------------------------------------------------------------

class CheckpointTensors:
    """A checkpoint's tensors, each read alone (a file is opened per read).

    By on-disk name: `entries`, `in`, `ordered`, `read(name, key)`. By the model's name (with the
    family's `adapter`): `find`, `has`, `shape`, `rows`, `full`; a fused expert tensor the checkpoint
    stores one expert at a time is assembled from just the experts asked for."""

    def __init__(self, model_dir: str | Path, adapter=None):
        self.model_dir, self.adapter = Path(model_dir), adapter
        self.entries: dict[str, TensorEntry] = {}
        for entries in read_headers(self.model_dir).values():  # sizes checked: no truncated file
            self.entries.update(entries)

    # -- by on-disk name

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def ordered(self) -> list[str]:
        """Names in file order, then data order: the files are read front to back."""
        return sorted(self.entries, key=lambda n: (str(self.entries[n].file), self.entries[n].offset))

    def read(self, name: str, key: tuple | None = None) -> torch.Tensor:
        """The tensor, or `get_slice(name)[key]` of it (ranges and index lists, also on 3-D tensors)."""
        from safetensors import safe_open

        with safe_open(str(self.entries[name].file), "pt") as f:
            return f.get_tensor(name) if key is None else f.get_slice(name)[key]

    # -- by the model's name

    def find(self, model_name: str) -> str | None:
        """The on-disk name of a tensor stored whole: the model's own, or the family's renamed one."""
        names = (model_name,) if self.adapter is None else (model_name, self.adapter.checkpoint_name(model_name))
        return next((n for n in names if n in self.entries), None)

    def _stored_per_expert(self, model_name: str) -> list[str]:
        """The per-expert patterns of a fused tensor the checkpoint stores split, or KeyError."""
        patterns = per_expert_patterns(model_name, self.adapter)
        if patterns is None or patterns[0].format(e=0) not in self.entries:
            renamed = self.adapter.checkpoint_name(model_name) if self.adapter is not None else model_name
            raise KeyError(f"{self.model_dir} stores no tensor for {model_name} (looked for {renamed} and "
                           "per-expert tensors)")
        return patterns

    def has(self, model_name: str) -> bool:
        if self.find(model_name) is not None:
            return True
        patterns = per_expert_patterns(model_name, self.adapter)
        return patterns is not None and patterns[0].format(e=0) in self.entries

    def shape(self, model_name: str) -> tuple[int, ...]:
        name = self.find(model_name)
        if name is not None:
            return self.entries[name].shape
        patterns = self._stored_per_expert(model_name)
        n = 0
        while patterns[0].format(e=n) in self.entries:
            n += 1
        first = [self.entries[p.format(e=0)].shape for p in patterns]
        return (n, sum(s[0] for s in first), *first[0][1:])

    def rows(self, model_name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) along dim 0 (for fused experts: experts start..end-1) in the model's layout."""
        import torch

        name = self.find(model_name)
        if name is not None:
            return self.read(name, (slice(start, end),))
        patterns = self._stored_per_expert(model_name)
        # the patterns come in the order of an expert's rows
        experts = [torch.cat([self.read(p.format(e=e)) for p in patterns], dim=0) for e in range(start, end)]
        return torch.stack(experts) if experts else torch.empty((0, *self.shape(model_name)[1:]))

    def block(self, model_name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """The slab [start, end) along `dim` (0, 1 or 2) of the tensor, in the model's layout. Of a fused
        expert tensor stored one expert at a time, each expert's slab is read from just the per-expert
        tensors (and their rows or columns) it overlaps."""
        import torch

        if dim == 0:
            return self.rows(model_name, start, end)
        if dim not in (1, 2):
            raise ValueError(f"{model_name}: reads along dim {dim} are not supported (0, 1 or 2)")
        name = self.find(model_name)
        if name is not None:
            return self.read(name, (slice(None),) * dim + (slice(start, end),))
        shape = self.shape(model_name)
        parts: list[list[torch.Tensor]] = [[] for _ in range(shape[0])]
        for hub in hub_tensors(model_name, shape, self.adapter):
            if dim == 2:  # every per-expert tensor's columns [start, end)
                parts[hub.expert].append(self.read(hub.name, (slice(None), slice(start, end))))
                continue
            lo, hi = max(start, hub.rows[0]), min(end, hub.rows[1])
            if lo < hi:
                parts[hub.expert].append(self.read(hub.name, (slice(lo - hub.rows[0], hi - hub.rows[0]),)))
        return torch.stack([torch.cat(p, dim=0) for p in parts])

    def full(self, model_name: str) -> torch.Tensor:
        name = self.find(model_name)
        if name is not None:
            return self.read(name)
        return self.rows(model_name, 0, self.shape(model_name)[0])


# -- releasing what reads freed ---------------------------------------------------------------------

def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Return freed heap pages to the OS. After the first large free glibc raises its mmap threshold,
    so later tensor-sized buffers come from the heap and stay resident once freed: without this the
    RSS grows by a tensor every few tensors (measured over 96 reads of 8 MB: +64 MB, +8 MB with this)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# -- writing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write, known before its data is: the header is written first."""

    name: str
    dtype: str  # the safetensors dtype code
    shape: tuple[int, ...]
    nbytes: int


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors header code of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _CODES[name]
    except KeyError:
        raise ValueError(f"safetensors cannot store {dtype}") from None


def spec_of(name: str, shape: Sequence[int], dtype: torch.dtype) -> TensorSpec:
    """The spec of a tensor of `shape` and `dtype` (for a DTensor: its global shape)."""
    return TensorSpec(name, dtype_code(dtype), tuple(shape), math.prod(shape) * dtype.itemsize)


def shard_file_names(n: int) -> list[str]:
    """Hugging Face's names (`save_pretrained`'s): one file is `model.safetensors`, more are
    `model-0000i-of-0000n.safetensors`."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def header_bytes(specs: Sequence[TensorSpec]) -> bytes:
    """The 8-byte length and the JSON header of a file holding `specs` in order, data 8-byte aligned."""
    header, offset = {"__metadata__": METADATA}, 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


@dataclass(frozen=True)
class Written:
    files: list[str]
    bytes: int  # tensor bytes written (the index's total_size)
    peak_piece_bytes: int  # the most tensor bytes held at once


def write_sharded(out_dir: str | Path, specs: Sequence[TensorSpec],
                  pieces: Callable[[TensorSpec], Iterable[torch.Tensor]],
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> Written:
    """Write `specs` in order into `out_dir` as Hugging Face's sharded safetensors, each tensor as the
    consecutive blocks of its row-major data `pieces(spec)` yields (one tensor, or its dim-0 chunks),
    so only one piece is held at a time. Every file is written under a temporary name and renamed
    only once all are complete and checked against their headers; the index (more than one file)
    comes last. After a failure no weight file and no index is left in `out_dir`."""
    import torch

    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    files = shard_file_names(len(shards))
    partial = [out_dir / f".{name}.partial" for name in files]
    done: list[Path] = []
    peak = 0
    total = sum(s.nbytes for s in specs)
    try:
        for path, shard in zip(partial, shards):
            with open(path, "wb") as f:
                f.write(header_bytes(shard))
                for spec in shard:
                    written = 0
                    for piece in pieces(spec):
                        data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                        peak = max(peak, data.nbytes)
                        f.write(data)
                        written += data.nbytes
                        del piece, data
                        release_freed_memory()
                    if written != spec.nbytes:
                        raise RuntimeError(f"{spec.name}: wrote {written} bytes, planned {spec.nbytes} "
                                           f"for {spec.shape}")
            read_header(path)  # the file is exactly what its header says
        for path, name in zip(partial, files):
            os.replace(path, out_dir / name)
            done.append(out_dir / name)
        if len(files) > 1:
            weight_map = {s.name: name for name, shard in zip(files, shards) for s in shard}
            write_json_atomic(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})
    except BaseException:
        for path in partial + done:
            path.unlink(missing_ok=True)
        raise
    return Written(files, total, peak)
