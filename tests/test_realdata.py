"""The data stage on real corpora (configs/alpaca-hh.yaml): its counts per rule against counts
computed here, independently, from the raw files.

Reads ../shared/realdata in place (Stanford Alpaca 52k, hh-rlhf helpful-base test); skipped where
that folder is absent. Two stage runs (~20 s each: the character tokenizer over 20M characters is
most of it): the config as shipped (dedup key = the response) and whole-row dedup.

The independent side re-implements the documented rules with plain Python (no stage code): NFKC +
control characters + space runs for normalisation, the base tokenizer's one token per character
for lengths, whitespace-collapsed text for exact keys, its own word shingles for near-duplicates.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.jsonl import read_jsonl
from tasks import data

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
ALPACA = REALDATA / "alpaca" / "alpaca_data.json.gz"
HH = REALDATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"

pytestmark = pytest.mark.skipif(
    not (ALPACA.is_file() and HH.is_file()), reason=f"realdata corpora not found at {REALDATA} (only present on the shared machine)"
)

README_PLACEHOLDERS = {"No input", "Noinput", "noinput", "No Input", "N/A", "NoInput", "None", "none", "no input"}
PRINTABLE = {chr(code) for code in range(32, 127)} | {"\n"}  # the tiny base's character vocabulary


def normalise(text: str) -> str:
    """The data stage's rule, restated: one line is collapsed and stripped; in several lines an
    indented line (two spaces or a tab) or a line inside a ``` fence keeps its spacing, other lines
    are collapsed, every line is right-stripped, and blank lines at the ends go."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) <= 1:
        return re.sub(r"[ \t]+", " ", "".join(lines)).strip()
    fenced, out = False, []
    for line in lines:
        if line.lstrip(" \t").startswith(("```", "~~~")):
            fenced = not fenced
            out.append(line)
        elif fenced or line.startswith(("  ", "\t")) or re.match(r" *\t", line):
            out.append(line)
        else:
            out.append(re.sub(r"[ \t]+", " ", line))
    if not (out[0].startswith(("  ", "\t")) or re.match(r" *\t", out[0])):
        out[0] = out[0].lstrip()
    return "\n".join(out)


def char_tokens(prompt: str, completion: str) -> int:
    # One token per character (newlines included), + EOS.
    return len(f"Q: {prompt}\nA:") + len(f" {completion}") + 1


def chat_tokens(turns: list[tuple[str, str]], reply: str) -> int:
    """A conversation as the demo template renders it: "Q: …\n" per user turn, "A: …</s>" per
    assistant turn (</s> is one token), then "A:" and " reply</s>"."""
    return sum(len(text) + 4 for _, text in turns) + char_tokens("", reply) - len("Q: \n")


def collapsed(text: str) -> str:
    return " ".join(text.split())


def shingles(text: str) -> set[tuple[str, ...]]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(words[i : i + 5]) for i in range(max(1, len(words) - 4))}


