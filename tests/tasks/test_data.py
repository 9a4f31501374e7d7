"""The data stage on generated rows with planted noise plus small hand-written source files.

One module-scoped run feeds most tests (the stage costs a few seconds, mostly the GX import); the
error tests stop at ingest and cost milliseconds.
"""

from __future__ import annotations

import json
import random
import tempfile
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_contracts import ContractViolation
from posttrain.config import DataConfig
from posttrain.jsonl import read_jsonl, write_jsonl
from tasks import data

ROLE_FIELDS = {"instruction": {"prompt", "response"}, "preference": {"prompt", "chosen", "rejected"}, "prompt": {"prompt", "answer"}}
CLEAN_PROMPT = re.compile(r"^[a-z]+ [a-z0-9 ]+$")  # what skills.generate_rows writes before it plants variants


def canonical(prompt: str, response: str) -> str:
    """Test oracle for "the same item": the generator's variants differ only in case, spacing and punctuation."""
    return " ".join(re.sub(r"[^\w\s]", " ", f"{prompt} {response}".lower()).split())


def benchmark_items(folder) -> list[dict]:
    """Every item of every task file the benchmarks artifact holds."""
    return [item for path in sorted(folder.glob("*.jsonl")) for item in read_jsonl(path)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_benchmarks):
    folder = tmp_path_factory.mktemp("sources")
    items = read_jsonl(tiny_benchmarks.path / "copy.jsonl")
    contaminated = items[:4]
    instruction = [
        # normalisation: full-width letters (NFKC), a tab run, a control character, padded ends
        {"prompt": "ｃｏｐｙ\tzzqx\x07", "response": "  zzqx  ", "skill": "copy"},
        # empty once control characters and spaces are gone
        {"prompt": "copy qqq", "response": "\x00\t "},
        # benchmark prompts, verbatim and with extra spaces (equal after normalisation)
        *[{"prompt": item["prompt"], "response": item["answer"], "skill": item["skill"]} for item in contaminated[:2]],
        *[{"prompt": "  " + item["prompt"].replace(" ", "   "), "response": item["answer"]} for item in contaminated[2:]],
    ]
    write_jsonl(folder / "instruction.jsonl", instruction)
    preference = [
        {"prompt": "upper qwe", "chosen": "QWE", "rejected": "QWE"},  # no preference signal
        {"prompt": "upper asdf", "chosen": "ASDF", "rejected": "ASDG"},
    ]
    (folder / "preference.json").write_text(json.dumps(preference))
    return {"folder": folder, "contaminated": len(contaminated)}


def demo_sources(files) -> list[dict]:
    noise = {"exact_duplicates": 0.03, "near_duplicates": 0.05, "empty": 0.01, "overlong": 0.01}
    return [
        {"role": "instruction", "generate": {"rows": 3000, "seed": 0, **noise}},
        {"role": "instruction", "path": str(files["folder"] / "instruction.jsonl")},
        {"role": "preference", "generate": {"rows": 600, "seed": 1, **noise}},
        {"role": "preference", "path": str(files["folder"] / "preference.json")},  # a JSON array
        {"role": "prompt", "generate": {"rows": 300, "seed": 2, **noise}},
    ]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_base, tiny_benchmarks, files):
    out_dir = tmp_path_factory.mktemp("data-out")
    config = DataConfig(sources=demo_sources(files))
    artifact = data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, out_dir)
    rejected = read_jsonl(out_dir / "rejected.jsonl")
    return {"artifact": artifact, "metrics": artifact.metrics, "out": out_dir, "rejected": rejected, "config": config}


def test_worker_processes_and_batch_size_do_not_change_a_byte(stage, tmp_path, tiny_base, tiny_benchmarks):
    """The stage's own run (one worker per CPU, 4,096-row batches) against three workers on
    257-row batches and everything in the stage's process: the same files, the same counts."""
    runs = {"default": (stage["out"], stage["metrics"])}
    for name, options in {"three": {"workers": 3, "batch_rows": 257}, "in_process": {"workers": 1, "batch_rows": 1000}}.items():
        config = stage["config"].model_copy(update=options)
        out_dir = tmp_path / name
        runs[name] = (out_dir, data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, out_dir).metrics)
    assert runs["three"][1]["worker_processes"] == 3 and runs["in_process"][1]["worker_processes"] == 1
    files = sorted(path.relative_to(stage["out"]) for path in stage["out"].rglob("*.jsonl"))
    assert {"rejected.jsonl", "near_dup_clusters.jsonl", "instruction/train.jsonl", "preference/eval.jsonl"} <= {str(path) for path in files}
    timing = ("seconds", "second", "_mb", "_bytes", "worker_processes")  # time and memory
    for out_dir, metrics in runs.values():
        assert sorted(path.relative_to(out_dir) for path in out_dir.rglob("*.jsonl")) == files
        for path in files:
            assert (out_dir / path).read_bytes() == (stage["out"] / path).read_bytes(), path
        assert {k: v for k, v in metrics.items() if not k.endswith(timing)} == {k: v for k, v in stage["metrics"].items() if not k.endswith(timing)}


