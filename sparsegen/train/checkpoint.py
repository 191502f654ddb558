"""Checkpoints of a run, and atomic files.

A checkpoint is two files in the run directory, ``checkpoint-<iteration:08d>.safetensors`` (every tensor:
weights, optimiser moments, the latent bank) and ``checkpoint-<iteration:08d>.json`` (everything else: the run
config, the iteration, the random states, the loss history, the optimisers' settings, the versions, and the
size and SHA-256 of the tensor file). Nothing in them is a pickle: a run can be inspected with a text editor and
``safetensors``, and loading one runs no code. The JSON is written last, so a checkpoint exists once its JSON
does; its checksum catches a truncated, zeroed or altered tensor file before it is parsed.

Every file (checkpoints, pictures, JSON) is written to a temporary file in the destination's directory, flushed
to disk and renamed over the destination (``os.replace`` is atomic on POSIX and Windows), so a crash mid-write
leaves the previous file intact; :func:`remove_stale` clears what a killed write left behind.

The previous format, one ``checkpoint.pt`` written by ``torch.save``, still loads: with ``weights_only=True``
(PyTorch's restricted unpickler), the one type it needs beyond tensors and containers allow-listed
(``torch.torch_version.TorchVersion``, a ``str``).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, List, Optional, Tuple, Union

import torch

FORMAT_VERSION = 2
LEGACY_FORMAT = 1
LEGACY_NAME = "checkpoint.pt"
PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^checkpoint-(\d{8,})\.json$")
_TENSORS = re.compile(r"^checkpoint-(\d{8,})\.safetensors$")
_TEMP = re.compile(r"^\..+\.[^.]+\.tmp$")
#: the keys a checkpoint must hold to be read back as a run
REQUIRED = ("iteration", "run_config", "generator", "critic", "latents")


class CheckpointError(ValueError):
    """A checkpoint file that does not load or does not verify (truncated, altered, not a checkpoint, unsafe,
    non-finite); the message is one line naming the file and the problem."""


class CheckpointWarning(UserWarning):
    """A checkpoint that does not load was skipped for an older one."""


class NoCheckpointError(FileNotFoundError):
    """No checkpoint of a run directory loads (none there, or every one is corrupt)."""


# ---- atomic files ----------------------------------------------------------------------------------------
def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); temp files start at 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: PathLike, write: Callable[[Any], None], binary: bool = True) -> str:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    The temp file is ``.<name>.<random>.tmp``; it is removed if ``write`` fails (and by :func:`remove_stale`
    if the process is killed). Returns ``path``.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_bytes_atomic(data: bytes, path: PathLike) -> str:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(text: str, path: PathLike) -> str:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text), binary=False)


def write_json_atomic(obj: Any, path: PathLike, indent: Optional[int] = 2) -> str:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text_atomic(json.dumps(obj, indent=indent) + "\n", path)


def remove_stale(run_dir: PathLike) -> List[str]:
    """Remove what killed writes left in ``run_dir``: temp files (``.<name>.<random>.tmp``) and tensor files of
    checkpoints whose JSON was never written. Returns the names removed. Call it only when no other process
    writes there (the trainer does, at start-up)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    names = set(os.listdir(run_dir))
    gone = []
    for name in sorted(names):
        m = _TENSORS.match(name)
        orphan = m is not None and f"checkpoint-{m.group(1)}.json" not in names
        if orphan or _TEMP.match(name):
            try:
                os.unlink(os.path.join(run_dir, name))
                gone.append(name)
            except FileNotFoundError:
                pass
    return gone


