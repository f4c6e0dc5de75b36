"""How fast a checkpoint's bytes move from the page cache to the GPU, by method (issue 13's second
run: `llamalora.weights` is the last method here).

    python3 benchmarks/read_speed.py /tmp/m11b      # a folder of .safetensors files

Run it after the files were read once (a training run, or `cat FOLDER/* > /dev/null`), so that
every method reads from memory. Methods: safetensors' memory map and `.to("cuda")` one tensor at
a time (transformers' path when it quantizes), the same on 4 and 8 threads, safetensors opened
on the GPU, and pread into pinned buffers with asynchronous copies on 1, 4, 8 and 16 threads.
"""

from __future__ import annotations

import argparse
import glob
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    args = ap.parse_args()

    import torch
    from safetensors import safe_open

    from llamalora.weights import CHUNK

    files = sorted(glob.glob(os.path.join(args.folder, "*.safetensors")))
    torch.zeros(1, device="cuda")
    keys = []
    for f in files:
        with safe_open(f, "pt") as h:
            keys += [(f, k) for k in h.keys()]

    def memory_map(threads: int) -> int:
        handles = {f: safe_open(f, "pt") for f in files}
        work: queue.Queue = queue.Queue()
        for item in keys:
            work.put(item)
        out = []

        def run():
            while True:
                try:
                    f, k = work.get_nowait()
                except queue.Empty:
                    return
                out.append(handles[f].get_tensor(k).to("cuda"))

        _join([threading.Thread(target=run) for _ in range(threads)])
        return sum(t.numel() * t.element_size() for t in out)

    def on_gpu() -> int:
        total = 0
        for f in files:
            with safe_open(f, "pt", device="cuda:0") as h:
                for k in h.keys():
                    t = h.get_tensor(k)
                    total += t.numel() * t.element_size()
        return total

    def pread_pinned(threads: int) -> int:
        jobs, outs = [], []
        for f in files:
            size = os.path.getsize(f)
            outs.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            fd = os.open(f, os.O_RDONLY)
            jobs += [(fd, outs[-1], off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
        pending = iter(jobs)
        lock = threading.Lock()

        def run():
            buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            copied = [None, None]
            stream = torch.cuda.Stream()
            for i in range(len(jobs)):
                with lock:
                    job = next(pending, None)
                if job is None:
                    break
                fd, gpu, off, n = job
                if copied[i % 2] is not None:
                    copied[i % 2].synchronize()
                assert os.preadv(fd, [memoryview(buffers[i % 2].numpy())[:n]], off) == n
                with torch.cuda.stream(stream):
                    gpu[off:off + n].copy_(buffers[i % 2][:n], non_blocking=True)
                    copied[i % 2] = torch.cuda.Event()
                    copied[i % 2].record(stream)
            for event in copied:
                if event is not None:
                    event.synchronize()

        _join([threading.Thread(target=run) for _ in range(threads)])
        return sum(o.numel() for o in outs)

    methods = [("memory map, 1 thread", lambda: memory_map(1)),
               ("memory map, 4 threads", lambda: memory_map(4)),
               ("memory map, 8 threads", lambda: memory_map(8)),
               ("safetensors on the GPU", on_gpu)] + [
        (f"pread + pinned, {n} thread(s)", lambda n=n: pread_pinned(n)) for n in (1, 4, 8, 16)]
    for name, method in methods:
        started = time.perf_counter()
        nbytes = method()
        torch.cuda.synchronize()
        took = time.perf_counter() - started
        print(f"{name}: {nbytes / 1e9:.1f} GB in {took:.2f} s = {nbytes / 1e9 / took:.1f} GB/s",
              flush=True)
        torch.cuda.empty_cache()


def _join(threads: list) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
