"""Ingest of real-world layouts: every container, every schema, PII scrubbing and n-gram
decontamination, on small hand-written records (the realdata corpora are in tests/test_realdata.py).

Most tests read sources through `read_batches` directly (milliseconds); a few run the whole stage.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from posttrain.config import DataConfig, SourceConfig
from posttrain.jsonl import read_jsonl, write_jsonl
from tasks import data
from tasks.data.clean import scrub_pii
from tasks.data.decontaminate import BenchmarkIndex
from tasks.data.ingest import is_placeholder_input, read_batches, read_records, source_type, split_hh
from tasks.data.records import Origins, Removals

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, move, sleep."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a colour.", "input": "<noinput>", "output": "Blue"},
    {"instruction": "Name a fruit.", "input": "N/A", "output": "Apple"},
    {"instruction": "Say nothing.", "input": "", "output": ""},
]
EXPECTED_ALPACA = [
    {"prompt": "Give three tips for staying healthy.", "response": "Eat well, move, sleep."},
    {"prompt": "Translate to French.\n\nGood morning", "response": "Bonjour"},
    {"prompt": "Name a colour.", "response": "Blue"},
    {"prompt": "Name a fruit.", "response": "Apple"},
    {"prompt": "Say nothing.", "response": ""},
]


def read_all(batch_rows: int = 2, **source) -> tuple[list, Removals]:
    config = SourceConfig(**source)
    removals = Removals()
    batches = list(read_batches(config, config.name, batch_rows, Origins(), removals))
    assert all(len(batch) <= batch_rows for batch in batches)
    return [row for batch in batches for row in batch], removals


def write_container(folder, kind: str, records: list[dict]):
    """`records` written as one of the containers ingest reads; returns the path."""
    import datasets
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if kind == "jsonl":
        write_jsonl(folder / "rows.jsonl", records)
        return folder / "rows.jsonl"
    if kind == "jsonl.gz":
        with gzip.open(folder / "rows.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        return folder / "rows.jsonl.gz"
    if kind == "json":
        (folder / "rows.json").write_text(json.dumps(records, indent=4))
        return folder / "rows.json"
    if kind == "json.gz":
        with gzip.open(folder / "rows.json.gz", "wt") as handle:
            json.dump(records, handle)
        return folder / "rows.json.gz"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), folder / "rows.parquet", row_group_size=2)
        return folder / "rows.parquet"
    if kind == "csv":
        pa_csv.write_csv(pa.Table.from_pylist(records), folder / "rows.csv")
        return folder / "rows.csv"
    if kind == "disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(folder / "saved"))
        return folder / "saved"
    if kind == "hub":  # a folder of data files: load_dataset's own code path, offline
        (folder / "hub").mkdir()
        write_jsonl(folder / "hub" / "train.jsonl", records)
        return folder / "hub"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json.gz", "parquet", "csv", "disk", "hub"])
def test_every_container_gives_the_same_rows(tmp_path, kind, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # nothing outside tmp
    path = write_container(tmp_path, kind, ALPACA)
    assert source_type(SourceConfig(path=str(path), format="alpaca")) == kind.removesuffix(".gz")
    rows, removals = read_all(path=str(path), format="alpaca")
    assert [row.record for row in rows] == EXPECTED_ALPACA  # normalisation happens later (clean.py)
    assert [row.source_row for row in rows] == [1, 2, 3, 4, 5]  # JSON lines: line numbers; others: positions
    assert [row.row_id for row in rows] == [0, 1, 2, 3, 4]
    assert all(row.role == "instruction" for row in rows)
    assert removals.normalised == {"placeholder_input": 2}


def test_explicit_type_and_split_override_inference(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "rows.txt").write_text("".join(json.dumps(row) + "\n" for row in ALPACA))
    with pytest.raises(ValueError, match=r"rows.txt: cannot tell the file type from its name; set the source's `type`$"):
        read_all(path=str(tmp_path / "rows.txt"), format="alpaca")
    rows, _ = read_all(path=str(tmp_path / "rows.txt"), format="alpaca", type="jsonl")
    assert len(rows) == 5
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:1]), "test": datasets.Dataset.from_list(ALPACA[1:3])})
    splits.save_to_disk(str(tmp_path / "saved"))
    rows, _ = read_all(path=str(tmp_path / "saved"), format="alpaca", split="test")
    assert [row.record["response"] for row in rows] == ["Bonjour", "Blue"]
    with pytest.raises(ValueError, match=r"saved: cannot load as a saved datasets folder \(no split 'validation' \(has train, test\)\)$"):
        read_all(path=str(tmp_path / "saved"), format="alpaca", split="validation")


# Records whose values json.load and a streaming parser could tell apart: floats, ints, nesting, escapes.
ODD_RECORDS = [
    {"i": 1, "f": 2.5, "e": 1e5, "neg": -0.0, "tiny": 1.5e-300, "big": 2**62, "none": None, "flag": True},
    {"nested": {"list": [1, 0.1, [2.25, {"k": "v"}]], "empty": {}}, "text": "é 😀 \u00e9 \"quoted\" \n"},
    [1, "not an object"],
    "a string",
    {"k": 1, "k2": [], "k3": ""},
    3.0,
    {"last": 12345678901234567},
]


@pytest.mark.parametrize("kind", ["json", "json.gz"])
def test_a_json_array_streams_in_batches_with_the_records_json_load_gives(tmp_path, kind):
    path = write_container(tmp_path, kind, ODD_RECORDS)
    batches = read_records(SourceConfig(path=str(path), format="alpaca"), 3)
    first = next(batches)  # a batch before the file is read to its end
    assert [number for number, _ in first] == [1, 2, 3]
    numbered = first + [item for batch in batches for item in batch]
    with (gzip.open(path, "rt") if kind == "json.gz" else open(path)) as handle:
        expected = json.load(handle)
    assert [number for number, _ in numbered] == list(range(1, len(expected) + 1))
    assert [record for _, record in numbered] == expected
    assert [json.dumps(record) for _, record in numbered] == [json.dumps(record) for record in expected]  # 3.0 stays a float


def test_a_json_array_is_given_before_a_later_syntax_error_which_is_one_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ALPACA, indent=1)[:-2] + ", {oops}]")  # every record, then a broken one
    batches = read_batches(SourceConfig(path=str(path), format="alpaca"), "rows.json", 2, Origins(), Removals())
    assert [row.source_row for row in next(batches)] == [1, 2]  # streamed: rows come before the bad one is parsed
    with pytest.raises(ValueError) as error:
        list(batches)
    assert str(error.value) == f"{path} line 26: invalid JSON (Expecting property name enclosed in double quotes)"
    with gzip.open(tmp_path / "rows.json.gz", "wt") as handle:
        handle.write('[{"instruction": "Hi", "output": "Hello"}] trailing')
    with pytest.raises(ValueError) as error:
        read_all(path=str(tmp_path / "rows.json.gz"), format="alpaca")
    assert str(error.value) == f"{tmp_path / 'rows.json.gz'} line 1: invalid JSON (Extra data)"
    (tmp_path / "cut.json").write_text('[{"instruction": "Hi", "output": "Hello"},\n')
    with pytest.raises(ValueError, match=r"cut.json line 2: invalid JSON \(Expecting value\)$"):
        read_all(path=str(tmp_path / "cut.json"), format="alpaca")


def test_a_json_array_with_values_only_json_load_accepts_still_loads(tmp_path):
    """yajl rejects integers past 64 bits, NaN and Infinity; json.load reads them, so they still load."""
    path = tmp_path / "rows.json"
    path.write_text('[{"a": 1}, {"a": 2}, {"a": 123456789012345678901234567890}, {"a": NaN}, {"a": Infinity}, {"a": 1e400}]')
    numbered = [item for batch in read_records(SourceConfig(path=str(path), format="alpaca"), 2) for item in batch]
    assert [number for number, _ in numbered] == [1, 2, 3, 4, 5, 6]
    assert [json.dumps(record) for _, record in numbered] == [json.dumps(record) for record in json.loads(path.read_text())]


def test_a_dataset_id_goes_through_load_dataset_and_fails_in_one_line(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # HF_DATASETS_OFFLINE=1: never the network
    source = SourceConfig(path="no-such-org/no-such-dataset", format="hh", split="test")
    assert source_type(source) == "hub"
    with pytest.raises(ValueError) as error:
        read_all(path=source.path, format="hh", split="test")
    assert str(error.value).startswith("no-such-org/no-such-dataset: cannot load as a dataset (")
    assert "\n" not in str(error.value)


def test_fields_map_custom_column_names(tmp_path):
    rows = [{"question": "What is 2+2?", "solution": "4", "skill": "add"}]
    write_jsonl(tmp_path / "q.jsonl", rows)
    read, _ = read_all(path=str(tmp_path / "q.jsonl"), format="prompt", fields={"prompt": "question", "answer": "solution"})
    assert read[0].record == {"prompt": "What is 2+2?", "answer": "4", "skill": "add"}
    with pytest.raises(ValueError, match=r"q.jsonl row 1: missing key 'answer' \(role prompt\)$"):
        read_all(path=str(tmp_path / "q.jsonl"), format="prompt", fields={"prompt": "question"})
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": 3}])
    with pytest.raises(ValueError, match=r"a.jsonl row 1: key 'output' must be a string, got int \(format alpaca\)$"):
        read_all(path=str(tmp_path / "a.jsonl"), format="alpaca")
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])  # no input column at all
    assert read_all(path=str(tmp_path / "a.jsonl"), format="alpaca")[0][0].record == {"prompt": "Hi", "response": "Hello"}


def test_source_config_derives_role_and_format_and_rejects_contradictions():
    assert SourceConfig(path="x.json", format="hh").role == "preference"
    assert SourceConfig(path="x.json", role="prompt").format == "prompt"
    assert SourceConfig(path="x.json", format="messages", role="instruction").format == "messages"
    with pytest.raises(ValueError, match="format 'hh' makes preference rows, not instruction"):
        SourceConfig(path="x.json", format="hh", role="instruction")
    with pytest.raises(ValueError, match=r"fields: 'question' is not a field of format alpaca"):
        SourceConfig(path="x.json", format="alpaca", fields={"question": "q"})
    with pytest.raises(ValueError, match="give `format`"):
        SourceConfig(path="x.json")
    with pytest.raises(ValueError, match="a generated source takes only `role` and `generate`"):
        SourceConfig(role="instruction", format="alpaca", generate={"rows": 3})


def test_placeholder_inputs():
    for text in ("No input", "Noinput", "noinput", "No Input", "N/A", "NoInput", "None", "none", "no input", "<noinput>", "< No Input >", "NA", "None."):
        assert is_placeholder_input(text), text
    for text in ("Nonetheless", "No input was given to the function", "n", "NaN", "0"):
        assert not is_placeholder_input(text), text


def test_messages_schema(tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "human", "content": "What is 2+2?"},
                {"role": "gpt", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
        {"messages": [{"role": "user", "content": "Anyone there?"}]},  # no reply to learn from
        {"messages": [{"role": "assistant", "content": "Unprompted."}]},  # empty prompt: the 'empty' rule
    ]
    write_jsonl(tmp_path / "chats.jsonl", chats)
    rows, removals = read_all(path=str(tmp_path / "chats.jsonl"), format="messages")
    # A chat with more than one exchange or a system prompt keeps its turns (roles normalised), so
    # training renders them with the chat template; prompt/response stay for dedup and decontamination.
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    assert [row.record for row in rows] == [
        {"prompt": "Hi there", "response": "Hello!"},
        {"prompt": "System: Be brief.\n\nUser: What is 2+2?\n\nAssistant: 4\n\nUser: And 3+3?", "response": "6", "messages": turns},
        {"prompt": "", "response": "Unprompted.", "messages": [{"role": "assistant", "content": "Unprompted."}]},
    ]
    assert removals.counts["no_final_reply"] == 1
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "beep"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: messages\[0\]: 'role' must be one of user, human, assistant, gpt, system, got 'robot' \(format messages\)$"):
        read_all(path=str(tmp_path / "bad.jsonl"), format="messages")
    # ShareGPT-style names through `fields`, the chat stored as JSON text in a CSV column.
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    turns = [{"from": "human", "value": "Ping\nplease"}, {"from": "gpt", "value": "Pong"}]
    pa_csv.write_csv(pa.Table.from_pylist([{"conversation": json.dumps(turns)}]), tmp_path / "chats.csv")
    rows, _ = read_all(path=str(tmp_path / "chats.csv"), format="messages", fields={"messages": "conversation", "role": "from", "content": "value"})
    assert rows[0].record == {"prompt": "Ping\nplease", "response": "Pong"}


def test_hh_split_rules():
    single = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert split_hh(single + " Rayleigh scattering.", single + " I don't know.") == ("Why is the sky blue?", "Rayleigh scattering.", "I don't know.")
    multi = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Recommend a book.\n\nAssistant:"
    prompt, chosen, rejected = split_hh(multi + " Dune.", multi + " No.")
    assert prompt == "User: Hi\n\nAssistant: Hello, how can I help?\n\nUser: Recommend a book."
    assert (chosen, rejected) == ("Dune.", "No.")
    # One reply holds its own "Assistant:" line: the last marker of that transcript is inside its reply.
    assert split_hh(single + " Umm...\n\nAssistant: Blue light scatters.", single + " Ask later.") == (
        "Why is the sky blue?",
        "Umm...\n\nAssistant: Blue light scatters.",
        "Ask later.",
    )
    # Same text: split as usual; the filter then drops the pair as same_pair.
    assert split_hh(single + " Yes.", single + " Yes.")[1:] == ("Yes.", "Yes.")
    from tasks.data.ingest import Unusable

    with pytest.raises(Unusable, match="prompt_mismatch"):  # the conversations differ before the last reply
        split_hh(single + " A.\n\nHuman: More?\n\nAssistant: B.", single + " C.")
    with pytest.raises(Unusable, match="prompt_mismatch"):  # nothing shared at all
        split_hh("\n\nHuman: One\n\nAssistant: 1", "\n\nHuman: Two\n\nAssistant: 2")


def test_scrub_pii_counts_each_kind_and_leaves_numbers_alone():
    text = (
        "Mail jane.doe+work@example.co.uk or call (555) 123-4567, +44 20 7946 0958 or 555.867.5309. "
        "Server 192.168.0.12 and fe80::1ff:fe23:4567:890a, gateway 2001:db8::1."
    )
    scrubbed, counts = scrub_pii(text, ["email", "phone", "ip"])
    assert counts == {"email": 1, "phone": 3, "ip": 3}
    assert scrubbed == "Mail <EMAIL> or call <PHONE>, <PHONE> or <PHONE>. Server <IP> and <IP>, gateway <IP>."
    untouched = "On 2023-05-17 at 10:30:00 we sold 1,234,567 units; version 1.2.3.4.5, ratio 3:4, 12 34 56 78, x = 555-1234."
    assert scrub_pii(untouched, ["email", "phone", "ip"]) == (untouched, {"email": 0, "phone": 0, "ip": 0})
    assert scrub_pii("a@b.io 10.0.0.1", ["ip"]) == ("a@b.io <IP>", {"ip": 1})  # only the kinds asked for


GSM8K_LIKE = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
]


def test_benchmark_index_ngram_rules():
    index = BenchmarkIndex({"gsm8k": GSM8K_LIKE, "short": ["name the largest ocean on earth today please", "reverse abcde"]}, ngram=13, min_words=8)
    # 13 consecutive words of a long item, inside other text, with different case and punctuation.
    leaked = "Here is a puzzle: NATALIA sold clips to 48 of her friends in April; and then she sold half as many. Solve it."
    assert index.matches({"prompt": leaked, "response": "x"}, "instruction") == ["gsm8k"]
    # 12 of those words are not enough.
    near_miss = "natalia sold clips to 48 of her friends in april and then"
    assert index.matches({"prompt": near_miss, "response": "x"}, "instruction") == []
    # A leak in the answer field counts too.
    assert index.matches({"prompt": "q", "response": "weng earns 12 an hour for babysitting yesterday she just did 50 minutes"}, "instruction") == ["gsm8k"]
    # A prompt of 8-12 words must appear whole; shorter ones only exactly.
    assert index.matches({"prompt": "Please name the largest ocean on Earth today, please!", "response": "x"}, "instruction") == ["short"]
    assert index.matches({"prompt": "please reverse abcde now", "response": "edcba"}, "instruction") == []
    assert index.matches({"prompt": "reverse abcde", "response": "edcba"}, "instruction") == ["short"]


def test_the_batch_screen_finds_every_row_the_word_by_word_check_finds():
    """matches_batch hashes word windows in numpy and checks only the rows it flags: it must give
    what matches() gives row by row, whatever the case, punctuation, Unicode letters or length."""
    import random

    items = [*GSM8K_LIKE, "Ärger über Straße: warum fährt der Zug nicht pünktlich ab heute morgen", "name the largest ocean on earth today please"]
    index = BenchmarkIndex({"gsm8k": items[:2], "de": items[2:3], "short": items[3:]}, ngram=13, min_words=8)
    rng = random.Random(0)
    vocabulary = "natalia sold clips to 48 of her friends in april straße ärger über zug the a name ocean earth weng ΣΟΦΊΑ İstanbul".split()
    records = []
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.3:  # a slice of an item, re-cased and re-punctuated, inside other words
            words = rng.choice(items).split()
            start = rng.randrange(len(words))
            piece = words[start : start + rng.randint(1, 14)]
            text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 3))) + " " + ",  ".join(piece).upper() if rng.random() < 0.5 else " ".join(piece)
        else:
            text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 20)))
        records.append({"prompt": text if rng.random() < 0.5 else "q", "response": text if rng.random() < 0.5 else "", "extra": 1})
    one_by_one = [index.matches(record, "instruction") for record in records]
    assert sum(map(bool, one_by_one)) > 30  # the data exercises the window rules, not only clean rows
    assert index.matches_batch(records, "instruction") == one_by_one
    assert index.matches_batch([], "instruction") == []
    exact_only = BenchmarkIndex({"short": ["reverse abcde"]}, ngram=13, min_words=8)  # no windows at all
    assert exact_only.matches_batch([{"prompt": "reverse abcde", "response": "x"}, {"prompt": "x", "response": "reverse abcde"}], "instruction") == [["short"], []]


def test_common_prefix_length_is_commonprefix():
    import os
    import random

    from posttrain.transcripts import common_prefix_length

    rng = random.Random(1)
    for _ in range(5000):
        a, b = ("".join(rng.choice("ab\n") for _ in range(rng.randint(0, 12))) for _ in range(2))
        assert common_prefix_length(a, b) == len(os.path.commonprefix([a, b]))


def test_stage_mixes_formats_and_containers(tmp_path, tiny_base):
    """One run: Alpaca JSON array, hh JSON lines, messages Parquet, prompts CSV, with PII scrubbing
    and n-gram decontamination against a planted long benchmark item."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA + [ALPACA[1]] + [{"instruction": "Email me at bob@example.com", "input": "", "output": "Sure."}]))
    hh = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    pairs = [
        {"chosen": hh + " Rayleigh scattering.", "rejected": hh + " Dunno."},
        {"chosen": hh + " Same.", "rejected": hh + " Same."},
        {"chosen": hh + " A.\n\nHuman: More?\n\nAssistant: B.", "rejected": hh + " C."},
        {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Knock knock.", "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No."},
    ]
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(pair) + "\n" for pair in pairs)
    chats = [
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Solve: " + GSM8K_LIKE[0]}, {"role": "assistant", "content": "72"}]},  # planted
        {"messages": [{"role": "user", "content": "Hello?"}]},
    ]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chats.parquet")
    (tmp_path / "prompts.csv").write_text('question,answer\n"What is 2+2?",4\n"What is 3+3?",6\n"Call 555-123-4567?",no\n')
    benchmarks = tmp_path / "benchmarks"
    write_jsonl(benchmarks / "gsm8k.jsonl", [{"id": i, "skill": "math", "prompt": p, "answer": "0"} for i, p in enumerate(GSM8K_LIKE)])
    write_jsonl(benchmarks / "skills.jsonl", [{"id": 0, "skill": "copy", "prompt": "copy abc", "answer": "abc"}])
    sources = [
        {"path": str(tmp_path / "alpaca.json"), "format": "alpaca"},
        {"path": str(tmp_path / "hh.jsonl.gz"), "format": "hh"},
        {"path": str(tmp_path / "chats.parquet"), "format": "messages"},
        {"path": str(tmp_path / "prompts.csv"), "format": "prompt", "fields": {"prompt": "question"}},
    ]
    from posttrain.artifacts import Artifact

    inputs = {"base": tiny_base, "benchmarks": Artifact(benchmarks, {})}
    manifests = []
    for batch_rows in (3, 4096):  # batch boundaries must not change any result
        config = DataConfig(
            sources=sources, max_tokens=256, scrub_pii=["email", "phone"], batch_rows=batch_rows, contract_suites=batch_rows > 3, eval_fraction=0.3
        )
        out_dir = tmp_path / f"out-{batch_rows}"
        manifests.append(data.run(config, inputs, out_dir).manifest)
    metrics = manifests[1]["metrics"]
    assert {key: value for key, value in manifests[0]["metrics"].items() if not key.endswith(("seconds", "second", "_mb")) and "contract" not in key} == {
        key: value for key, value in metrics.items() if not key.endswith(("seconds", "second", "_mb")) and "contract" not in key
    }
    rejected = read_jsonl(out_dir / "rejected.jsonl")
    by_rule = Counter((entry["rule"], entry["source"].rsplit("/", 1)[-1], entry["source_row"]) for entry in rejected)
    assert set(by_rule) == {
        ("empty", "alpaca.json", 5),
        ("exact_dup", "alpaca.json", 6),
        ("same_pair", "hh.jsonl.gz", 2),
        ("prompt_mismatch", "hh.jsonl.gz", 3),
        ("decontaminated", "chats.parquet", 2),
        ("no_final_reply", "chats.parquet", 3),
    }
    assert metrics["decontaminated_gsm8k"] == 1 and metrics["decontaminated_skills"] == 0
    assert (metrics["normalised_placeholder_input"], metrics["normalised_pii_email"], metrics["normalised_pii_phone"]) == (2, 1, 1)
    assert metrics["rows_in"] == 7 + 4 + 3 + 3 and metrics["rows_out"] == 6 + 2 + 3
    assert [source["type"] for source in manifests[1]["sources"]] == ["json", "jsonl", "parquet", "csv"]
    instruction = read_jsonl(out_dir / "instruction" / "train.jsonl") + read_jsonl(out_dir / "instruction" / "eval.jsonl")
    assert {"prompt": "Email me at <EMAIL>", "response": "Sure."} in instruction
    assert {"prompt": "Say hi", "response": "hi"} in instruction
    preference = read_jsonl(out_dir / "preference" / "train.jsonl") + read_jsonl(out_dir / "preference" / "eval.jsonl")
    assert sorted(pair["prompt"] for pair in preference) == ["Tell me a joke.", "Why is the sky blue?"]
    prompts = read_jsonl(out_dir / "prompt" / "train.jsonl") + read_jsonl(out_dir / "prompt" / "eval.jsonl")
    assert {"prompt": "Call <PHONE>?", "answer": "no"} in prompts and {"prompt": "What is 2+2?", "answer": "4"} in prompts
    assert manifests[1]["contracts"]["preference_clean"]["passed"] == 18


