"""Steps 1-6 for one batch, as far as a batch can go on its own: map each record's schema onto its
role, normalise, filter, the dedup key's digest and near-dup sketch, the benchmark matches, and each survivor's output line with what the
split and the clean contract need of it.

    context = BatchContext(config, ChatFormat(tokenizer), benchmarks, dedup_fields)
    prepared = prepare(context, raw_batch)                                   # in this process
    for raw_batch, prepared in prepared_in_order(context, raw_batches, workers=2):  # on workers
        ...

What depends on earlier rows (which key came first, the near-dup index, rejected.jsonl) is left to
the stage's own process (tasks.data.RoleStream.take), which applies the prepared batches in reading
order, so the output is the same for any number of workers and any batch size.

Workers are forked from the stage's process, so they start in milliseconds and share the tokenizer,
the chat format and the benchmark index without pickling them; only the rows go to them and the
results come back. A forked child of a process with threads must not touch a lock another thread
held at the fork: the workers run only this module's code (Python, numpy, the tokenizer's Rust
encoder with its thread pool off, as tokenizers requires after a fork) and never log. Where fork
is not the platform's way (macOS, Windows), the batches run in the stage's process.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import orjson

from data_contracts.frames import CleanFrameBuilder, dedup_key, key_digest
from posttrain.config import DataConfig
from posttrain.formatting import ChatFormat
from tasks.data.clean import filter_batch, normalize_batch
from tasks.data.decontaminate import BenchmarkIndex
from tasks.data.dedup import ExactIndex, Sketches, sketch
from tasks.data.ingest import RawBatch, map_batch
from tasks.data.keytext import near_dup_keys
from tasks.data.records import ROLE_FIELDS, Row


@dataclass
class BatchContext:
    """What every batch needs; read-only while batches are prepared."""

    config: DataConfig
    chat: ChatFormat
    benchmarks: BenchmarkIndex | None
    dedup_fields: dict[str, list[str]]  # role -> the fields its dedup key joins
    frames: dict[str, CleanFrameBuilder] = field(init=False)  # per role: computes a row's contract columns

    def __post_init__(self) -> None:
        self.frames = {role: CleanFrameBuilder(list(ROLE_FIELDS[role]), fields) for role, fields in self.dedup_fields.items()}


@dataclass
class Prepared:
    """One batch's results, by position in the batch. Survivors are the rows the filter kept; the
    other lists are per survivor."""

    removed: list[tuple[int, str, dict]]  # (position, rule, detail): unusable records, the filter's removals
    normalised: dict[str, int]  # what mapping and cleaning rewrote without dropping a row (placeholder inputs, PII)
    survivors: list[int]
    key_digests: list[bytes]  # ExactIndex.digest of the dedup key
    near: Sketches | list[str] | None  # numpy backend: sketches; datasketch: the key texts; None: off
    benchmark_hits: list[list[str]] | None
    lines: list[bytes]  # the row as written to <role>/{train,eval}.jsonl
    split_hashes: list[int]  # orders the rows for the split (seeded hash of the dedup key)
    frame_columns: dict  # CleanFrameBuilder.columns_of the survivors
    seconds: dict[str, float]  # time per phase spent on this batch
    pid: int  # the process that prepared it


class _Decisions:
    """Collects what normalize_batch and filter_batch report, in place of the stage's Removals."""

    def __init__(self) -> None:
        self.removed: list[tuple[int, str, dict]] = []
        self.normalised: dict[str, int] = {}

    def add(self, rule: str, row: Row, **detail) -> None:
        self.removed.append((row.row_id, rule, detail))

    def count(self, what: str, amount: int = 1) -> None:
        if amount:
            self.normalised[what] = self.normalised.get(what, 0) + amount


def output_record(record: dict, role: str) -> dict:
    keys = [*ROLE_FIELDS[role], *(key for key in ("messages", "skill") if key in record)]
    return {key: record[key] for key in keys}


