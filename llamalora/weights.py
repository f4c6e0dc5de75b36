"""Base weights from their safetensors files to the GPU at the page cache's pace.

transformers reads each tensor through safetensors' memory map and copies it to the GPU from
pageable memory; with on-the-fly 8-bit or 4-bit quantization it does so one tensor at a time in
its main thread, so that full-precision tensors don't pile up ahead of the quantizer. Threads
reading (pread) into pinned buffers and copying asynchronously move the same bytes about three
times as fast (BENCHMARKS.md, "The start of a run and a second run"; `benchmarks/read_speed.py`
measures both paths). safetensors has no call that reads into a buffer of ours or says where a
tensor's bytes lie, hence the small header reader here.

`fast_reads()` gives transformers' loader that second path: its tensors, in the order it asks
for them, read by `READERS` threads at most `LOOKAHEAD` tensors ahead of it (bounded GPU memory:
a few of the largest tensors). Anything it does not recognize loads as it always did.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import struct
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

READERS = min(8, os.cpu_count() or 1)  # 8 read as fast as 16, 4 well short of that
LOOKAHEAD = 16  # tensors read ahead of the loader
CHUNK = 64 << 20  # bytes per pinned staging buffer (two per reader)

# safetensors' dtype names -> torch's, for the dtypes read here (others load as before)
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


@dataclass(frozen=True)
class Location:
    """Where a tensor's bytes lie in a safetensors file."""

    path: str
    offset: int  # from the file's start
    nbytes: int
    dtype: str  # torch's name
    shape: tuple[int, ...]


def tensor_locations(path: str) -> dict[str, Location]:
    """Each tensor of a safetensors file with a dtype read here: the file is an 8-byte
    little-endian header length, the JSON header (name -> dtype, shape, data offsets), then the
    data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype")) if name != "__metadata__" else None
        if dtype is not None:
            begin, end = info["data_offsets"]
            out[name] = Location(path, start + begin, end - begin, dtype, tuple(info["shape"]))
    return out


def read_tensor(where: Location, device, staging=None):
    """One tensor, read with pread: on a CUDA device through `staging` (two pinned buffers and a
    stream: each chunk's copy overlaps the next chunk's read), on the CPU into its own memory."""
    import torch

    out = torch.empty(where.nbytes, dtype=torch.uint8, device=device)
    fd = os.open(where.path, os.O_RDONLY)
    try:
        if out.device.type == "cpu":
            _pread_into(fd, memoryview(out.numpy()), where.offset, where.path)
        else:
            buffers, stream = staging
            copied = [None, None]
            for i, done in enumerate(range(0, where.nbytes, CHUNK)):
                n = min(CHUNK, where.nbytes - done)
                if copied[i % 2] is not None:
                    copied[i % 2].synchronize()  # that buffer's last copy is done
                buffer = buffers[i % 2]
                _pread_into(fd, memoryview(buffer.numpy())[:n], where.offset + done, where.path)
                with torch.cuda.stream(stream):
                    out[done:done + n].copy_(buffer[:n], non_blocking=True)
                    copied[i % 2] = torch.cuda.Event()
                    copied[i % 2].record(stream)
            for event in copied:
                if event is not None:
                    event.synchronize()  # ready for whichever stream reads it next
    finally:
        os.close(fd)
    return out.view(getattr(torch, where.dtype)).view(where.shape)


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    got = 0
    while got < len(view):  # a pread may return fewer bytes than asked
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"{path} ends before its tensors do; the file is truncated")
        got += n


class _Staging(threading.local):
    """Each reader thread's two pinned buffers and copy stream, made at its first read."""

    value = None

    def get(self, device):
        import torch

        if self.value is None:
            self.value = ([torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
                           for _ in range(2)], torch.cuda.Stream(device))
        return self.value


