"""The data stage: ingest, clean, deduplicate, decontaminate and split training data, then check it.

    from tasks import data
    artifact = data.run(cfg.data, {"base": base, "benchmarks": benchmarks}, out_dir)
    python -m tasks.data --config data.json --inputs inputs.json --out /tmp/data   # as its own process

Rows stream through steps 1-6 in batches of `data.batch_rows`; only the survivors are written (to
a scratch file per role), so memory holds a few batches of text plus a few numbers per row and the
dedup indexes. Every dropped row goes to `rejected.jsonl` with its rule and source row.

Everything a batch can do alone (prepare.py: schema mapping, normalising, filtering, the dedup
key's digest and near-dup sketch, the benchmark matches, the output lines and their contract
columns) runs on `data.workers` forked processes, one per CPU by default; this process reads the
sources and applies the prepared batches in reading order (RoleStream.take: which key came first,
the near-dup index, the removals), so the output is the same for any number of workers. Phase
seconds in the manifest are summed over the processes.

 1. ingest      each source (ingest.py: JSON lines/array, Parquet, CSV, `datasets` folder or id,
                generated skills) mapped from its schema (alpaca, messages, hh, …) onto the role's
                fields; `no_final_reply` and `prompt_mismatch` quarantine what cannot be mapped
 2. normalise   Unicode NFKC, control characters out (newlines kept), runs of spaces/tabs -> one,
                optional PII scrubbing (clean.py); rewritten text is counted, not dropped
 3. filter      empty, chosen == rejected (as text or as token ids), too short, over `max_tokens`
                as the base tokenizer's chat template renders the row (formatting.ChatFormat)
 4. exact dedup first occurrence of each whitespace-collapsed dedup key wins (dedup.ExactIndex)
 5. near dedup  MinHash LSH on the lower-cased key (dedup.NearDupIndex); clusters by union-find,
                the first row of a cluster wins
 6. decontam.   rows that overlap a benchmark prompt (exact, or a word n-gram) are dropped,
                counted per benchmark (decontaminate.py)
 7. split       per role, rows ordered by a seeded hash of their dedup key (a shuffle that needs
                no second copy of the data and keeps a row's split when other rows change); the
                first `eval_fraction` is eval: <role>/train.jsonl and <role>/eval.jsonl
 8. contracts   Great Expectations suites in data_contracts/, raw -> clean per role; Data Docs
                HTML in data_docs/; a failed critical expectation raises after the docs are
                built, so training never starts on broken data. The tokenized contracts (at each
                training stage's own max_length) run in the consuming stage, before its first
                step (data_contracts.check_tokenized): a stage's max_length is not this stage's key

Dedup and decontamination work within a role (instruction, preference, prompt): rows of different
roles have different fields and feed different stages.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import shutil
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_contracts import ContractRun, ContractViolation
from data_contracts.frames import CleanFrameBuilder, dedup_key
from posttrain import failpoints
from posttrain.artifacts import Artifact
from posttrain.config import DataConfig
from posttrain.formatting import ChatFormat
from tasks.data import dedup
from tasks.data.clean import normalize_text
from tasks.data.decontaminate import BenchmarkIndex
from tasks.data.ingest import RawBatch, generated_source, read_raw_batches, source_type
from tasks.data.prepare import BatchContext, Prepared, default_workers, prepared_in_order
from tasks.data.records import ROLE_FIELDS, RULES, Origins, Removals

__all__ = ["RULES", "dedup_key", "normalize_text", "run", "split_order"]

# The contract suites this stage runs (one per role it writes): their bytes enter its cache key.
DATA_FILES = ("data_contracts/instruction_clean.json", "data_contracts/preference_clean.json", "data_contracts/prompt_clean.json")


def split_order(hashes: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, int]:
    """Row positions ordered by hash, and how many of the first are eval (at least one when there
    are two rows, never all of them)."""
    n = len(hashes)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n >= 2 else 0
    return np.argsort(hashes, kind="stable"), n_eval


class RoleStream:
    """One role's dedup indexes and its survivors on disk (one JSON line each, plus its offset and
    split hash in typed arrays)."""

    def __init__(self, role: str, fields: list[str], config: DataConfig, work_dir: Path):
        self.role, self.fields, self.config = role, fields, config
        self.exact = dedup.ExactIndex()
        self.near = dedup.NearDupIndex(config.near_dup) if config.near_dup.enabled else None
        self.path = work_dir / f"{role}.jsonl"
        self.handle = self.path.open("w+b")
        self.offsets, self.hashes, self.written_bytes = array("q"), array("q"), 0
        self.frame = CleanFrameBuilder(list(ROLE_FIELDS[role]), fields)

    def take(self, batch: RawBatch, prepared: Prepared, removals: Removals, origins: Origins, per_benchmark: dict[str, int]) -> dict[str, float]:
        """Apply one prepared batch, in reading order: the filter's removals, exact dedup, near
        dedup, decontamination; write the survivors and note what the split and the clean contract
        need of each, so neither reads the rows back. Returns the seconds spent per phase."""
        seconds, clock = {}, time.perf_counter()
        for position, rule, detail in prepared.removed:
            removals.add(rule, batch.row(position), **detail)
        for what, count in prepared.normalised.items():
            removals.count(what, count)
        survivors = prepared.survivors  # positions in the batch
        row_ids = [batch.first_id + position for position in survivors]
        first = [self.exact.first_seen_digest(digest, row_id) for row_id, digest in zip(row_ids, prepared.key_digests)]
        unique = np.array([earlier is None for earlier in first], dtype=bool)
        for position, earlier in zip(survivors, first):
            if earlier is not None:
                removals.add("exact_dup", batch.row(position), duplicate_of=origins.of(earlier))
        kept = np.flatnonzero(unique)
        if self.near is not None and len(kept):
            ids = [row_ids[index] for index in kept.tolist()]
            if isinstance(prepared.near, dedup.Sketches):
                firsts = self.near.add_sketches(prepared.near.select(unique), ids)
            else:  # the datasketch backend: key texts
                firsts = self.near.add_batch([prepared.near[index] for index in kept.tolist()], ids)
            for index, earlier in zip(kept.tolist(), firsts):
                if earlier is not None:
                    removals.add("near_dup", batch.row(survivors[index]), duplicate_of=origins.of(earlier))
                    unique[index] = False
        now = time.perf_counter()
        seconds["dedup"], clock = now - clock, now
        if prepared.benchmark_hits is not None:
            for index in np.flatnonzero(unique).tolist():
                hits = prepared.benchmark_hits[index]
                if hits:
                    removals.add("decontaminated", batch.row(survivors[index]), benchmarks=hits)
                    for hit in hits:
                        per_benchmark[hit] += 1
                    unique[index] = False
        now = time.perf_counter()
        seconds["decontaminate"], clock = now - clock, now
        written = np.flatnonzero(unique)
        for index in written.tolist():
            line = prepared.lines[index]
            self.offsets.append(self.written_bytes)
            self.handle.write(line)
            self.written_bytes += len(line)
            self.hashes.append(prepared.split_hashes[index])
        self.frame.add_columns(prepared.frame_columns, "train", written)
        seconds["split"] = time.perf_counter() - clock
        return seconds

    def write_splits(self, out_dir: Path) -> tuple[dict[str, int], CleanFrameBuilder]:
        """<role>/{train,eval}.jsonl in hash order; the row counts and the clean-suite columns."""
        order, n_eval = split_order(np.frombuffer(self.hashes, dtype=np.int64), self.config.eval_fraction)
        self.offsets.append(self.written_bytes)
        (out_dir / self.role).mkdir(parents=True, exist_ok=True)
        with (out_dir / self.role / "train.jsonl").open("wb") as train, (out_dir / self.role / "eval.jsonl").open("wb") as held_out:
            if len(order):
                self.handle.flush()
                with mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_READ) as lines:
                    offsets = self.offsets
                    held_out.writelines(lines[offsets[position] : offsets[position + 1]] for position in order[:n_eval].tolist())
                    train.writelines(lines[offsets[position] : offsets[position + 1]] for position in order[n_eval:].tolist())
        self.frame.arrange(order, ["eval", "train"], (np.arange(len(order)) >= n_eval).astype(np.int8))
        self.handle.close()
        self.path.unlink()
        return {"train": len(order) - n_eval, "eval": n_eval}, self.frame


# ----------------------------------------------------------------------------- the stage


@contextmanager
def tokenizer_threads():
    """The fast tokenizer's batched calls on every core while the stage runs in one process
    (`data.workers: 1`). posttrain.env turns that off for the process (Rust threads and a later fork
    do not mix: a DataLoader worker would deadlock); worker processes forked by this stage turn it
    off again in themselves before they tokenize (prepare._start_worker). tokenizers reads the
    variable at every call."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def run(config: DataConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    with tokenizer_threads():
        return _run(config, inputs, out_dir)


