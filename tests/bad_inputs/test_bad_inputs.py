"""Bad input, each case through the real CLI: a non-zero exit with one line naming the file, row or
key and the rule (or acceptance, for the inputs that are valid), no Python traceback on the
terminal, and nothing that was published earlier in the store lost.

Config-time cases cost milliseconds. Cases that reach a stage run `posttrain run --until <stage>`
on one shared store (slow-marked: each starts a flow), so base and benchmarks are built once and
every later case checks that the folders published before it are still there and intact.
docs/reliability.md lists every case with its result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROW = json.dumps({"prompt": "copy abc", "response": "abc"})
GOOD_ROWS = "".join(json.dumps({"prompt": f"copy {word}", "response": word}) + "\n" for word in ("abc", "defg", "hij", "klmn", "opq", "rstu"))
PREFERENCE = "{role: preference, generate: {rows: 60}}"
INSTRUCTION = "{role: instruction, generate: {rows: 60}}"


@dataclass
class Case:
    name: str
    message: str  # the one error line must contain this (empty: the run must succeed)
    sources: list[str] = field(default_factory=list)  # YAML flow mappings; {dir} is the case folder
    files: dict[str, bytes] = field(default_factory=dict)
    config: str = ""  # more top-level YAML
    sets: list[str] = field(default_factory=list)
    until: str | None = None  # a stage: the case runs a flow (slow)
    env: dict[str, str] = field(default_factory=dict)
    raw_config: bytes | None = None  # the config file itself, as given
    exit_code: int = 1  # 2: the config was refused before anything ran


def source(name: str, **keys) -> str:
    extra = "".join(f", {key}: {value}" for key, value in keys.items())
    return f"{{path: {{dir}}/{name}{extra}}}"


CONFIG_CASES = [
    Case("unknown format", "data.sources.0.format: Input should be 'alpaca', 'messages'", [source("rows.jsonl", format="alpacca"), PREFERENCE], {"rows.jsonl": GOOD_ROWS.encode()}),
    Case("config typo (YAML)", "config.yaml line 4: invalid YAML", raw_config=b"data:\n  sources:\n    - {role: instruction, generate: {rows: 9}\n"),
    Case("unknown key", "sft.lr_rate: unknown key", [INSTRUCTION, PREFERENCE], config="sft: {lr_rate: 0.001}"),
    Case("negative learning rate", "sft.lr: Input should be greater than 0", [INSTRUCTION, PREFERENCE], sets=["sft.lr=-1e-4"]),
    Case("missing source file", "data.sources[0]: {dir}/gone.jsonl: no such file or folder", [source("gone.jsonl", role="instruction"), PREFERENCE]),
    Case("missing model path", "model.name_or_path: {dir}/no-model: no such file or folder", [INSTRUCTION, PREFERENCE], sets=["model.name_or_path={dir}/no-model"]),
    Case(
        "model folder without weights", "model.name_or_path: {dir}/model: no weights in the model folder (*.safetensors)", [INSTRUCTION, PREFERENCE],
        {"model/config.json": b"{}", "model/tokenizer.json": b"{}"}, sets=["model.name_or_path={dir}/model"],
    ),
    Case(
        "pickle-only checkpoint", "weights only as a pickle checkpoint (pytorch_model.bin), refused unopened", [INSTRUCTION, PREFERENCE],
        # Not a real pickle: if anything tried to unpickle it, the error would be a different one.
        {"model/config.json": b"{}", "model/tokenizer.json": b"{}", "model/pytorch_model.bin": b"\x80\x04not unpickled"}, sets=["model.name_or_path={dir}/model"],
    ),
    Case(
        "model folder without tokenizer", "model.name_or_path: {dir}/model: no tokenizer in the model folder", [INSTRUCTION, PREFERENCE],
        {"model/config.json": b"{}", "model/model.safetensors": b"{}"}, sets=["model.name_or_path={dir}/model"],
    ),
    Case("preference-only data", "data.sources: no source gives instruction rows, which sft, distill read", [PREFERENCE]),
    Case("instruction-only data", "data.sources: no source gives preference rows, which reward", [INSTRUCTION]),
    Case("unknown stage for --until", "--until dat: not a stage of this run (stages: base, benchmarks, data, sft", [INSTRUCTION, PREFERENCE], until="dat"),
]
for case in CONFIG_CASES:
    case.exit_code = 2  # the CLI's exit code for a refused config

DATA = "data"
STAGE_CASES = [
    Case("malformed JSON line", "{dir}/rows.jsonl row 2: invalid JSON", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": f'{ROW}\n{{"prompt": "copy x", \n'.encode()}, until=DATA),
    Case("truncated JSON array", "{dir}/rows.json line 2: invalid JSON", [source("rows.json", role="instruction"), PREFERENCE], {"rows.json": f'[{ROW},\n{{"prompt": "copy x", "resp'.encode()}, until=DATA),
    Case("Latin-1 bytes", "{dir}/rows.jsonl row 2: byte 0xe9 at column 16 is not UTF-8", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": ROW.encode() + b'\n{"prompt": "caf\xe9", "response": "x"}\n'}, until=DATA),
    Case("missing field", "{dir}/rows.jsonl row 2: missing key 'response' (role instruction)", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": f'{ROW}\n{{"prompt": "copy x"}}\n'.encode()}, until=DATA),
    Case("wrong type", "{dir}/rows.jsonl row 1: key 'response' must be a string, got int", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": b'{"prompt": "add 1 2", "response": 3}\n'}, until=DATA),
    Case("empty file", "{dir}/rows.jsonl: no rows (an empty source", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": b""}, until=DATA),
    Case("only duplicates", "instruction_clean: expect_column_distinct_values_to_contain_set(split) failed; instruction rows: 8 in, 1 kept, removed by rule: exact_dup 7; the removed rows with their rule: ", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": (ROW + "\n").encode() * 8}, until=DATA),
    Case(
        "chosen == rejected", "preference rows: 3 in, 0 kept, removed by rule: same_pair 3", [INSTRUCTION, source("pairs.jsonl", role="preference")],
        {"pairs.jsonl": "".join(json.dumps({"prompt": f"copy {w}", "chosen": w, "rejected": w}) + "\n" for w in ("ab", "cd", "ef")).encode()}, until=DATA,
    ),
    Case(
        "hh transcript without an assistant turn", "preference rows: 2 in, 0 kept, removed by rule: no_final_reply 2", [INSTRUCTION, source("hh.jsonl", format="hh")],
        {"hh.jsonl": b"".join(json.dumps({"chosen": f"\n\nHuman: hi {i}", "rejected": f"\n\nHuman: hello {i}"}).encode() + b"\n" for i in range(2))}, until=DATA,
    ),
    Case(
        "chat message with an unknown role", "{dir}/chat.jsonl row 1: messages[1]: 'role' must be one of user, human, assistant, gpt, system, got 'robot'",
        [source("chat.jsonl", format="messages"), PREFERENCE], {"chat.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}).encode() + b"\n"}, until=DATA,
    ),
    Case("a .parquet that is not Parquet", "{dir}/rows.parquet: cannot read as a Parquet file", [source("rows.parquet", role="instruction"), PREFERENCE], {"rows.parquet": GOOD_ROWS.encode()}, until=DATA),
    Case("a .gz that is not gzip", "{dir}/rows.jsonl.gz: not a readable gzip file (Not a gzipped file", [source("rows.jsonl.gz", role="instruction"), PREFERENCE], {"rows.jsonl.gz": GOOD_ROWS.encode()}, until=DATA),
    Case("a JSON object instead of rows", "{dir}/rows.json: one JSON object (keys 'rows'), expected a JSON array of records or JSON lines", [source("rows.json", role="instruction"), PREFERENCE], {"rows.json": json.dumps({"rows": [1, 2]}, indent=1).encode()}, until=DATA),
    Case("a mapped column no row has", "{dir}/rows.jsonl: fields maps 'input' to column 'context', which no row of the source has", [source("rows.jsonl", format="alpaca", fields="{input: context}"), PREFERENCE], {"rows.jsonl": b'{"instruction": "copy abc", "output": "abc"}\n{"instruction": "copy de", "output": "de"}\n'}, until=DATA),
    Case("a BOM with CRLF (accepted)", "", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": b"\xef\xbb\xbf" + GOOD_ROWS.replace("\n", "\r\n").encode()}, until=DATA),
    Case("control characters (cleaned, accepted)", "", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": GOOD_ROWS.replace('"copy ', '"\\u0007copy\\u001b[1m ').encode()}, until=DATA),
    Case("a 10 MB row (quarantined, accepted)", "", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": (GOOD_ROWS + json.dumps({"prompt": "copy " + "x" * 10_000_000, "response": "x"}) + "\n").encode()}, until=DATA),
    Case("a batch larger than the data", "sft.batch_size 4096 x 1 device(s) is more than the data's", [source("rows.jsonl", role="instruction"), PREFERENCE], {"rows.jsonl": GOOD_ROWS.encode()}, sets=["sft.batch_size=4096"], until="sft"),
    Case("a tokenizer that does not match the model", "{dir}/model: the tokenizer has", [INSTRUCTION, PREFERENCE], sets=["model.name_or_path={dir}/model"], until="base"),
    Case(
        "a tracking server that stays unreachable", "MLflow tracking server http://127.0.0.1:9: unreachable after 2 tries (Connection refused)", [INSTRUCTION, PREFERENCE],
        sets=["tracking.uri=http://127.0.0.1:9"], until=DATA, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"},
    ),
]


def mismatched_model(folder: Path) -> None:
    """The demo tokenizer (about 100 tokens) with a model whose embedding table has 16 rows."""
    from posttrain.config import TinyModelConfig
    from posttrain.models import build_tiny, save_pretrained

    model, tokenizer = build_tiny(TinyModelConfig(), seed=0)
    model.resize_token_embeddings(16)
    save_pretrained(model, tokenizer, folder)


def write_case(case: Case, case_dir: Path, store: Path) -> Path:
    case_dir.mkdir(parents=True)
    for name, content in case.files.items():
        (case_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (case_dir / name).write_bytes(content)
    if case.name == "a tokenizer that does not match the model":
        mismatched_model(case_dir / "model")
    config = case_dir / "config.yaml"
    if case.raw_config is not None:
        config.write_bytes(case.raw_config)
        return config
    sources = "".join(f"    - {line.replace('{dir}', str(case_dir))}\n" for line in case.sources)
    config.write_text(f"store_root: {store}\nrun_name: case\n{case.config}\ndata:\n  sources:\n{sources}")
    return config


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain.cli", *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


def published(store: Path) -> dict[str, str]:
    """Every published folder's manifest digest (a folder without a manifest never counts)."""
    return {str(path.parent): json.loads(path.read_text())["digest"] for path in (store / "store").glob("*/*/manifest.json")}


