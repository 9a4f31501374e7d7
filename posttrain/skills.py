"""Verifiable toy skills: the demo's training data and its held-out benchmark.

Each skill maps random operands to a prompt and one exact answer ("reverse abcde" -> "edcba"), so a
tiny model's progress can be scored by exact match. `generate_rows` also plants the noise a real
corpus has (exact and near duplicates, empty and over-long rows) so that cleaning and dedup in the
data stage have real work; the planted counts are returned so tests can check recall.

    rows, planted = generate_rows("instruction", rows=1000, seed=0)
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))


def _copy(rng):
    word = _word(rng)
    return f"copy {word}", word


def _reverse(rng):
    word = _word(rng)
    return f"reverse {word}", word[::-1]


def _sort(rng):
    word = _word(rng)
    return f"sort {word}", "".join(sorted(word))


def _upper(rng):
    word = _word(rng)
    return f"upper {word}", word.upper()


def _max(rng):
    # Draw the answer first so every digit 1-9 is equally likely as the answer (balanced labels).
    top = rng.randint(1, 9)
    digits = [rng.randint(0, top) for _ in range(rng.randint(3, 5))]
    digits[rng.randrange(len(digits))] = top
    return "max " + " ".join(map(str, digits)), str(top)


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add {a} {b}", str(a + b)


SKILLS = {"copy": _copy, "reverse": _reverse, "sort": _sort, "upper": _upper, "max": _max, "add": _add}


def wrong_answer(skill: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible but wrong answer: what a half-trained model gets wrong (for preference pairs)."""
    if skill in ("max", "add"):
        candidate = str(int(answer) + rng.choice([-2, -1, 1, 2]))
        return candidate if candidate != answer and not candidate.startswith("-") else str(int(answer) + 3)
    operand = prompt.split(" ", 1)[1]
    if skill == "reverse" and operand != answer:
        return operand  # forgot to reverse
    chars = list(answer)
    position = rng.randrange(len(chars))
    pool = LETTERS.upper() if answer.isupper() else LETTERS
    chars[position] = rng.choice([c for c in pool if c != chars[position]])
    return "".join(chars)


def skill_names(selected: list[str] | None) -> list[str]:
    names = list(SKILLS) if selected is None else selected
    unknown = [name for name in names if name not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown}; available: {', '.join(SKILLS)}")
    return names


def sample(skill: str, rng: random.Random) -> tuple[str, str]:
    return SKILLS[skill](rng)


@dataclass
class Planted:
    """How much noise the generator planted, by rule (for recall tests and sanity checks)."""

    exact_duplicates: int = 0
    near_duplicates: int = 0
    empty: int = 0
    overlong: int = 0


def _near_variant(prompt: str, rng: random.Random) -> str:
    """Spacing/case/punctuation variant of a prompt: what scraping and templating leave behind."""
    verb, operand = prompt.split(" ", 1)
    styles = [
        lambda: f"{verb.capitalize()} {operand}!",
        lambda: f"{verb.upper()}  {operand}.",
        lambda: f"{verb}: {operand}?",
    ]
    return rng.choice(styles)()


def _clean_row(role: str, skill: str, rng: random.Random) -> dict:
    prompt, answer = sample(skill, rng)
    if role == "instruction":
        return {"prompt": prompt, "response": answer, "skill": skill}
    if role == "preference":
        return {"prompt": prompt, "chosen": answer, "rejected": wrong_answer(skill, prompt, answer, rng), "skill": skill}
    return {"prompt": prompt, "answer": answer, "skill": skill}


def _response_field(role: str) -> str:
    return {"instruction": "response", "preference": "chosen", "prompt": "answer"}[role]


def generate_rows(
    role: str,
    rows: int,
    seed: int = 0,
    skills: list[str] | None = None,
    exact_duplicates: float = 0.0,
    near_duplicates: float = 0.0,
    empty: float = 0.0,
    overlong: float = 0.0,
) -> tuple[list[dict], Planted]:
    """`rows` rows of `role` records, of which the given fractions are planted noise."""
    rng = random.Random(seed)
    names = skill_names(skills)
    planted = Planted(
        exact_duplicates=int(rows * exact_duplicates),
        near_duplicates=int(rows * near_duplicates),
        empty=int(rows * empty),
        overlong=int(rows * overlong),
    )
    clean_count = rows - planted.exact_duplicates - planted.near_duplicates - planted.empty - planted.overlong
    # Round-robin over skills keeps them balanced.
    records = [_clean_row(role, names[i % len(names)], rng) for i in range(clean_count)]
    answer_field = _response_field(role)
    noise: list[dict] = []
    for _ in range(planted.exact_duplicates):
        noise.append(dict(rng.choice(records)))
    for _ in range(planted.near_duplicates):
        original = rng.choice(records)
        noise.append({**original, "prompt": _near_variant(original["prompt"], rng)})
    for _ in range(planted.empty):
        noise.append({**rng.choice(records), answer_field: ""})
    for _ in range(planted.overlong):
        long_word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(300, 400)))
        noise.append({**_clean_row(role, "copy", rng), "prompt": f"copy {long_word}", answer_field: long_word})
    for row in noise:
        records.insert(rng.randrange(len(records) + 1), row)
    return records, planted