# ---- the JSON + safetensors encoding --------------------------------------------------------------------
def _encode(obj: Any, tensors: dict, key: str) -> Any:
    """``obj`` as JSON; tensors go to ``tensors[key]`` (1-D uint8 tensors, the random states, stay in the JSON)."""
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.uint8 and obj.dim() == 1:
            return {"__uint8__": base64.b64encode(obj.cpu().numpy().tobytes()).decode("ascii")}
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, str):
        return str(obj)  # a plain str (a TorchVersion is a str subclass)
    if isinstance(obj, bool) or obj is None or isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}/{k}" if key else k) for k, v in obj.items()}
        if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            return {"__items__": [[k, _encode(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} at {key or 'the top'} of a checkpoint")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "__tensor__":
            if val not in tensors:
                raise CheckpointError(f"tensor {val!r} is missing from the tensor file")
            return tensors[val]
        if tag == "__uint8__":
            return torch.frombuffer(bytearray(base64.b64decode(val)), dtype=torch.uint8)
        if tag == "__float__":
            return float(val)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in val)
        if tag == "__items__":
            return {k: _decode(v, tensors) for k, v in val}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_name(iteration: int) -> str:
    """The file name (JSON) of the checkpoint of ``iteration``."""
    return f"checkpoint-{int(iteration):08d}.json"


def tensor_file_of(json_path: PathLike) -> str:
    """The tensor file beside a checkpoint's JSON."""
    return os.fspath(json_path)[:-len(".json")] + ".safetensors"


def save(state: dict, run_dir: PathLike, keep: int = 2) -> str:
    """Write ``state`` (a :meth:`Trainer.state_dict <sparsegen.train.trainer.Trainer.state_dict>`) as the
    checkpoint of ``state["iteration"]`` in ``run_dir``, then remove all but the ``keep`` newest checkpoints.
    Returns the JSON's path. Refuses (:class:`CheckpointError`) a state with a non-finite tensor."""
    from safetensors.torch import save as st_save

    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"not writing a checkpoint with {bad}")
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, checkpoint_name(state["iteration"]))
    tensors: dict = {}
    encoded = _encode({**state, "format": FORMAT_VERSION, "torch_version": str(state.get("torch_version", ""))},
                      tensors, "")
    data = st_save(tensors, metadata={"format": f"sparsegen checkpoint {FORMAT_VERSION}"})
    del tensors
    tfile = tensor_file_of(path)
    write_bytes_atomic(data, tfile)
    doc = {"format": FORMAT_VERSION,
           "tensors": {"file": os.path.basename(tfile), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
           "state": encoded}
    del data
    write_text_atomic(json.dumps(doc, indent=1, allow_nan=False) + "\n", path)
    prune(run_dir, keep)
    return path


def prune(run_dir: PathLike, keep: int) -> List[str]:
    """Remove all but the ``keep`` newest checkpoints of ``run_dir`` (a ``checkpoint.pt`` of the previous format
    counts as the oldest). Returns the JSON / ``.pt`` files removed."""
    found = list_checkpoints(run_dir)
    gone = []
    for path in found[max(1, keep):]:
        os.unlink(path)  # the JSON first: a tensor file without one is not a checkpoint
        if path.endswith(".json") and os.path.exists(tensor_file_of(path)):
            os.unlink(tensor_file_of(path))
        gone.append(path)
    return gone


def list_checkpoints(run_dir: PathLike) -> List[str]:
    """The checkpoints of ``run_dir``, newest first: the JSON files by iteration, then ``checkpoint.pt``."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    names = os.listdir(run_dir)
    found = sorted((int(m.group(1)), n) for n in names for m in [_NAME.match(n)] if m)
    out = [os.path.join(run_dir, n) for _, n in reversed(found)]
    if LEGACY_NAME in names:
        out.append(os.path.join(run_dir, LEGACY_NAME))
    return out


def has_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a run directory holding a checkpoint file, or a checkpoint file (loadable or not)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return bool(list_checkpoints(path))
    return os.path.isfile(path) and path.endswith((".json", ".pt"))


def set_aside(path: PathLike) -> List[str]:
    """Rename a (corrupt) checkpoint out of the way, to ``<name>.corrupt``, its tensor file too; returns the new
    names. It is kept for inspection and no longer taken for a checkpoint."""
    path = os.fspath(path)
    files = [path] + ([tensor_file_of(path)] if path.endswith(".json") else [])
    out = []
    for f in files:
        if os.path.exists(f):
            os.replace(f, f + ".corrupt")
            out.append(f + ".corrupt")
    return out


# ---- loading -------------------------------------------------------------------------------------------
def non_finite(state: Any, where: str = "") -> Optional[str]:
    """A description of the first floating-point tensor of ``state`` holding a NaN or an infinity
    (``"generator/out.weight: 81 of 216 values NaN or infinite"``), None when all are finite."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            ok = torch.isfinite(state)
            if not bool(ok.all()):
                return f"{where or 'a tensor'}: {int((~ok).sum())} of {state.numel()} values NaN or infinite"
        return None
    items = (state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple))
             else ())
    for k, v in items:
        bad = non_finite(v, f"{where}/{k}" if where else str(k))
        if bad:
            return bad
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"(?:[Uu]nsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if m:
        return f"it holds a pickle that would call {m.group(1)}: refused, nothing was run"
    if "Weights only load failed" in text:
        return "it holds a pickle that loading with weights_only=True refuses: nothing was run"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {line[:200]}"