def test_a_mapped_column_that_no_row_has_is_an_error_not_an_empty_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Yo", "output": "Hey"}])
    with pytest.raises(ValueError, match=r"a.jsonl: fields maps 'input' to column 'context', which no row of the source has$"):
        read_all(path=str(tmp_path / "a.jsonl"), format="alpaca", fields={"input": "context"})
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Yo", "context": "there", "output": "Hey"}])
    read, _ = read_all(path=str(tmp_path / "a.jsonl"), format="alpaca", fields={"input": "context"})  # one row has it: fine
    assert [row.record["prompt"] for row in read] == ["Hi", "Yo\n\nthere"]


def test_a_byte_order_mark_and_crlf_are_accepted_in_every_text_container(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n{"prompt": "c", "response": "d"}\r\n')
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf[{"prompt": "a", "response": "b"},\r\n {"prompt": "c", "response": "d"}]\r\n')
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,response\r\na,b\r\nc,d\r\n")
    for name in ("bom.jsonl", "bom.json", "bom.csv"):
        read, _ = read_all(path=str(tmp_path / name), role="instruction")
        assert [row.record for row in read] == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}], name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', r"latin.jsonl row 2: byte 0xe9 at column 16 is not UTF-8"),
        ("latin.json", b'[{"prompt": "a", "response": "b"},\n{"prompt": "caf\xe9", "response": "b"}]', r"latin.json line 2: byte 0xe9 at column 16 is not UTF-8"),
        ("latin.csv", b"prompt,response\na,b\nc,caf\xe9\n", r"latin.csv line 3: byte 0xe9 at column 6 is not UTF-8"),
        ("fake.jsonl.gz", b'{"prompt": "a", "response": "b"}\n', r"fake.jsonl.gz: not a readable gzip file \(Not a gzipped file"),
        ("cut.jsonl.gz", gzip.compress(b'{"prompt": "a", "response": "b"}\n' * 50)[:40], r"cut.jsonl.gz: not a readable gzip file \(Compressed file ended"),
        ("fake.parquet", b"prompt,response\na,b\n", r"fake.parquet: cannot read as a Parquet file \("),
        ("wrapped.json", b'{\n  "data": [{"prompt": "a", "response": "b"}]\n}\n', r"wrapped.json: one JSON object \(keys 'data'\), expected a JSON array of records or JSON lines$"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_one_line_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_all(path=str(tmp_path / name), role="instruction")
    assert error.type is ValueError  # our one line, not a library's exception type
    assert "\n" not in str(error.value)