def prepare(context: BatchContext, batch: RawBatch) -> Prepared:
    """Steps 1 (the schema mapping) to 6 for one batch; positions are those in `batch`."""
    config, seconds, role = context.config, {}, batch.source.role
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock
        clock = now

    decisions = _Decisions()
    rows = []  # row_id: the position in the batch
    for position, mapped in enumerate(map_batch(batch, decisions)):
        if isinstance(mapped, str):
            decisions.removed.append((position, mapped, {}))
        else:
            rows.append(Row(role, mapped, {}, "", 0, position))
    normalize_batch(rows, config.scrub_pii, decisions)
    lap("ingest")
    rows = filter_batch(rows, config, context.chat, decisions) if rows else []
    lap("filter")
    fields = context.dedup_fields[role]
    keys = [dedup_key(row.record, fields) for row in rows]
    digests = [ExactIndex.digest(key) for key in keys]
    near = None
    if config.near_dup.enabled and rows:
        options = config.near_dup
        near = near_dup_keys([row.record for row in rows], fields, options.strip_punctuation, collapse=options.shingle_unit == "char")
        near = sketch(near, options) if options.backend == "numpy" else near.texts()
    lap("dedup")
    hits = context.benchmarks.matches_batch([row.record for row in rows], role) if context.benchmarks is not None else None
    lap("decontaminate")
    written = [output_record(row.record, role) for row in rows]
    lines = [orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE) for record in written]  # 5x json.dumps
    split_hashes = [key_digest(f"{config.seed}\x1f{key}") for key in keys]
    frame_columns = context.frames[role].columns_of(written, [key_digest(key) for key in keys])
    lap("split")
    return Prepared(
        removed=decisions.removed,
        normalised=decisions.normalised,
        survivors=[row.row_id for row in rows],
        key_digests=digests,
        near=near,
        benchmark_hits=hits,
        lines=lines,
        split_hashes=split_hashes,
        frame_columns=frame_columns,
        seconds=seconds,
        pid=os.getpid(),
    )


# ----------------------------------------------------------------------------- worker processes

_CONTEXT: BatchContext | None = None  # set in each worker at the fork
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def can_fork() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _die_with(parent: int) -> None:
    """SIGKILL this worker when the stage's process dies, however it dies. The run's watchdog cannot
    find a forked worker: it looks for a marker in each process's environment as exec'd, and a
    fork keeps the parent's original one. An orphaned worker would wait forever on its task queue
    (it holds the queue's write end too), keeping every file the stage had open, store locks
    included, so the next run on the store would wait behind it. Linux: prctl(PR_SET_PDEATHSIG),
    which fires when the thread that forked the worker ends; the stage's thread waits for its
    workers, so that is the stage ending."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _start_worker(context: BatchContext, parent: int) -> None:
    global _CONTEXT
    _die_with(parent)
    _CONTEXT = context
    # The parent may have run the tokenizer's Rust thread pool; its threads do not exist here.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Another thread of the parent may have been writing to stdout or stderr at the fork, holding
    # the stream's lock for good in this copy: a warning printed here would wait forever. Fresh
    # stream objects on the same file descriptors have their own locks. (logging re-creates its
    # locks after a fork by itself.)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the worker
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def _prepare_in_worker(batch: RawBatch) -> Prepared:
    return prepare(_CONTEXT, batch)


def prepared_in_order(context: BatchContext, batches: Iterable[RawBatch], workers: int) -> Iterator[tuple[RawBatch, Prepared]]:
    """(batch, prepare(context, batch)) for each batch, in order. With workers > 1 (and fork
    available) each batch goes out in `workers` pieces, up to workers + 1 pieces in flight while
    the caller reads the next batch and applies the finished pieces: the pieces keep every worker
    busy at the end of the data too (hh-rlhf's 2,354 pairs, one batch, cost as much as 6,000
    Alpaca rows)."""
    if workers <= 1 or not can_fork():
        for batch in batches:
            yield batch, prepare(context, batch)
        return
    # Objects the collector never visits stay in pages the workers share with this process; a
    # collection in either would touch (and so copy) every page of the ~1 GB the libraries hold.
    gc.freeze()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(context, os.getpid()))
    pending: deque = deque()
    try:
        for batch in batches:
            for piece in batch.split(workers):
                pending.append((piece, pool.submit(_prepare_in_worker, piece)))
                if len(pending) > workers:
                    piece, future = pending.popleft()
                    yield piece, future.result()
        while pending:
            piece, future = pending.popleft()
            yield piece, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


def default_workers() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