def _load_json_checkpoint(path: str) -> dict:
    from safetensors.torch import load as st_load

    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a checkpoint's JSON (truncated or altered?): {_one_line(exc)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION or not isinstance(doc.get("tensors"), dict):
        raise CheckpointError(f"{path}: not a sparsegen checkpoint of format {FORMAT_VERSION}")
    info = doc["tensors"]
    name, size, digest = info.get("file"), info.get("bytes"), info.get("sha256")
    if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{path}: names no tensor file beside it ({name!r})")
    tfile = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(tfile):
        raise CheckpointError(f"{path}: its tensor file {name} is missing")
    have = os.path.getsize(tfile)
    if have != size:
        raise CheckpointError(f"{tfile}: {have} bytes, but its checkpoint says {size} (truncated or altered)")
    with open(tfile, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{tfile}: its SHA-256 does not match its checkpoint's (the file was altered)")
    try:
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001  (any failure to parse is a corrupt file)
        raise CheckpointError(f"{tfile}: not a readable safetensors file: {_one_line(exc)}") from None
    del data
    state = _decode(doc.get("state"), tensors)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no state")
    return state


def _load_legacy(path: str) -> dict:
    from torch.torch_version import TorchVersion

    try:
        with torch.serialization.safe_globals([TorchVersion]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated, zeroed, garbage or unsafe: all are refused)
        raise CheckpointError(f"{path}: cannot be read: {_one_line(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{path}: not a sparsegen checkpoint")
    if "torch_version" in state:
        state["torch_version"] = str(state["torch_version"])
    return state


def load_file(path: PathLike) -> dict:
    """Load and verify one checkpoint file (a ``checkpoint-*.json``, or a ``checkpoint.pt`` of the previous
    format) to the CPU: the state dict of the trainer. Raises :class:`CheckpointError` (one line) when it does
    not load, lacks what a run needs or holds a non-finite tensor, ``FileNotFoundError`` when it is missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = _load_json_checkpoint(path) if path.endswith(".json") else _load_legacy(path)
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of a run (no {', '.join(missing)})")
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{path}: {bad}")
    return state


def load_latest(run_dir: PathLike, on_skip: Optional[Callable[[str], None]] = None) -> Tuple[dict, str, List[str]]:
    """The newest checkpoint of ``run_dir`` that loads and verifies: ``(state, path, skipped)``, ``skipped`` the
    newer checkpoint files that did not (each reported to ``on_skip`` with the reason, once one loads). Raises
    :class:`NoCheckpointError` (one line) when there is none, or none loads."""
    run_dir = os.fspath(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise NoCheckpointError(f"no checkpoint in {run_dir}")
    skipped, reasons = [], []
    for path in found:
        try:
            state = load_file(path)
        except (CheckpointError, FileNotFoundError) as exc:
            skipped.append(path)
            reasons.append(str(exc))
            continue
        if on_skip is not None:
            for reason in reasons:
                on_skip(f"skipped the corrupt checkpoint {reason}")
        return state, path, skipped
    raise NoCheckpointError(f"no checkpoint in {run_dir} loads: " + "; ".join(reasons))


def load(path: PathLike, map_location: Any = "cpu", on_skip: Optional[Callable[[str], None]] = None) -> dict:
    """A checkpoint's state dict: ``path`` is a checkpoint file, or a run directory (its newest checkpoint that
    loads, see :func:`load_latest`). Tensors are loaded to the CPU, then moved to ``map_location``."""
    path = os.fspath(path)
    state = load_latest(path, on_skip)[0] if os.path.isdir(path) else load_file(path)
    if str(map_location) != "cpu":
        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(map_location)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(move(v) for v in x)
            return x
        state = move(state)
    return state