def hh_split(chosen: str, rejected: str) -> tuple[str, str, str, list] | None:
    """The shared text up to its last Assistant marker, then the two replies, and the prompt's
    turns (None: no shared prompt)."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind("\n\nAssistant:")
    if cut < 0:
        return None
    replies = chosen[cut + 12 :], rejected[cut + 12 :]
    if any("\n\nHuman:" in reply for reply in replies):
        return None
    turns = re.split(r"\n\n(Human|Assistant):", chosen[:cut])[1:]
    pairs = [("User" if label == "Human" else "Assistant", text.strip()) for label, text in zip(turns[::2], turns[1::2])]
    prompt = pairs[0][1] if len(pairs) == 1 else "\n\n".join(f"{label}: {text}" for label, text in pairs)
    return prompt, replies[0].strip(), replies[1].strip(), pairs


@pytest.fixture(scope="module")
def independent():
    """Counts per rule for the shipped config, computed from the raw files."""
    config = load_config(REPO / "configs" / "alpaca-hh.yaml").data
    limit = config.max_tokens
    with gzip.open(ALPACA) as handle:
        alpaca = json.load(handle)
    counts = Counter()
    counts["readme_placeholders"] = sum(row["input"] in README_PLACEHOLDERS for row in alpaca)
    seen_outputs, survivors = set(), []
    for row in alpaca:
        given = normalise(row["input"])
        placeholder = bool(given) and re.sub(r"[\s<>]", "", given.lower()).removesuffix(".") in {"noinput", "n/a", "na", "none"}
        counts["placeholder_input"] += placeholder
        prompt = normalise(row["instruction"] + ("" if not given or placeholder else "\n\n" + given))
        output = normalise(row["output"])
        if not prompt or not output:
            counts["empty"] += 1
        elif char_tokens(prompt, output) > limit:
            counts["overlong"] += 1
        elif collapsed(output) in seen_outputs:
            counts["exact_dup"] += 1
        else:
            seen_outputs.add(collapsed(output))
            survivors.append((prompt, output))
    with gzip.open(HH, "rt") as handle:
        hh = [json.loads(line) for line in handle]
    counts["hh_chosen_equals_rejected"] = sum(pair["chosen"] == pair["rejected"] for pair in hh)
    seen_chosen = set()
    for pair in hh:
        split = hh_split(pair["chosen"], pair["rejected"])
        if split is None:
            counts["prompt_mismatch"] += 1
            continue
        prompt, chosen, rejected = (normalise(text) for text in split[:3])
        turns = [(label, normalise(text)) for label, text in split[3]]
        as_ids = lambda text: "".join(char if char in PRINTABLE else "\0" for char in text)  # noqa: E731  <unk>
        if not prompt or not chosen or not rejected:
            counts["empty"] += 1
        elif chosen == rejected or as_ids(chosen) == as_ids(rejected):
            counts["same_pair"] += 1
        elif chat_tokens(turns, max(chosen, rejected, key=len)) > limit:  # a multi-turn prompt is rendered turn by turn
            counts["overlong"] += 1
        elif collapsed(chosen) in seen_chosen:
            counts["exact_dup"] += 1
        else:
            seen_chosen.add(collapsed(chosen))
    return {"counts": counts, "alpaca": alpaca, "alpaca_survivors": survivors, "rows_in": len(alpaca) + len(hh)}


def run_stage(tmp_path_factory, tiny_base, tiny_benchmarks, **overrides):
    config = load_config(REPO / "configs" / "alpaca-hh.yaml").data.model_copy(update=overrides)
    out_dir = tmp_path_factory.mktemp("realdata")
    cwd = Path.cwd()
    os.chdir(REPO)  # the config's paths are relative to the repository root, as for the CLI
    try:
        artifact = data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, out_dir)
    finally:
        os.chdir(cwd)
    return artifact, out_dir


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_base, tiny_benchmarks):
    return run_stage(tmp_path_factory, tiny_base, tiny_benchmarks)


@pytest.fixture(scope="module")
def whole_row(tmp_path_factory, tiny_base, tiny_benchmarks):
    return run_stage(tmp_path_factory, tiny_base, tiny_benchmarks, dedup_key=["prompt", "response"], contract_suites=False)


def test_counts_per_rule_agree_with_independent_counts(shipped, independent):
    artifact, _ = shipped
    metrics, expected = artifact.metrics, independent["counts"]
    assert metrics["rows_in"] == independent["rows_in"] == 52_002 + 2_354
    for rule in ("empty", "same_pair", "overlong", "exact_dup", "prompt_mismatch"):
        assert metrics[f"removed_{rule}"] == expected[rule], rule
    assert metrics["normalised_placeholder_input"] == expected["placeholder_input"]
    # The figures the corpora's README states, and how the stage's counts relate to them:
    assert expected["empty"] == 28 + 4  # 28 empty Alpaca outputs; 4 hh replies empty once stripped
    assert expected["readme_placeholders"] == 402 and expected["placeholder_input"] == 593  # + "<noinput>", "No input." …
    assert expected["hh_chosen_equals_rejected"] == 2 and expected["same_pair"] >= 2
    assert metrics["removed_no_final_reply"] == metrics["removed_decontaminated"] == 0
    assert metrics["rows_in"] == metrics["rows_out"] + sum(value for key, value in metrics.items() if key.startswith("removed_"))


def test_exact_repeats_of_outputs_match_the_readme(independent):
    # README: 1,172 rows repeat an earlier output (whitespace collapsed), the 28 empty outputs
    # among them (27 repeats). Without the filters in front that is what our key finds.
    seen, repeats = set(), 0
    for row in independent["alpaca"]:
        key = collapsed(normalise(row["output"]))
        repeats += key in seen
        seen.add(key)
    assert repeats == 1_172


def test_near_duplicate_outputs(shipped, independent):
    artifact, out_dir = shipped
    metrics = artifact.metrics
    # ≈1.5k rows of Alpaca repeat an earlier output at Jaccard >= 0.8 (exact repeats included).
    assert 1_350 <= metrics["removed_exact_dup"] + metrics["removed_near_dup"] <= 1_650
    assert 200 <= metrics["removed_near_dup"] <= 450
    # Precision, with our own shingles: each removed row is >= 0.8 similar to an earlier member of its cluster.
    raw = {("alpaca", i + 1): row for i, row in enumerate(independent["alpaca"])}
    text = lambda origin: normalise(raw[("alpaca", origin["source_row"])]["output"])  # noqa: E731
    clusters = [c for c in read_jsonl(out_dir / "near_dup_clusters.jsonl") if c["role"] == "instruction"]
    assert len(clusters) == metrics["near_dup_clusters"] - sum(1 for c in read_jsonl(out_dir / "near_dup_clusters.jsonl") if c["role"] != "instruction")
    below = 0
    for cluster in clusters:
        members = [cluster["kept"], *cluster["removed"]]
        for position, member in enumerate(members[1:], start=1):
            mine = shingles(text(member))
            best = max(len(mine & shingles(text(other))) / len(mine | shingles(text(other))) for other in members[:position])
            below += best < 0.8
    assert below <= 0.01 * metrics["removed_near_dup"]  # 32-bit shingle hashes may round a few across 0.8
    rejected = [entry for entry in read_jsonl(out_dir / "rejected.jsonl") if entry["rule"] == "near_dup"]
    assert len(rejected) == metrics["removed_near_dup"]
    assert all(entry["duplicate_of"]["source_row"] < entry["source_row"] for entry in rejected if "alpaca" in entry["source"])


def test_instructions_have_almost_no_near_duplicates(independent):
    # Alpaca's authors filtered similar instructions: on the prompt alone, nearly nothing.
    from posttrain.config import NearDupConfig
    from tasks.data.dedup import NearDupIndex
    from tasks.data.keytext import near_dup_texts

    index = NearDupIndex(NearDupConfig(threshold=0.8, shingle_size=5, shingle_unit="word"))
    records = [{"prompt": prompt} for prompt, _ in independent["alpaca_survivors"]]
    found = index.add_batch(near_dup_texts(records, ["prompt"], True), list(range(len(records))))
    assert sum(first is not None for first in found) <= 10


def test_manifest_says_which_key_and_whole_row_dedup_finds_almost_nothing(shipped, whole_row):
    shipped_artifact, out_dir = shipped
    assert shipped_artifact.manifest["dedup_key"] == ["response"]
    assert shipped_artifact.manifest["dedup_fields"] == {"instruction": ["response"], "preference": ["chosen"]}
    whole_artifact, _ = whole_row
    assert whole_artifact.manifest["dedup_key"] == ["prompt", "response"]
    assert whole_artifact.manifest["dedup_fields"] == {"instruction": ["prompt", "response"], "preference": ["prompt", "chosen"]}
    # README: 0 exact duplicate rows; FIELD_NOTES: ~2 near-duplicate clusters on the whole text.
    assert whole_artifact.metrics["removed_exact_dup"] == 0
    assert whole_artifact.metrics["removed_near_dup"] <= 10
    assert whole_artifact.metrics["rows_out"] > shipped_artifact.metrics["rows_out"]
    # The shipped run's critical contracts passed (it returned) and its Data Docs are there.
    assert all(summary["passed"] == summary["evaluated"] for summary in shipped_artifact.manifest["contracts"].values())
    assert (out_dir / "data_docs" / "index.html").is_file()
    counts = Counter(entry["rule"] for entry in read_jsonl(out_dir / "rejected.jsonl"))
    assert all(counts[rule] == shipped_artifact.metrics[f"removed_{rule}"] for rule in data.RULES)


def test_tokenized_contracts_as_sft_and_reward_run_them(shipped, tiny_base, tmp_path):
    """The consuming stages' tokenized contracts at the config's max_length (1024) on the real
    output: critical expectations pass; the only warning is a handful of rows that are almost all
    prompt or almost all answer."""
    from data_contracts import check_instruction_rows, check_preference_rows
    from posttrain.formatting import ChatFormat
    from posttrain.models import load_tokenizer

    _, out_dir = shipped
    chat = ChatFormat(load_tokenizer(tiny_base.path))
    config = load_config(REPO / "configs" / "alpaca-hh.yaml")
    splits = {split: read_jsonl(out_dir / "instruction" / f"{split}.jsonl") for split in ("train", "eval")}
    encoded = {split: chat.encode_rows(rows, config.sft.max_length) for split, rows in splits.items()}
    summary = check_instruction_rows("sft", splits, encoded, tmp_path / "sft", overlong="truncated")
    assert summary["critical_failed"] == 0
    assert sorted(summary["failed"]) == ["expect_column_values_to_be_between(trainable_fraction)"]
    pairs = {split: read_jsonl(out_dir / "preference" / f"{split}.jsonl") for split in ("train", "eval")}
    parts = {split: chat.split_replies(rows) for split, rows in pairs.items()}
    summary = check_preference_rows("reward", pairs, parts, config.reward.max_length, tmp_path / "reward", overlong="dropped")
    assert summary["critical_failed"] == 0
