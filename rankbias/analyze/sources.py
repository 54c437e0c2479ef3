"""Where `rankbias analyze` reads tensors from: one at a time, without running code.

    rankbias analyze model.safetensors
    rankbias analyze MODEL_DIR          # config.json + model.safetensors, or shards and
                                        # their model.safetensors.index.json (or .bin's)
    rankbias analyze state_dict.pt      # torch.save, read with weights_only=True

A `TensorSource` lists every tensor (name, shape, dtype) from the files' headers without
reading its data, then reads the tensors it is asked for, one at a time:
- safetensors: each read opens the file, reads one tensor (or some of its rows) and closes
  it. safetensors memory-maps the file and the pages a read touched stay in the process
  (its RSS) while the file is open: open for one tensor, they leave with it.
- torch.save files (.pt, .bin and their shards): `torch.load(weights_only=True, mmap=True)`,
  one file at a time; the mapping is dropped and remade every `REMAP_BYTES` read, for the
  same reason. A file of the legacy (non-zip) format cannot be mapped and is read whole.
Keys carrying DDP's `module.` or torch.compile's `_orig_mod.` prefixes are reported
without them. `config.json` beside the checkpoint (or a torch file's `model_args`, as
nanoGPT saves) gives the head layout that splitting fused projections may need.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rankbias.utils import RankbiasError, natural_key

PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile (either order, repeated)
# A folder's checkpoint, in Hugging Face's order of preference.
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
REMAP_BYTES = 256 * 2**20  # drop a torch file's mapping after this much was read from it
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
                       "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def strip_prefixes(key: str) -> str:
    """`module._orig_mod.fc.weight` -> `fc.weight`."""
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, known from its header: nothing of its data is read."""

    name: str  # as reported: the key without DDP / torch.compile prefixes
    key: str  # as stored
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", "int64", ...
    file: str  # the file holding it ("" for a tensor already in memory)

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path, self._open = path, safe_open
        with self._opened() as handle:
            self.entries = []
            for key in handle.keys():
                view = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype().lower())
                self.entries.append(Entry(strip_prefixes(key), key, tuple(view.get_shape()),
                                          dtype, str(path)))

    def _opened(self):
        try:
            return self._open(str(self.path), framework="pt", device="cpu")
        except Exception as err:  # SafetensorError, OSError: the file, not our code
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RankbiasError(f"cannot read {self.path}: corrupt, truncated or not a "
                                f"safetensors file ({detail})") from err

    def read(self, key: str) -> torch.Tensor:
        with self._opened() as handle:
            return handle.get_tensor(key)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        with self._opened() as handle:
            return handle.get_slice(key)[start:stop]


class _TorchFile:
    """A state_dict saved with torch.save, memory-mapped while it is read."""

    def __init__(self, path: Path, state: Mapping | None = None, trust: bool = False) -> None:
        self.path, self.trust, self._state, self._read = path, trust, state, 0
        self.entries = [Entry(strip_prefixes(k), k, tuple(v.shape), str(v.dtype).split(".")[-1],
                              str(path)) for k, v in self._mapped().items()
                        if isinstance(v, torch.Tensor)]
        if state is None:
            self.close()  # a shard: mapped again when it is read

    def _mapped(self) -> Mapping:
        if self._state is None:
            self._state = state_dict_of(read_torch_file(self.path, self.trust), self.path)
        return self._state

    def read(self, key: str) -> torch.Tensor:
        tensor = self._mapped()[key]
        self._read += tensor.numel() * tensor.element_size()
        if self._read > REMAP_BYTES:
            self.close()  # `tensor` keeps its part of the mapping alive until it is freed
        return tensor

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.read(key)[start:stop]

    def close(self) -> None:
        self._state, self._read = None, 0


