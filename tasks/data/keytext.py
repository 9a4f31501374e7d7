"""The near-dedup key of a row: its dedup fields, lower-cased, punctuation made spaces, whitespace collapsed.

    near_dup_text(record, fields, strip_punctuation) -> str        the definition, one row at a time
    near_dup_keys(records, fields, strip_punctuation) -> KeyCodes  the same for a batch, as code points

`near_dup_keys` is what the near-dup index eats: every row's normalised code points in one numpy
array, built with one `str.join`, one encode and one table lookup for the whole batch. Shingling
then hashes straight from that array, so no per-row Python string is made on the fast path
(bench/dedup.py: the key text used to cost as much as the whole MinHash-LSH). Rows the tables
cannot normalise exactly (a few Unicode letters whose lower case depends on context or is two
characters, and characters outside the Basic Multilingual Plane) go through `near_dup_text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from itertools import chain

import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]")
_WHITESPACE = re.compile(r"\s+")
_SPACE = 0x20
_CHUNK_ROWS = 8192


def near_dup_text(record: dict, fields: list[str], strip_punctuation: bool) -> str:
    text = "\n".join(record[name] for name in fields).lower()
    if strip_punctuation:
        # "REVERSE  abc." and "reverse: abc?" are the same request; without this, char shingles on
        # such short rows share too few n-grams to reach any useful threshold.
        text = _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", text)).strip()
    return text


@dataclass
class KeyCodes:
    """A batch of key texts as one array: row i's code points, then one space, then row i+1's...

    `codes` is uint8 when every row is ASCII, else uint16 (UTF-16 code units) when every
    character lies below U+10000, else uint32. `spaces_normalised`: every whitespace
    character is U+0020 (true after punctuation stripping), so a word is a run of codes != 0x20.
    `collapsed`: rows are stripped and their space runs are single spaces, i.e. `texts()` equals
    `near_dup_text` row for row. Word shingles don't need that, so near_dup_keys can skip it."""

    codes: np.ndarray
    lengths: np.ndarray  # int64, code points per row, without the separating space
    spaces_normalised: bool
    collapsed: bool = True

    @classmethod
    def from_texts(cls, texts: list[str], spaces_normalised: bool = False) -> KeyCodes:
        joined = " ".join(chain(texts, ("",)))
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        if joined.isascii():
            return cls(np.frombuffer(joined.encode("ascii"), dtype=np.uint8), lengths, spaces_normalised)
        return cls(np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32), lengths, spaces_normalised)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths + 1) - (self.lengths + 1)

    def __getitem__(self, rows: slice) -> KeyCodes:
        lo, hi, _ = rows.indices(len(self.lengths))
        starts = self.starts
        begin = int(starts[lo]) if lo < len(starts) else len(self.codes)
        end = int(starts[hi - 1] + self.lengths[hi - 1] + 1) if hi > lo else begin
        return KeyCodes(self.codes[begin:end], self.lengths[lo:hi], self.spaces_normalised, self.collapsed)

    def texts(self) -> list[str]:
        if len(self.lengths) == 0:
            return []
        body = self.codes[:-1].tobytes()  # drop the last row's separator
        encoding = {np.dtype(np.uint8): "ascii", np.dtype(np.uint16): "utf-16-le", np.dtype(np.uint32): "utf-32-le"}[self.codes.dtype]
        text = body.decode(encoding, "surrogatepass")
        out, at = [], 0  # cut by length: rows may hold spaces themselves
        for n in self.lengths.tolist():
            out.append(text[at : at + n])
            at += n + 1
        return out


def _joined_fields(records: list[dict], fields: list[str]) -> list[str]:
    if len(fields) == 1:
        return [record[fields[0]] for record in records]
    return ["\n".join([record[name] for name in fields]) for record in records]


def near_dup_texts(records: list[dict], fields: list[str], strip_punctuation: bool) -> list[str]:
    """`near_dup_text` for a batch, equal row for row (through `near_dup_keys`)."""
    if not strip_punctuation:
        return [text.lower() for text in _joined_fields(records, fields)]
    return near_dup_keys(records, fields, True).texts()


