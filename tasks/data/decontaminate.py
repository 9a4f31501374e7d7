r"""Step 6: drop training rows that overlap the run's own benchmarks, counted per benchmark.

    index = BenchmarkIndex.load(benchmarks_folder, ngram=13, min_words=8)
    hits = index.matches(row.record, "instruction")                 # ["gsm8k"] or []
    per_row = index.matches_batch(records, "instruction")           # the same, for a batch

A row is contaminated by a benchmark item when

  * its normalised prompt equals the item's normalised prompt (any length), or
  * any of its text fields (prompt, response, chosen, …) contains a word n-gram of the item's
    prompt: n = `ngram` (13, as in GPT-3 and later reports) for prompts of at least 13 words; a
    prompt of `min_words` to 12 words must appear whole (n = its length); a prompt shorter than
    `min_words` matches only exactly — "reverse abcde" inside a longer training prompt is not
    evidence of a leak, while 8 consecutive words of a maths problem are.

Words are compared lower-cased with punctuation removed, so "Natalia sold 48 clips." and
"natalia sold 48 clips" overlap. Lookup is a hash-set probe per word window of the shortest n in
use (the probe), confirmed with the item's own n.

A batch is screened first without a Python string per row: each field's words come from the
near-dedup key (keytext.near_dup_keys: lower-cased, every non-word character a space, which
splits into exactly the words `\w+` finds), every probe window is hashed in numpy
(dedup.shingle_hashes) and looked up among the benchmark windows' hashes. Equal windows hash
equally, so the screen never misses a row; a hash collision only sends a clean row to the exact
check. On Alpaca + hh-rlhf, a few hundred of 54k rows reach it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from posttrain.jsonl import iter_jsonl
from tasks.data.clean import normalize_text
from tasks.data.dedup import shingle_hashes
from tasks.data.keytext import near_dup_keys
from tasks.data.records import ROLE_FIELDS

_WORD = re.compile(r"\w+")
_SCREEN_BITS = 20


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BenchmarkIndex:
    def __init__(self, items: dict[str, list[str]], ngram: int, min_words: int):
        """`items`: {benchmark name: prompts}."""
        self.ngram, self.min_words = ngram, min_words
        self.exact: dict[str, set[str]] = {}  # normalised prompt -> benchmark names
        self.required: list[tuple[str, int, tuple[str, ...]]] = []  # (name, n, the item's words)
        for name, prompts in items.items():
            for prompt in prompts:
                self.exact.setdefault(normalize_text(prompt), set()).add(name)
                item_words = tuple(words(prompt))
                if len(item_words) >= min_words:
                    self.required.append((name, min(ngram, len(item_words)), item_words))
        # Probe with the shortest n in use: every required n-gram starts with such a window.
        self.probe = min((n for _, n, _ in self.required), default=0)
        self.by_window: dict[tuple[str, ...], list[int]] = {}
        for position, (_, n, item_words) in enumerate(self.required):
            for start in range(len(item_words) - n + 1):
                self.by_window.setdefault(item_words[start : start + self.probe], []).append(position)
        self.names = sorted(items)
        self.window_hashes = np.unique(self._window_hashes([{"text": " ".join(item_words)} for _, _, item_words in self.required], "text")[0])
        # A 1 MB table over the hashes' top bits turns most windows away with one lookup each;
        # the rest (~2 % at 20k benchmark windows) are confirmed by a binary search.
        self._screen = np.zeros(1 << _SCREEN_BITS, dtype=bool)
        self._screen[self.window_hashes >> np.uint32(32 - _SCREEN_BITS)] = True

    @classmethod
    def load(cls, folder: Path, ngram: int, min_words: int) -> BenchmarkIndex:
        """Prompts of <folder>/<name>.jsonl (items {"id", "skill", "prompt", "answer"})."""
        items = {}
        for path in sorted(Path(folder).glob("*.jsonl")):
            prompts = []
            for row_number, item in enumerate(iter_jsonl(path), start=1):
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{path} row {row_number}: benchmark items need a string 'prompt'")
                prompts.append(item["prompt"])
            items[path.stem] = prompts
        if not items:
            raise ValueError(f"{folder}: no <benchmark>.jsonl files to decontaminate against")
        return cls(items, ngram, min_words)

    def _ngram_hits(self, text: str) -> set[str]:
        text_words = words(text)
        windows = zip(*(text_words[offset:] for offset in range(self.probe)))
        if self.by_window.keys().isdisjoint(windows):  # the common case, decided in C
            return set()
        hits, found = set(), set()
        for start in range(len(text_words) - self.probe + 1):
            for position in self.by_window.get(tuple(text_words[start : start + self.probe]), ()):
                name, n, item_words = self.required[position]
                if position in found or start + n > len(text_words):
                    continue
                candidate = text_words[start : start + n]
                if any(list(item_words[i : i + n]) == candidate for i in range(len(item_words) - n + 1)):
                    hits.add(name)
                    found.add(position)
        return hits

    def _window_hashes(self, records: list[dict], field: str) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every probe-word window of each record's `field`, flat, and the count per record."""
        keys = near_dup_keys(records, [field], strip_punctuation=True, collapse=False)
        return shingle_hashes(keys, max(self.probe, 1), "word")

    def matches(self, record: dict, role: str) -> list[str]:
        """Benchmark names the record overlaps (sorted); [] when clean."""
        hits = set(self.exact.get(record["prompt"], ()))
        if self.required:
            for key in ROLE_FIELDS[role]:
                hits |= self._ngram_hits(record[key])
        return sorted(hits)

    def matches_batch(self, records: list[dict], role: str) -> list[list[str]]:
        """`matches` of each record of one role; only rows the window screen flags are checked word by word."""
        flagged = np.zeros(len(records), dtype=bool)
        if self.required and records and len(self.window_hashes):
            for key in ROLE_FIELDS[role]:
                hashes, counts = self._window_hashes(records, key)
                maybe = np.flatnonzero(self._screen[hashes >> np.uint32(32 - _SCREEN_BITS)])
                at = np.minimum(np.searchsorted(self.window_hashes, hashes[maybe]), len(self.window_hashes) - 1)
                found = maybe[self.window_hashes[at] == hashes[maybe]]
                flagged[np.searchsorted(np.cumsum(counts), found, side="right")] = True
        exact = self.exact
        return [self.matches(record, role) if screened else sorted(exact.get(record["prompt"], ())) for record, screened in zip(records, flagged.tolist())]