def _run(config: DataConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    from posttrain.models import (
        load_tokenizer,  # imports transformers: keep `import tasks.data` cheap
    )

    out_dir = Path(out_dir)
    if config.contract_suites:
        from data_contracts.check import import_gx

        import_gx()  # ~1.5 s the first time in a process: an import, not this stage's work
    started = time.perf_counter()
    if "base" not in inputs:
        raise ValueError("data stage: missing input 'base' (its tokenizer measures row lengths)")
    if config.decontaminate and "benchmarks" not in inputs:
        raise ValueError("data stage: data.decontaminate is true but there is no 'benchmarks' input")
    roles = list(dict.fromkeys(source.role for source in config.sources))
    dedup_fields = {role: dedup.dedup_fields_for(role, config.dedup_key) for role in roles}
    benchmarks = None
    if config.decontaminate:
        benchmarks = BenchmarkIndex.load(inputs["benchmarks"].path, config.decontaminate_ngram, config.decontaminate_min_words)
    chat = ChatFormat(load_tokenizer(inputs["base"].path))
    chat.end_of_turn, chat._reply_pieces  # worked out once here, not in every worker  # noqa: B018

    work_dir = out_dir / "_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    streams = {role: RoleStream(role, dedup_fields[role], config, work_dir) for role in roles}
    origins = Origins()
    seconds = {name: 0.0 for name in ("ingest", "filter", "dedup", "decontaminate", "split", "contracts")}
    planted = {"exact_duplicates": 0, "near_duplicates": 0, "empty": 0, "overlong": 0}
    per_benchmark = {name: 0 for name in (benchmarks.names if benchmarks else [])}
    tally, clusters = [], []

    def timed(phase: str, step, *args):
        failpoints.reach("phase")
        clock = time.perf_counter()
        result = step(*args)
        seconds[phase] += time.perf_counter() - clock
        return result

    def raw_batches() -> Iterator[RawBatch]:
        """Every source's records, batch by batch; a source is tallied once read."""
        nonlocal planted
        for index, source in enumerate(config.sources):
            name = source.path
            if source.generate is not None:
                source, noise = generated_source(source, index, out_dir)
                name = f"raw/{index}-{source.role}.jsonl"
                planted = {key: planted[key] + noise[key] for key in planted}
            first_row = len(origins)
            batches = read_raw_batches(source, name, config.batch_rows, origins)
            while (batch := timed("ingest", next, batches, None)) is not None:
                yield batch
            tally.append({"source": name, "role": source.role, "format": source.format, "type": source_type(source), "rows": len(origins) - first_row})

    context = BatchContext(config, chat, benchmarks, dedup_fields)
    workers, processes = config.workers or default_workers(), set()
    with Removals(out_dir / "rejected.jsonl") as removals:
        for batch, prepared in prepared_in_order(context, raw_batches(), workers):
            failpoints.reach("phase")
            processes.add(prepared.pid)
            taken = streams[batch.source.role].take(batch, prepared, removals, origins, per_benchmark)
            for phase, spent in [*prepared.seconds.items(), *taken.items()]:
                seconds[phase] += spent
        near_stats = {}
        for role, stream in streams.items():
            if stream.near is None:
                continue
            for cluster in stream.near.clusters():
                clusters.append({"role": role, "kept": origins.of(cluster[0]), "removed": [origins.of(i) for i in cluster[1:]]})
            for key, value in stream.near.stats().items():
                near_stats[f"near_dup_{key}"] = near_stats.get(f"near_dup_{key}", 0) + value
        with (out_dir / "near_dup_clusters.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(cluster) + "\n" for cluster in clusters)

    clock = time.perf_counter()
    counts, clean_builders = {}, {}
    for role, stream in streams.items():
        counts[role], clean_builders[role] = stream.write_splits(out_dir)
    shutil.rmtree(work_dir)
    seconds["split"] += time.perf_counter() - clock

    clock = time.perf_counter()
    summaries = []
    if config.contract_suites:
        contracts = ContractRun(out_dir, docs_dir=out_dir / "data_docs")
        for role in roles:
            summaries.append(contracts.validate(clean_builders[role].frame(), f"{role}_clean"))
        contracts.build_docs()
    seconds["contracts"] = time.perf_counter() - clock
    total_seconds = time.perf_counter() - started

    rows_in = len(origins)
    rows_out = sum(split_count for by_split in counts.values() for split_count in by_split.values())
    generated = any(source.generate is not None for source in config.sources)
    metrics = {
        "rows_in": rows_in,
        "rows_out": rows_out,
        **{f"removed_{rule}": count for rule, count in removals.counts.items()},
        **{f"normalised_{what}": count for what, count in sorted(removals.normalised.items())},
        "near_dup_clusters": len(clusters),
        **near_stats,
        "origins_bytes": origins.nbytes(),
        **{f"decontaminated_{name}": count for name, count in per_benchmark.items()},
        **{f"{role}_{split}": count for role, by_split in counts.items() for split, count in by_split.items()},
        **{f"planted_{key}": count for key, count in planted.items() if generated},
        "contract_expectations_evaluated": sum(s["evaluated"] for s in summaries),
        "contract_expectations_passed": sum(s["passed"] for s in summaries),
        "contract_expectations_failed": sum(len(s["failed"]) for s in summaries),
        **{f"{name}_seconds": round(value, 3) for name, value in seconds.items()},
        "seconds": round(total_seconds, 3),
        "worker_processes": len(processes),  # that prepared batches (1: all in the stage's process)
        "rows_per_second": round(rows_in / total_seconds, 1),
        # ru_maxrss is KiB on Linux: the process's peak so far (this stage or anything before it).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    assert rows_in == rows_out + sum(removals.counts.values()), "every row is either kept or rejected"
    if config.contract_suites:
        try:
            contracts.raise_first_violation()  # after rejected.jsonl and the Data Docs exist, for the post-mortem
        except ContractViolation as violation:
            # "row count 0" alone hides the cause: say, for the failed suite's role, which rules
            # removed how many rows, and where the removed rows are.
            role = next(s["suite"] for s in summaries if s["violation"]).removesuffix("_clean")
            removed = sorted(((count, rule) for rule, count in removals.by_role.get(role, {}).items()), reverse=True)
            causes = ", ".join(f"{rule} {count}" for count, rule in removed) or "none"
            kept = sum(counts[role].values())
            raise ContractViolation(
                f"{violation}; {role} rows: {kept + sum(count for count, _ in removed)} in, {kept} kept, removed by rule: {causes}; "
                f"the removed rows with their rule: {out_dir / 'rejected.jsonl'}"
            ) from None
    contract_summary = {
        s["suite"]: {"passed": s["passed"], "evaluated": s["evaluated"], "warnings": sorted(s["failed"])} for s in summaries
    }
    return Artifact.draft(
        out_dir,
        metrics,
        dedup_key=list(config.dedup_key),
        dedup_fields=dedup_fields,
        normalised=dict(sorted(removals.normalised.items())),
        sources=tally,
        contracts=contract_summary,
    )