def near_dup_keys(records: list[dict], fields: list[str], strip_punctuation: bool, collapse: bool = True) -> KeyCodes:
    """The rows' near-dedup keys as code points; `collapse=False` leaves runs of spaces (word shingles
    don't see them, and it saves a pass)."""
    if len(records) > _CHUNK_ROWS:  # a few MB at a time stay in the cache: 2x faster on 52k Alpaca rows
        parts = [near_dup_keys(records[lo : lo + _CHUNK_ROWS], fields, strip_punctuation, collapse) for lo in range(0, len(records), _CHUNK_ROWS)]
        codes = np.concatenate([part.codes for part in parts])  # the widest dtype of the parts
        return KeyCodes(codes, np.concatenate([part.lengths for part in parts]), parts[0].spaces_normalised, parts[0].collapsed)
    texts = _joined_fields(records, fields)
    if not strip_punctuation:
        return KeyCodes.from_texts([text.lower() for text in texts], spaces_normalised=False)
    joined = " ".join(chain(texts, ("",)))  # each row followed by one space
    if joined.isascii():
        codes = np.frombuffer(joined.encode("ascii").translate(_ascii_table()), dtype=np.uint8)
        keys = KeyCodes(codes, np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), spaces_normalised=True, collapsed=False)
    else:
        keys = _unicode_keys(texts)  # joins again, without the rows it must normalise one by one
    return collapse_spaces(keys) if collapse else keys


@cache
def _bmp_table() -> np.ndarray:
    r"""Per code point below U+10000: what near_dup_text makes of it (itself lower-cased if a \w
    character, else a space), as uint16. Only right where the character is not in _slow_characters."""
    table = np.full(0x10000, _SPACE, dtype=np.uint16)
    word = re.compile(r"\w")
    for code in range(0x10000):
        lower = chr(code).lower()
        if len(lower) == 1 and word.fullmatch(lower):
            table[code] = ord(lower)
    return table


@cache
def _slow_characters() -> re.Pattern:
    """Characters the table cannot normalise; a row holding one goes through near_dup_text. They are:
    - characters beyond U+FFFF (they would take two UTF-16 code units) and lone surrogates;
    - characters whose lower case is more than one character (U+0130 'İ' becomes 'i' + a combining dot);
    - U+03A3 'Σ', whose lower case depends on the next letter (final sigma)."""
    multi = "".join(chr(code) for code in range(0x10000) if not 0xD800 <= code <= 0xDFFF and len(chr(code).lower()) != 1)
    return re.compile("[\U00010000-\U0010ffff\ud800-\udfff\u03a3" + re.escape(multi) + "]")


@cache
def _ascii_table() -> bytes:
    return bytes(_bmp_table()[:128].astype(np.uint8).tolist()) + b" " * 128


def _unicode_keys(texts: list[str]) -> KeyCodes:
    r"""Keys of a batch with non-ASCII rows: UTF-16 code units through the table (UTF-16 encodes in a
    third of UTF-32's time and a uint16 table fits in L2). Rows holding a character the table
    cannot normalise are replaced by near_dup_text, whose output is only \w characters and spaces,
    which the table maps to themselves (test_keytext checks every code point). If such a row keeps
    a character beyond U+FFFF (a letter: symbols became spaces), the batch is encoded as UTF-32, so
    that every character is one code, as char shingles need."""
    slow, wide = _slow_characters(), False
    texts = list(texts)
    for row, text in enumerate(texts):
        if not text.isascii() and slow.search(text):
            texts[row] = near_dup_text({"t": text}, ["t"], True)
            wide = wide or any(char > "\uffff" for char in texts[row])
    table = _bmp_table()
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    joined = " ".join(chain(texts, ("",)))
    if not wide:
        return KeyCodes(np.take(table, np.frombuffer(joined.encode("utf-16-le"), dtype=np.uint16)), lengths, True, collapsed=False)
    codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    return KeyCodes(np.where(codes > 0xFFFF, codes, table[np.minimum(codes, 0xFFFF)]), lengths, True, collapsed=False)


def collapse_spaces(keys: KeyCodes) -> KeyCodes:
    """Strip each row and make each run of spaces one space, for all rows at once."""
    codes, lengths = keys.codes.copy(), keys.lengths
    if len(codes) == 0:
        return KeyCodes(codes, lengths, keys.spaces_normalised, collapsed=True)
    separators = np.cumsum(lengths + 1) - 1
    codes[separators] = 1  # a row boundary; the normalised rows hold no code 1 (it became a space)
    is_space = codes == _SPACE
    # A space survives if it starts a run that lies between two characters of its row (not 1).
    run_start = np.flatnonzero(is_space & np.concatenate(([True], ~is_space[:-1])))
    run_end = np.flatnonzero(is_space & np.concatenate((~is_space[1:], [True]))) + 1
    inside = (codes[np.maximum(run_start - 1, 0)] != 1) & (run_start > 0) & (codes[np.minimum(run_end, len(codes) - 1)] != 1)
    keep = ~is_space
    keep[run_start[inside]] = True
    kept_before = np.cumsum(keep)  # kept codes up to and including each position
    new_separators = kept_before[separators] - 1
    out = codes[keep]
    out[new_separators] = _SPACE
    new_lengths = np.diff(np.concatenate(([-1], new_separators))) - 1
    return KeyCodes(out, new_lengths, keys.spaces_normalised, collapsed=True)
