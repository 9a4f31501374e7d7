"""Steps 4-5: exact dedup on the normalised key, then MinHash LSH near-dup with union-find clusters."""

from __future__ import annotations

import hashlib
import re

from data_contracts.frames import dedup_key
from posttrain.config import NearDupConfig
from tasks.data.records import RESPONSE_ALIAS, ROLE_FIELDS, Removals, Row


def dedup_fields_for(role: str, dedup_key_fields: list[str]) -> list[str]:
    fields = [RESPONSE_ALIAS[role] if name == "response" else name for name in dedup_key_fields]
    unknown = [name for name in fields if name not in ROLE_FIELDS[role]]
    if unknown:
        raise ValueError(f"data.dedup_key: {unknown[0]!r} is not a field of {role} rows {ROLE_FIELDS[role]}")
    return fields


def dedup_exact(rows: list[Row], fields: list[str], removals: Removals) -> list[Row]:
    first_seen: dict[bytes, Row] = {}
    kept = []
    for row in rows:
        digest = hashlib.blake2b(dedup_key(row.record, fields).encode(), digest_size=16).digest()
        original = first_seen.setdefault(digest, row)
        if original is row:
            kept.append(row)
        else:
            removals.add("exact_dup", row, duplicate_of=original.origin())
    return kept


_PUNCTUATION = re.compile(r"[^\w\s]")
_WHITESPACE = re.compile(r"\s+")


def near_dup_text(record: dict, fields: list[str], strip_punctuation: bool) -> str:
    text = "\n".join(record[name] for name in fields).lower()
    if strip_punctuation:
        # "REVERSE  abc." and "reverse: abc?" are the same request; without this, char shingles on
        # such short rows share too few n-grams to reach any useful threshold.
        text = _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", text)).strip()
    return text


def shingles(text: str, size: int, unit: str) -> set[str]:
    """Character or word n-grams; a text shorter than one n-gram is its own single shingle."""
    if unit == "word":
        words = text.split()
        if len(words) <= size:
            return {" ".join(words)}
        return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}
    if len(text) <= size:
        return {text}
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def near_duplicate_clusters(texts: list[str], config: NearDupConfig) -> tuple[list[list[int]], int]:
    """Clusters (lists of indices, first = kept) of size >= 2, and the number of LSH candidate pairs.

    Each row queries the index of the rows before it, then joins it; a candidate counts only if
    the exact Jaccard of the shingle sets reaches the threshold (MinHash only estimates it).
    """
    from datasketch import MinHash, MinHashLSH

    sets = [shingles(text, config.shingle_size, config.shingle_unit) if text else set() for text in texts]
    sketches = MinHash.generator(([s.encode() for s in shingle_set] for shingle_set in sets), num_perm=config.num_perm)
    index = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    candidates = 0
    for i, sketch in enumerate(sketches):
        if not sets[i]:
            continue  # nothing left to compare (e.g. only punctuation); exact dedup covered it
        for j in index.query(sketch):
            candidates += 1
            jaccard = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if jaccard >= config.threshold:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the earlier row stays the root: "keep the first"
        index.insert(i, sketch)
    members: dict[int, list[int]] = {}
    for i in range(len(texts)):
        members.setdefault(root(i), []).append(i)
    return [cluster for cluster in members.values() if len(cluster) > 1], candidates


def dedup_near(
    rows: list[Row], fields: list[str], config: NearDupConfig, removals: Removals
) -> tuple[list[Row], list[dict], int]:
    """Rows kept, the clusters found (for near_dup_clusters.jsonl) and the LSH candidate-pair count."""
    texts = [near_dup_text(row.record, fields, config.strip_punctuation) for row in rows]
    clusters, candidates = near_duplicate_clusters(texts, config)
    dropped: set[int] = set()
    described = []
    for cluster in clusters:
        first = rows[cluster[0]]
        for i in cluster[1:]:
            dropped.add(i)
            removals.add("near_dup", rows[i], duplicate_of=first.origin())
        removed = [{**rows[i].origin(), "record": rows[i].record} for i in cluster[1:]]
        described.append({"role": first.role, "kept": {**first.origin(), "record": first.record}, "removed": removed})
    return [row for i, row in enumerate(rows) if i not in dropped], described, candidates