class _ReadAhead:
    """The loader's tensors in the order it registers them; `take(k)` has tensors k to
    k + LOOKAHEAD read (or being read) and waits for k. A tensor taken out of order is read
    when asked for, so nothing waits on a tensor that was never started."""

    def __init__(self, readers: int = READERS, lookahead: int = LOOKAHEAD):
        self.lookahead = lookahead
        self.reads = 0
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="llamalora-read")
        self._staging = _Staging()
        self._jobs: list[tuple[Location, object]] = []
        self._started: dict[int, Future] = {}
        self._lock = threading.Lock()

    def add(self, where: Location, device) -> int:
        with self._lock:
            self._jobs.append((where, device))
            k = len(self._jobs) - 1
            if k < self.lookahead:  # the first reads start while the loader still registers
                self._start(k)
        return k

    def take(self, k: int):
        with self._lock:
            for j in range(k, min(k + 1 + self.lookahead, len(self._jobs))):
                if j not in self._started and self._jobs[j] is not None:  # not yet taken
                    self._start(j)
            future = self._started.pop(k)
            self._jobs[k] = None  # taken once, as transformers does
        return future.result()

    def _start(self, k: int) -> None:
        where, device = self._jobs[k]
        self._started[k] = self._pool.submit(self._read, where, device)

    def _read(self, where: Location, device):
        with self._lock:
            self.reads += 1
        staging = self._staging.get(device) if device.type == "cuda" else None
        return read_tensor(where, device, staging)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._started.clear()


class _Slice:
    """safetensors' lazy slice of one tensor, which also knows where its bytes lie."""

    def __init__(self, real, where: Location):
        self._real, self.where = real, where

    def __getitem__(self, index):
        return self._real[index]

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_real", "where"):
            raise AttributeError(name)
        return getattr(self._real, name)


class _Handle:
    """safetensors' open file, whose `get_slice` hands out `_Slice`s."""

    def __init__(self, real, path: str):
        self._real = real
        self._where = tensor_locations(path)

    def get_slice(self, name: str):
        real = self._real.get_slice(name)
        where = self._where.get(name)
        return real if where is None else _Slice(real, where)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_real", "_where"):
            raise AttributeError(name)
        return getattr(self._real, name)

    def __enter__(self):
        self._real.__enter__()
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)


@contextlib.contextmanager
def fast_reads(devices: tuple[str, ...] = ("cuda",)):
    """transformers' `from_pretrained` inside reads its safetensors tensors bound for `devices`
    as described above. A transformers whose loader lacks the two functions taken over
    (`modeling_utils.safe_open`, `core_model_loading.spawn_materialize`, transformers 5.x)
    loads as it always did. Yields the `_ReadAhead`, whose `reads` counts tensors read here."""
    try:
        import torch
        from transformers import core_model_loading as loading, modeling_utils
    except ImportError:
        yield None
        return
    stock_open = getattr(modeling_utils, "safe_open", None)
    stock_spawn = getattr(loading, "spawn_materialize", None)
    try:
        signature = inspect.signature(stock_spawn) if stock_spawn else None
    except (TypeError, ValueError):
        signature = None
    params = set(signature.parameters) if signature else set()
    if stock_open is None or not {"thread_pool", "tensor", "device", "dtype"} <= params \
            or sys.byteorder != "little":
        yield None
        return
    ahead = _ReadAhead()

    def open_located(filename, *args, **kwargs):
        real = stock_open(filename, *args, **kwargs)
        try:
            return _Handle(real, str(filename))
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return real  # a header we can't read: safetensors reads the file as before

    def spawn(*args, **kwargs):
        arg = signature.bind(*args, **kwargs).arguments
        tensor, device, dtype = arg["tensor"], arg.get("device"), arg.get("dtype")
        try:
            target = torch.device(device) if device is not None else None
        except (TypeError, RuntimeError):
            target = None
        if target is not None and target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if (not isinstance(tensor, _Slice) or arg.get("sharding_op") is not None
                or target is None or target.type not in devices):
            return stock_spawn(*args, **kwargs)

        def cast(value):
            return value if dtype is None or value.dtype == dtype else value.to(dtype)

        if arg["thread_pool"] is not None:  # transformers' own threads (no quantization)
            return arg["thread_pool"].submit(lambda: cast(ahead._read(tensor.where, target)))
        k = ahead.add(tensor.where, target)
        return lambda: cast(ahead.take(k))

    modeling_utils.safe_open, loading.spawn_materialize = open_located, spawn
    try:
        yield ahead
    finally:
        modeling_utils.safe_open, loading.spawn_materialize = stock_open, stock_spawn
        ahead.close()
        # the readers' pinned buffers go back to the driver, not to torch's host cache
        empty = getattr(torch._C, "_host_emptyCache", None) or getattr(
            torch._C, "_accelerator_emptyHostCache", None)
        if empty is not None and torch.cuda.is_available():
            empty()