def test_the_datasketch_backend_gives_the_same_files_on_workers(stage, tmp_path, tiny_base, tiny_benchmarks):
    """With near_dup.backend: datasketch the workers send key texts instead of sketches."""
    near = stage["config"].near_dup.model_copy(update={"backend": "datasketch"})
    runs = []
    for workers in (1, 2):
        config = stage["config"].model_copy(update={"near_dup": near, "workers": workers, "batch_rows": 700, "contract_suites": False})
        out_dir = tmp_path / f"workers-{workers}"
        runs.append((out_dir, data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, out_dir).metrics))
    (one, _), (two, metrics) = runs
    assert metrics["worker_processes"] == 2 and metrics["removed_near_dup"] > 0
    for name in ("rejected.jsonl", "near_dup_clusters.jsonl", "instruction/train.jsonl", "preference/train.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_killed_data_stage_leaves_no_worker_behind(stage, tmp_path, tiny_base, tiny_benchmarks):
    """kill -9 of the stage's process mid-stage: its forked workers go too (a worker orphaned on its
    task queue would keep the stage's files and store locks open, and the next run would wait)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tag = f"{os.getpid()}-{time.time_ns()}"
    config, inputs = tmp_path / "data.json", tmp_path / "inputs.json"
    config.write_text(stage["config"].model_copy(update={"workers": 2, "contract_suites": False}).model_dump_json())
    inputs.write_text(json.dumps({name: {"path": str(a.path), "manifest": a.manifest} for name, a in (("base", tiny_base), ("benchmarks", tiny_benchmarks))}))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "POSTTRAIN_STAGE": "data", "POSTTRAIN_FAILPOINT": "data:phase@3", "POSTTRAIN_TEST_TAG": tag}
    command = [sys.executable, "-m", "tasks.data", "--config", str(config), "--inputs", str(inputs), "--out", str(tmp_path / "out")]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: an orphaned worker would hold a pipe open
        done = subprocess.run(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)
    assert done.returncode == -signal.SIGKILL, log.read_text()[-2000:]

    def tagged() -> list[int]:  # the killed stage's process and everything forked from it carry the tag
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and f"POSTTRAIN_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    deadline = time.monotonic() + 10
    while tagged() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged(), "a worker of the killed data stage is still running"


def outputs(out_dir: Path, role: str) -> list[dict]:
    return read_jsonl(out_dir / role / "train.jsonl") + read_jsonl(out_dir / role / "eval.jsonl")


def test_filters_remove_exactly_the_planted_rows(stage):
    metrics = stage["metrics"]
    # Generated: 30 + 6 + 3 empty rows, same for over-long; the instruction file adds one row that
    # is empty after normalisation, the preference file one pair with chosen == rejected.
    assert metrics["planted_empty"] == 39 and metrics["planted_overlong"] == 39
    assert metrics["removed_empty"] == metrics["planted_empty"] + 1
    assert metrics["removed_overlong"] == metrics["planted_overlong"]
    assert metrics["removed_same_pair"] == 1
    assert metrics["removed_too_short"] == 0
    assert metrics["rows_in"] == 3000 + 6 + 600 + 2 + 300
    assert metrics["rows_in"] == metrics["rows_out"] + sum(v for k, v in metrics.items() if k.startswith("removed_"))


def test_exact_dedup_count_matches_an_independent_count(stage):
    raw = read_jsonl(stage["out"] / "raw" / "0-instruction.jsonl")
    kept = [row for row in raw if row["response"] and len(row["prompt"]) < 200]  # what the filters leave
    independent = len(kept) - len({(" ".join(row["prompt"].split()), row["response"]) for row in kept})
    by_source = Counter(entry["source"] for entry in stage["rejected"] if entry["rule"] == "exact_dup")
    assert by_source["raw/0-instruction.jsonl"] == independent
    assert independent >= 90  # the 3 % planted copies, plus natural repeats such as "add 12 34"
    assert stage["metrics"]["removed_exact_dup"] >= stage["metrics"]["planted_exact_duplicates"]


def test_near_dup_recall_on_planted_variants_and_few_false_removals(stage):
    raw = read_jsonl(stage["out"] / "raw" / "0-instruction.jsonl")
    survivors = Counter(canonical(row["prompt"], row["response"]) for row in outputs(stage["out"], "instruction"))
    variants = [row for row in raw if row["response"] and not CLEAN_PROMPT.match(row["prompt"]) and len(row["prompt"]) < 200]
    assert len(variants) >= 140  # 5 % of 3000 planted (a few collapse into exact copies of each other)
    missed = sum(1 for row in variants if survivors[canonical(row["prompt"], row["response"])] > 1)
    assert 1 - missed / len(variants) >= 0.9

    # False removal: a distinct item (canonical group) that lost every row to near-dup.
    groups: dict[str, set[str]] = defaultdict(set)
    for entry in stage["rejected"]:
        if entry["source"] == "raw/0-instruction.jsonl":
            groups[canonical(entry["record"]["prompt"], entry["record"]["response"])].add(entry["rule"])
    lost = [key for key, rules in groups.items() if survivors[key] == 0 and rules <= {"near_dup", "exact_dup"} and "near_dup" in rules]
    distinct = len({canonical(row["prompt"], row["response"]) for row in raw if row["response"] and len(row["prompt"]) < 200})
    assert len(lost) / distinct < 0.01
    clusters = read_jsonl(stage["out"] / "near_dup_clusters.jsonl")
    assert len(clusters) == stage["metrics"]["near_dup_clusters"]
    assert sum(len(cluster["removed"]) for cluster in clusters) == stage["metrics"]["removed_near_dup"]


def test_decontamination_removes_planted_benchmark_prompts(stage, files, tiny_benchmarks):
    source = str(files["folder"] / "instruction.jsonl")
    planted = [e for e in stage["rejected"] if e["rule"] == "decontaminated" and e["source"] == source]
    assert sorted(e["source_row"] for e in planted) == [3, 4, 5, 6]
    assert all(e["benchmarks"] == ["copy"] for e in planted)
    metrics = stage["metrics"]
    per_task = sum(value for key, value in metrics.items() if key.startswith("decontaminated_"))
    assert per_task == metrics["removed_decontaminated"] >= files["contaminated"] and metrics["decontaminated_copy"] >= 4
    benchmark_prompts = {item["prompt"] for item in benchmark_items(tiny_benchmarks.path)}
    for role in ROLE_FIELDS:
        assert not benchmark_prompts & {row["prompt"] for row in outputs(stage["out"], role)}


def test_normalisation_reaches_the_output(stage):
    rows = outputs(stage["out"], "instruction")
    assert {"prompt": "copy zzqx", "response": "zzqx", "skill": "copy"} in rows
    assert data.normalize_text("\u3000ｆｕｌｌ\twidth\r\n x\x1b ") == "full width\n x"


INDENTED_PYTHON = (
    "def mean(values):  \r\n"
    "    total = 0\r\n"
    "    for value in values:\r\n"
    "        if value  is not None:   # inner spacing of code is kept\r\n"
    "\t\t\ttotal += value\r\n"
    "    return total / len(values)\r\n"
)


def test_normalisation_keeps_code_indentation_and_tidies_prose():
    import ast

    code = data.normalize_text(INDENTED_PYTHON)
    assert code.splitlines() == [line.rstrip() for line in INDENTED_PYTHON.splitlines()]  # CRLF and trailing spaces only
    ast.parse(code.replace("\t\t\t", "            "))  # still Python
    answer = "Use  a loop:\n\n```python\nx  =  1   \n```\nThat's   all.  \n\n"
    assert data.normalize_text(answer) == "Use a loop:\n\n```python\nx  =  1\n```\nThat's all."
    assert data.normalize_text("  one   line\t ") == "one line"
    assert data.normalize_text("\xa0\xa0\xa0\xa0return x\n") == "return x"  # one line: stripped; NBSP is a space


def test_the_fast_paths_of_normalisation_give_what_the_line_by_line_path_gives():
    import random

    from tasks.data.clean import _normalize_lines

    rng = random.Random(0)
    alphabet = ["a", "b", " ", " ", "\n", "\n", "`", "```", "~~~", ".", "\t", "\r", "\x1b[1m", "\x07"]
    fast = 0
    for _ in range(20000):
        pool = alphabet[:10] if rng.random() < 0.7 else alphabet  # mostly text the fast paths take
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 24)))
        if "  " not in text and "\t" not in text and text.replace("\n", "").isprintable():
            fast += 1
        assert data.normalize_text(text) == _normalize_lines(text), repr(text)
    assert fast > 5000


def test_terminal_escape_sequences_are_removed_whole():
    assert data.normalize_text("hi\x1b[31mred\x1b[0m and \x1b[1;32mbold\x1b[m") == "hired and bold"
    assert data.normalize_text("title\x1b]0;window name\x07 done") == "title done"
    assert data.normalize_text("a\x1bMb") == "ab"


def test_splits_have_role_fields_and_do_not_overlap(stage):
    metrics, out_dir = stage["metrics"], stage["out"]
    for role, fields in ROLE_FIELDS.items():
        train, held_out = read_jsonl(out_dir / role / "train.jsonl"), read_jsonl(out_dir / role / "eval.jsonl")
        assert (len(train), len(held_out)) == (metrics[f"{role}_train"], metrics[f"{role}_eval"])
        assert len(held_out) == round((len(train) + len(held_out)) * 0.02) > 0
        for record in train + held_out:
            assert fields <= set(record) <= fields | {"skill"}
        key = lambda record: tuple(record[name] for name in sorted(fields))  # noqa: E731
        assert not {key(r) for r in train} & {key(r) for r in held_out}
        assert len({key(r) for r in train}) == len(train)
    assert metrics["rows_out"] == sum(metrics[f"{role}_{split}"] for role in ROLE_FIELDS for split in ("train", "eval"))


def test_split_order_is_by_hash_and_keeps_one_eval_row():
    hashes = np.array([5, -3, 9, 0, 7, 1, 2, 8, 6, 4], dtype=np.int64)
    order, n_eval = data.split_order(hashes, 0.02)
    assert order.tolist() == np.argsort(hashes).tolist() and n_eval == 1  # at least one eval row
    assert data.split_order(hashes[:1], 0.5)[1] == 0  # a single row stays in train
    assert data.split_order(hashes[:2], 0.99)[1] == 1  # never every row in eval


def test_split_is_seeded_and_stable_when_other_rows_change(tmp_path, tiny_base):
    # A row's split depends on its own dedup key and the seed, not on its neighbours.
    rows = [{"prompt": f"copy {chr(97 + i % 26)}{i}", "response": f"x{i}"} for i in range(400)]
    write_jsonl(tmp_path / "all.jsonl", rows)
    write_jsonl(tmp_path / "most.jsonl", rows[50:])
    splits = {}
    for name, seed in (("all", 0), ("most", 0), ("reseeded", 1)):
        source = "all" if name == "reseeded" else name
        config = DataConfig(sources=[{"role": "instruction", "path": str(tmp_path / f"{source}.jsonl")}], decontaminate=False,
                            contract_suites=False, eval_fraction=0.1, seed=seed, near_dup={"enabled": False})
        data.run(config, {"base": tiny_base}, tmp_path / name)
        splits[name] = {row["prompt"] for row in read_jsonl(tmp_path / name / "instruction" / "eval.jsonl")}
    assert len(splits["all"]) == 40 and len(splits["most"]) == 35
    moved = {prompt for prompt in splits["most"] if prompt not in splits["all"]}
    assert len(moved) <= 6  # rank-based cut: only rows near the boundary can change side
    assert splits["reseeded"] != splits["all"]


def test_rejected_rows_point_back_to_their_source_row(stage):
    rejected = stage["rejected"]
    counts = Counter(entry["rule"] for entry in rejected)
    for rule in data.RULES:
        assert counts[rule] == stage["metrics"][f"removed_{rule}"]
    raw = read_jsonl(stage["out"] / "raw" / "0-instruction.jsonl")
    for entry in rejected:
        assert set(entry) >= {"rule", "source", "source_row", "record"}
        if entry["source"] == "raw/0-instruction.jsonl":
            assert raw[entry["source_row"] - 1] == entry["record"]
        if entry["rule"] in ("exact_dup", "near_dup"):
            assert entry["duplicate_of"]["source_row"] < entry["source_row"] or entry["duplicate_of"]["source"] != entry["source"]


def test_metrics_contracts_and_manifest(stage):
    metrics, out_dir = stage["metrics"], stage["out"]
    assert all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in metrics.values())
    # The tokenized suites run in the stages that consume the data (their own max_length), not here.
    suites = ("instruction_clean", "preference_clean", "prompt_clean")
    assert metrics["contract_expectations_evaluated"] == 13 + 18 + 13
    assert metrics["contract_expectations_passed"] == metrics["contract_expectations_evaluated"]
    for suite in suites:
        assert json.loads((out_dir / "contracts" / f"{suite}.json").read_text())["success"] is True
        assert (out_dir / "data_docs" / "validations" / suite).is_dir()  # one Data Docs page per suite
    assert "instruction_clean" in (out_dir / "data_docs" / "index.html").read_text()
    assert not (out_dir / "contracts" / "sft_tokenized.json").exists()
    manifest = stage["artifact"].manifest
    assert manifest["dedup_key"] == ["prompt", "response"]
    assert manifest["dedup_fields"] == {"instruction": ["prompt", "response"], "preference": ["prompt", "chosen"], "prompt": ["prompt", "answer"]}
    assert "stage_max_length" not in manifest
    assert not (out_dir / "_work").exists()  # the scratch files are gone
    assert metrics["dedup_seconds"] > 0 and metrics["rows_per_second"] > 0
    assert not (out_dir / "manifest.json").exists()


def test_a_broken_edge_stops_the_stage(tmp_path, tiny_base, tiny_benchmarks):
    # Every prompt row is a benchmark prompt: the prompt split comes out empty and its contract fails.
    items = read_jsonl(tiny_benchmarks.path / "copy.jsonl")[:3]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": i["prompt"], "answer": i["answer"]} for i in items])
    config = DataConfig(sources=[{"role": "prompt", "path": str(tmp_path / "prompts.jsonl")}])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ContractViolation, match=r"^data contract prompt_clean: expect_table_row_count_to_be_between failed") as failure:
        data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, out_dir)
    # The line says why nothing is left and where the removed rows are.
    assert f"prompt rows: 3 in, 0 kept, removed by rule: decontaminated 3; the removed rows with their rule: {out_dir / 'rejected.jsonl'}" in str(failure.value)
    # What is needed for the post-mortem is there: the quarantine and the Data Docs of the failure.
    assert [(e["rule"], e["source_row"]) for e in read_jsonl(out_dir / "rejected.jsonl")] == [("decontaminated", n) for n in (1, 2, 3)]
    assert "prompt_clean" in (out_dir / "data_docs" / "index.html").read_text()


def test_a_one_row_dataset_fails_its_contract_in_the_data_stage(tmp_path, tiny_base, tiny_benchmarks):
    write_jsonl(tmp_path / "one.jsonl", [{"prompt": "copy abc", "response": "abc"}])
    config = DataConfig(sources=[{"role": "instruction", "path": str(tmp_path / "one.jsonl")}], decontaminate=False)
    with pytest.raises(ContractViolation, match=r"instruction_clean: expect_column_distinct_values_to_contain_set\(split\) failed; instruction rows: 1 in, 1 kept, removed by rule: none"):
        data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, tmp_path / "out")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "copy abc"}', "row 2: missing key 'response' (role instruction)"),
        ('{"prompt": "copy abc", "response": 3}', "row 2: key 'response' must be a string, got int (role instruction)"),
        ('{"prompt": "copy abc", "response": null}', "row 2: key 'response' must be a string, got null (role instruction)"),
        ('["copy abc"]', "row 2: expected a JSON object, got list (role instruction)"),
        ('{"prompt": "copy abc", ', "row 2: invalid JSON"),
    ],
)
def test_bad_source_row_is_one_line_naming_file_row_key(tmp_path, tiny_base, tiny_benchmarks, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "copy x", "response": "x"}\n' + line + "\n")
    config = DataConfig(sources=[{"role": "instruction", "path": str(path)}])
    with pytest.raises(ValueError) as error:
        data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, tmp_path)
    assert str(error.value).startswith(f"{path} {message}")
    assert "\n" not in str(error.value)


def test_bad_source_file_and_bad_dedup_key(tmp_path, tiny_base, tiny_benchmarks):
    inputs = {"base": tiny_base, "benchmarks": tiny_benchmarks}
    (tmp_path / "pairs.json").write_text('"just a string"')
    with pytest.raises(ValueError, match=r"pairs.json: expected a JSON array of records or JSON lines, got '\"' at the start$"):
        data.run(DataConfig(sources=[{"role": "preference", "path": str(tmp_path / "pairs.json")}]), inputs, tmp_path / "a")
    (tmp_path / "pairs.json").write_text('[{"prompt": "x", "chosen": "y", "rejected": "z"}, 3]')
    with pytest.raises(ValueError, match=r"pairs.json row 2: expected a JSON object, got int \(role preference\)$"):
        data.run(DataConfig(sources=[{"role": "preference", "path": str(tmp_path / "pairs.json")}]), inputs, tmp_path / "b")
    with pytest.raises(ValueError, match=r"missing.jsonl: source file not found"):
        data.run(DataConfig(sources=[{"role": "prompt", "path": str(tmp_path / "missing.jsonl")}]), inputs, tmp_path / "c")
    config = DataConfig(sources=[{"role": "instruction", "generate": {"rows": 10}}], dedup_key=["prompt", "rejected"])
    with pytest.raises(ValueError, match=r"^data.dedup_key: 'rejected' is not a field of instruction rows"):
        data.run(config, inputs, tmp_path / "d")


def test_same_config_gives_byte_identical_output(tmp_path, tiny_base, tiny_benchmarks):
    from posttrain.artifacts import digest_dir

    config = DataConfig(sources=[{"role": "instruction", "generate": {"rows": 300, "seed": 5}}])
    digests = []
    for attempt in ("first", "second"):
        out_dir = tmp_path / attempt
        out_dir.mkdir()
        artifact = data.run(config, {"base": tiny_base, "benchmarks": tiny_benchmarks}, out_dir)
        digests.append(digest_dir(out_dir))
    assert digests[0] == digests[1]  # contract results included: their load timestamp is dropped
    assert artifact.manifest["contracts"]["instruction_clean"]["passed"] == 13


def test_the_length_filter_keeps_exactly_what_full_tokenization_keeps(tiny_base, monkeypatch):
    # The filter skips tokenizing rows whose byte bound clears max_tokens; forced to tokenize every
    # row (no bound), it must keep and drop the same rows, with the same token counts in rejected.jsonl.
    from posttrain.config import DataConfig
    from posttrain.formatting import ChatFormat
    from posttrain.models import load_tokenizer
    from tasks.data.clean import filter_batch
    from tasks.data.records import Removals, Row

    rng = random.Random(3)
    records = []
    for index in range(400):
        length = rng.choice([5, 40, 58, 59, 60, 61, 62, 90, 200])
        records.append(("instruction", {"prompt": "p" * rng.randint(1, 20), "response": "r" * length}))
    for index in range(100):
        records.append(("preference", {"prompt": "q" * rng.randint(1, 30), "chosen": "c" * rng.randint(1, 60), "rejected": "d" * rng.randint(1, 60)}))
    config = DataConfig(sources=[{"path": "x.jsonl", "role": "instruction"}], max_tokens=70, min_response_chars=1)
    chat = ChatFormat(load_tokenizer(tiny_base.path))

    def filtered(folder):
        folder.mkdir()
        with Removals(folder / "rejected.jsonl") as removals:
            kept = []
            for role in ("instruction", "preference"):
                rows = [Row(role, dict(record), dict(record), "x.jsonl", i, row_id=i) for i, (r, record) in enumerate(records) if r == role]
                kept += [row.row_id for row in filter_batch(rows, config, chat, removals)]
        return kept, (folder / "rejected.jsonl").read_text()

    with_bound = filtered(Path(tempfile.mkdtemp()) / "bound")
    monkeypatch.setattr(ChatFormat, "length_bounds", lambda self, conversations: None)
    monkeypatch.setattr(ChatFormat, "record_bounds", lambda self, records, reply_key="response": None)
    monkeypatch.setattr(ChatFormat, "text_bounds", lambda self, texts, segments: None)
    exact = filtered(Path(tempfile.mkdtemp()) / "exact")
    assert with_bound == exact
    assert 0 < len(with_bound[0]) < len(records)  # the limit cut through the rows