class _MemoryTensors:
    """Tensors already in memory (a module's state_dict)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.entries = [Entry(strip_prefixes(k), k, tuple(v.shape), str(v.dtype).split(".")[-1],
                              "") for k, v in state.items() if isinstance(v, torch.Tensor)]

    def read(self, key: str) -> torch.Tensor:
        return self.state[key].detach()

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.read(key)[start:stop]


class TensorSource:
    """Every tensor of a checkpoint (`entries`, in the model's order) and a reader of one."""

    def __init__(self, files: list, description: str, config: Mapping | None = None,
                 ordered: bool = True) -> None:
        self.description, self.config, self.ordered = description, dict(config or {}), ordered
        self._file_of: dict[str, object] = {}
        self.entries: list[Entry] = []
        for file in files:
            for entry in file.entries:
                if entry.name in self._file_of:
                    raise RankbiasError(f"two tensors are named {entry.name} once the "
                                        f"'module.'/'_orig_mod.' prefixes are dropped")
                self._file_of[entry.name] = file
                self.entries.append(entry)
        if not ordered:  # safetensors sorts keys as text: put blocks.2 before blocks.10
            self.entries.sort(key=lambda e: natural_key(e.name))
        self._last: tuple[str, torch.Tensor] | None = None

    def read(self, entry: Entry) -> torch.Tensor:
        """The tensor of `entry`, as stored (dtype and layout). The last one read is kept,
        so the parts of one fused tensor are read once."""
        if self._last is None or self._last[0] != entry.name:
            self._last = None  # free the previous tensor before reading the next
            self._last = (entry.name, self._file_of[entry.name].read(entry.key))
        return self._last[1]

    def read_rows(self, entry: Entry, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of `entry` (its first dimension), read without the rest."""
        return self._file_of[entry.name].read_rows(entry.key, start, stop)

    def forget(self) -> None:
        """Drop the tensor kept by `read`."""
        self._last = None


# --- opening a path ---------------------------------------------------------------------------
def read_torch_file(path: str | os.PathLike, trust: bool = False) -> object:
    """What `torch.save` wrote at `path`, with weights_only=True (memory-mapped when the file
    allows it); pickled objects only with trust=True, since unpickling runs code."""
    if not os.path.isfile(path):
        raise RankbiasError(f"no such file: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # a legacy-format file cannot be mapped: read it whole
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a class to allow: bad bytes
            raise RankbiasError(f"cannot read {path}: corrupt or not a PyTorch file") from err
        if not trust:
            raise RankbiasError(f"{path} holds pickled Python objects (a full saved model?); "
                                "rerun with --trust if you trust where it came from") from err
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise RankbiasError(f"cannot unpickle {path}: {err2}".splitlines()[0]) from err2
    except Exception as err:  # zip, EOF and stream errors all mean the same to a user
        raise RankbiasError(f"cannot read {path}: corrupt, truncated or not a PyTorch file "
                            f"({type(err).__name__})") from err


def state_dict_of(obj: object, path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The state_dict in what a torch file holds: itself, or under "state_dict",
    "model_state_dict" or "model" (training scripts' checkpoints)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise RankbiasError(f"{path} holds no model, state_dict or rankbias checkpoint")


def torch_file_source(path: str | os.PathLike, obj: Mapping, trust: bool = False
                      ) -> TensorSource:
    """A source over the state_dict of a loaded (memory-mapped) torch file."""
    state = state_dict_of(obj, path)
    config = (obj.get("model_args") or obj.get("config")) if isinstance(obj, Mapping) else None
    config = config if isinstance(config, Mapping) else _config_beside(Path(path))
    return TensorSource([_TorchFile(Path(path), state, trust)], f"torch.save file {path}",
                        config)


def memory_source(state: Mapping[str, torch.Tensor], description: str,
                  config: Mapping | None = None) -> TensorSource:
    return TensorSource([_MemoryTensors(state)], description, config)


def open_tensor_files(path: str | os.PathLike) -> TensorSource | None:
    """A source over a .safetensors file, an index json or a Hugging Face folder; None for
    any other file (a torch.save file: `read_torch_file`)."""
    path = Path(path)
    if path.is_dir():
        return _folder_source(path)
    if path.name.endswith(".index.json"):
        return _index_source(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise RankbiasError(f"no such file: {path}")
        return TensorSource([_SafetensorsFile(path)], f"safetensors file {path}",
                            _config_beside(path), ordered=False)
    return None


def _folder_source(folder: Path) -> TensorSource:
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            if name.endswith(".index.json"):
                return _index_source(folder / name)
            if name.endswith(".safetensors"):
                return TensorSource([_SafetensorsFile(folder / name)], f"folder {folder}",
                                    _config_beside(folder / name), ordered=False)
            return TensorSource([_TorchFile(folder / name)], f"folder {folder}",
                                _config_beside(folder / name))
    others = sorted(folder.glob("*.safetensors"))  # e.g. diffusers' names
    if others:
        return TensorSource([_SafetensorsFile(p) for p in others], f"folder {folder}",
                            _config_beside(others[0]), ordered=False)
    raise RankbiasError(f"no checkpoint in folder {folder}: expected one of "
                        f"{', '.join(FOLDER_FILES)} (or *.safetensors files)")


def _index_source(index: Path) -> TensorSource:
    """Shards listed by a Hugging Face index json ({"weight_map": {key: shard file}})."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise RankbiasError(f"cannot read {index}: not a checkpoint index (a JSON object with "
                            f"a weight_map) ({type(err).__name__})") from err
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise RankbiasError(f"{index} lists shards that are not in {index.parent}: "
                            f"{', '.join(missing[:3])}")
    kind = _SafetensorsFile if index.name.endswith(".safetensors.index.json") else _TorchFile
    files = [kind(index.parent / s) for s in shards]
    listed = {k for f in files for k in (e.key for e in f.entries)}
    absent = [k for k in weight_map if k not in listed]
    if absent:
        raise RankbiasError(f"{index} lists tensors its shards do not hold: "
                            f"{', '.join(absent[:3])}: an incomplete download?")
    return TensorSource(files, f"{len(shards)} shards of {index}", _config_beside(index),
                        ordered=False)


def _config_beside(path: Path) -> dict:
    config = path.parent / "config.json"
    if not config.is_file():
        return {}
    try:
        value = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise RankbiasError(f"cannot read {config}: not JSON ({err})".splitlines()[0]) from err
    return value if isinstance(value, dict) else {}
