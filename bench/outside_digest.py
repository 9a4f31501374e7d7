"""What it costs to put an outside input (a data file, a model folder) into a cache key.

    .venv/bin/python bench/outside_digest.py            # a 1 GiB file and a 1 GiB folder of 4 files
    .venv/bin/python bench/outside_digest.py --gib 4

Times, in this process: the first digest (every byte read and hashed with sha256, 1 MiB blocks),
the same digest again through the memo (size, mtime, ctime and inode unchanged: no byte read), and
again after the memo was reloaded from disk as a new run would. The file was just written, so it
is read from the page cache: a cold disk adds its own read time. Prints seconds and GB/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.config import OutsideInput  # noqa: E402
from posttrain.outside import DigestMemo, outside_digests  # noqa: E402


def write_random(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as handle:
        for _ in range(size >> 20):
            handle.write(block)


def timed(label: str, items: dict, memo_path: Path, size: int, rows: list) -> None:
    memo = DigestMemo(memo_path)
    started = time.perf_counter()
    outside_digests(items, memo)
    seconds = time.perf_counter() - started
    rows.append((label, seconds, size / seconds / 1e9 if seconds else float("inf")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_random(root / "data.bin", size)
        (root / "model").mkdir()
        for index in range(4):
            write_random(root / "model" / f"shard-{index}.safetensors", size // 4)
        rows: list = []
        for name, item in (("file", OutsideInput("path", str(root / "data.bin"))), ("folder of 4", OutsideInput("path", str(root / "model")))):
            memo_path = root / f"memo-{name}.json"
            timed(f"{name}: first digest (sha256 of every byte)", {"x": item}, memo_path, size, rows)
            timed(f"{name}: again, memo reloaded (a new run)", {"x": item}, memo_path, size, rows)
            touched = Path(item.name) / "shard-0.safetensors" if Path(item.name).is_dir() else Path(item.name)
            os.utime(touched, None)  # a touch: that file's memo entry no longer matches, its bytes are hashed again
            share = size // 4 if touched != Path(item.name) else size
            timed(f"{name}: after touching one file", {"x": item}, memo_path, share, rows)
    print(f"{args.gib:g} GiB per input")
    print(f"{'case':<48} {'seconds':>9} {'GB/s':>9}")
    for label, seconds, rate in rows:
        print(f"{label:<48} {seconds:>9.4f} {rate:>9.2f}")


if __name__ == "__main__":
    main()