def check(case: Case, tmp_path: Path, store: Path, prefect_api: str | None = None) -> subprocess.CompletedProcess:
    case_dir = tmp_path / "case"
    config = write_case(case, case_dir, store)
    before = published(store)
    args = ["run", str(config), *(item for assignment in case.sets for item in ("--set", assignment.replace("{dir}", str(case_dir)))), *(["--until", case.until] if case.until else [])]
    result = run_cli(*args, env={**case.env, **({"PREFECT_API_URL": prefect_api} if prefect_api else {})})
    terminal = result.stdout + result.stderr
    assert "Traceback" not in terminal, terminal[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if case.message:
        assert result.returncode == case.exit_code, terminal[-3000:]
        assert len(errors) == 1, terminal[-3000:]
        assert case.message.replace("{dir}", str(case_dir)) in errors[0], errors[0]
    else:
        assert result.returncode == 0 and not errors, terminal[-3000:]
    after = published(store)
    assert {path: after.get(path) for path in before} == before  # nothing published earlier is lost or changed
    return result


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda case: case.name)
def test_a_bad_config_is_one_line_before_anything_runs(case, tmp_path):
    check(case, tmp_path, tmp_path / "store")
    assert not (tmp_path / "store" / "store").exists()  # refused before any stage started


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs-store")


