"""The vectorised near-dedup key (tasks/data/keytext.py) is the per-row definition, character for character."""

from __future__ import annotations

import random

import numpy as np
import pytest

from posttrain.config import NearDupConfig
from tasks.data import keytext
from tasks.data.dedup import NearDupIndex, shingle_hashes
from tasks.data.keytext import _bmp_table, _slow_characters, near_dup_keys, near_dup_text, near_dup_texts

# Letters whose lower case depends on context or is two characters, a letter and an emoji beyond
# U+FFFF, a lone surrogate, the C0 controls \x01 and \x1c (whitespace to `re`), and ordinary text.
ALPHABET = list("Ab,. ;!?\t\n_-x9") + ["\x01", "\x1c", "\x7f", "é", "’", "—", "\u00a0", "\u3000", "Ⅸ", "Σ", "İ", "ß", "\U0001d400", "\U0001f600", "\ud800", "ǅ"]


def random_records(seed: int, count: int, alphabet: list[str]) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))), "response": rng.choice(["Ok.", "", "a\x01b", "ΟΔΟΣ σ"])} for _ in range(count)]


def test_the_table_is_near_dup_text_for_every_character_it_covers():
    table, slow = _bmp_table(), _slow_characters()
    for code in range(0x10000):
        char = chr(code)
        expected = near_dup_text({"t": f"a{char}b"}, ["t"], True)  # between letters: a space stays visible
        if slow.search(char):
            # What near_dup_text makes of a slow character, the table leaves alone: a slow row's
            # replacement text goes through the table once more.
            assert all(ord(out) > 0xFFFF or table[ord(out)] == ord(out) or out == " " for out in expected), hex(code)
        else:
            mapped = chr(table[code])
            assert expected == ("a b" if mapped == " " else f"a{mapped}b"), hex(code)
            if mapped != " ":
                assert table[ord(mapped)] == ord(mapped), hex(code)  # idempotent


@pytest.mark.parametrize("alphabet", [ALPHABET, list("Ab,. ;!?\t\n_-x9\x01"), list("Ab cé, Ⅸ")], ids=["unicode", "ascii", "bmp"])
def test_near_dup_keys_equal_near_dup_text_row_for_row(alphabet, monkeypatch):
    monkeypatch.setattr(keytext, "_CHUNK_ROWS", 700)  # big batches are keyed in chunks, of mixed widths here
    records = random_records(0, 3000, alphabet)
    for fields in (["prompt"], ["prompt", "response"]):
        expected = [near_dup_text(r, fields, True) for r in records]
        assert near_dup_texts(records, fields, True) == expected
        keys = near_dup_keys(records, fields, True)
        assert keys.texts() == expected
        assert keys[1000:2000].texts() == expected[1000:2000]
        assert near_dup_texts(records, fields, False) == [near_dup_text(r, fields, False) for r in records]


def test_uncollapsed_keys_give_the_same_shingles_and_answers():
    records = random_records(1, 2000, list("ab cd ef, gh! ij   ") + ["é", "Σ"])
    collapsed, loose = near_dup_keys(records, ["prompt"], True), near_dup_keys(records, ["prompt"], True, collapse=False)
    assert len(loose.codes) >= len(collapsed.codes)
    for size in (1, 3):
        a_hashes, a_counts = shingle_hashes(collapsed, size, "word")
        b_hashes, b_counts = shingle_hashes(loose, size, "word")
        assert np.array_equal(a_counts, b_counts) and np.array_equal(a_hashes, b_hashes)
    for unit in ("word", "char"):  # the index collapses loose keys itself for char shingles
        config = NearDupConfig(threshold=0.5, shingle_size=3, shingle_unit=unit)
        ids = list(range(len(records)))
        answers = [NearDupIndex(config).add_batch(keys, ids) for keys in (collapsed, loose, collapsed.texts())]
        assert answers[0] == answers[1] == answers[2]
        assert sum(a is not None for a in answers[0]) > 50