@pytest.mark.slow
@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda case: case.name)
def test_bad_input_at_a_stage_is_one_line_and_keeps_published_work(case, tmp_path, shared_store, prefect_api):
    check(case, tmp_path, shared_store, prefect_api)  # one shared Prefect server: the runs skip starting their own
    status = run_cli("status", "--root", str(shared_store), "--json")
    record = json.loads(status.stdout)
    if case.message:
        assert status.returncode == 1 and record["status"] == "failed"  # `posttrain status` of a failed run exits non-zero
        return
    assert status.returncode == 0 and record["status"] == "succeeded"
    assert sorted(record["stages"]) == ["base", "benchmarks", "data"]  # --until data: nothing downstream
    data_dir = shared_store / record["stages"]["data"]["path"]
    rows = [json.loads(line) for split in ("train", "eval") for line in (data_dir / "instruction" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(row["response"] for row in rows) == ["abc", "defg", "hij", "klmn", "opq", "rstu"]
    assert all(row["prompt"].startswith("copy ") and row["prompt"].isprintable() for row in rows)  # BOM, escapes and controls gone
    if "10 MB" in case.name:
        [rejected] = [json.loads(line) for line in (data_dir / "rejected.jsonl").read_text().splitlines() if '"overlong"' in line]
        assert rejected["source_row"] == 7
