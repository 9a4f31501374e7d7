"""Step 1: read each source in batches and map its records onto the pipeline's row layouts.

    for rows in read_batches(source, index, out_dir, batch_rows=4096, origins=origins, removals=removals):
        ...  # a list of Row, at most batch_rows long; quarantined rows are already in removals

Containers (`SourceConfig.type`, inferred from the path): JSON lines and CSV are streamed line by
line / block by block, Parquet by row group batches (pyarrow), `datasets` folders and dataset ids
(`datasets.load_dataset`) through their memory-mapped Arrow tables, and a JSON array record by
record (ijson's C backend). Each may be gzip-compressed (.gz).

Schemas (`SourceConfig.format`): see `to_role_record`. A record that breaks its schema (a missing
key, a non-string field) stops the stage with one line naming file, row and key; a record that
fits the schema but cannot become a row (a chat that does not end with the assistant, hh-rlhf
transcripts without a common prompt) is quarantined with its rule.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain import skills, transcripts
from posttrain.config import SourceConfig
from posttrain.jsonl import write_jsonl
from posttrain.transcripts import transcript_text
from tasks.data.clean import normalize_text
from tasks.data.records import ROLE_FIELDS, Origins, Removals, Row

DATASETS_FOLDER_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SUFFIX_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Alpaca's self-instruct generator wrote these instead of an empty input ("No input", "<noinput>",
# "N/A", …): compared lower-cased without spaces, angle brackets or a final full stop.
PLACEHOLDER_INPUTS = {"noinput", "n/a", "na", "none"}
TURN_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class Unusable(Exception):
    """A record that fits its schema but cannot become a row; `rule` goes to rejected.jsonl."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------- containers


def source_type(source: SourceConfig) -> str:
    if source.type is not None:
        return source.type
    path = Path(source.path)
    if path.is_dir():
        return "disk" if any((path / marker).is_file() for marker in DATASETS_FOLDER_MARKERS) else "hub"
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in SUFFIX_TYPES.items():
        if name.endswith(suffix):
            return kind
    if path.exists():
        raise ValueError(f"{source.path}: cannot tell the file type from its name; set the source's `type`")
    return "hub"  # not a local path: a dataset id


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark at the start (Windows editors write one) is dropped, not an error.
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else path.open(encoding="utf-8-sig")


def _not_utf8(path: str, where: str, data: bytes, exc: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} {where}: byte 0x{data[exc.start]:02x} at column {exc.start + 1} is not UTF-8 (re-encode the file as UTF-8)")


def _batched(numbered: Iterator[tuple[int, object]], size: int) -> Iterator[list[tuple[int, object]]]:
    batch = []
    for item in numbered:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_lines(path: str, handle) -> Iterator[tuple[int, object]]:
    """`handle` is binary: each line is decoded on its own, so a line that is not UTF-8 is named."""
    for line_number, data in enumerate(handle, start=1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, f"row {line_number}", data, exc) from None
        if line_number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} row {line_number}: invalid JSON ({exc.msg})") from None


def _json_file(path: str, file: Path) -> Iterator[tuple[int, object]]:
    with _open_binary(file) as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        handle.seek(0)
        if not head.startswith(b"["):  # a .json file holding JSON lines, as many datasets ship them
            if head and not head.startswith(b"{"):
                raise ValueError(f"{path}: expected a JSON array of records or JSON lines, got {head[:1].decode('latin-1')!r} at the start")
            try:
                yield from _json_lines(path, handle)
            except ValueError:
                _raise_if_one_object(path, file)
                raise
            return
    yield from _json_array(path, file)


def _raise_if_one_object(path: str, file: Path) -> None:
    """A pretty-printed JSON object (`{"data": [...]}`) is not bad JSON lines: say what it is."""
    with _open_binary(file) as handle:
        try:
            whole = json.loads(handle.read().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
    if isinstance(whole, dict):
        keys = ", ".join(map(repr, list(whole)[:5]))
        raise ValueError(f"{path}: one JSON object (keys {keys}), expected a JSON array of records or JSON lines") from None


def _first_non_utf8(path: str, file: Path) -> ValueError | None:
    with _open_binary(file) as handle:
        for line_number, data in enumerate(handle, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _not_utf8(path, f"line {line_number}", data, exc)
    return None


def _json_array(path: str, file: Path) -> Iterator[tuple[int, object]]:
    """The records of a JSON array, streamed: ijson builds one record at a time (floats as float,
    like json.load). What ijson rejects is read again by json.loads, whole: its error is the one-line
    message (file, line) a bad file always got, and the few values json.load accepts but yajl does
    not (integers past 64 bits, NaN, Infinity, 1e400) still load, as the rows not yet given."""
    import ijson

    yielded = 0
    try:
        with _open_binary(file) as handle:
            for record in ijson.items(handle, "item", use_float=True):
                yielded += 1
                yield yielded, record
        return
    except ijson.JSONError:
        pass
    with _open_binary(file) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _first_non_utf8(path, file) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got a JSON {_type_name(records)}")
    yield from enumerate(records[yielded:], start=yielded + 1)


def _csv_file(file: Path) -> Iterator[dict]:
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    with _open_text(file) as handle:
        header = next(csv.reader(handle), [])
    # Every column as a string: type inference would turn an answer column of "72"s into integers.
    convert = pa_csv.ConvertOptions(column_types={name: pa.string() for name in header})
    parse = pa_csv.ParseOptions(newlines_in_values=True)  # answers span lines
    with pa.input_stream(str(file), compression="detect") as stream:
        reader = pa_csv.open_csv(stream, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield from batch.to_pylist()


def _arrow_rows(dataset, batch_rows: int) -> Iterator[dict]:
    for batch in dataset.iter(batch_size=batch_rows):
        columns = list(batch)
        for values in zip(*(batch[name] for name in columns)):
            yield dict(zip(columns, values))


def _datasets_rows(source: SourceConfig, kind: str, batch_rows: int) -> Iterator[dict]:
    import datasets

    split = source.split or "train"
    try:
        if kind == "disk":
            dataset = datasets.load_from_disk(source.path)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"no split {split!r} (has {', '.join(dataset)})")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(source.path, split=split)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError…)
        raise ValueError(f"{source.path}: cannot load as a {'saved datasets folder' if kind == 'disk' else 'dataset'} ({_first_line(exc)})") from None
    yield from _arrow_rows(dataset, batch_rows)


def read_records(source: SourceConfig, batch_rows: int) -> Iterator[list[tuple[int, object]]]:
    """Batches of (row number, record): line numbers for JSON lines, 1-based positions otherwise.
    A file that is not what its name says (a .gz that is not gzip, a .parquet that is not Parquet,
    a CSV that is not UTF-8) fails with one line naming the file."""
    import pyarrow as pa

    kind = source_type(source)
    path = source.path  # relative paths are relative to the working directory, like any CLI path
    file = Path(path)
    if kind in ("jsonl", "json", "parquet", "csv") and not file.is_file():
        raise ValueError(f"{path}: source file not found (cwd {Path.cwd()})")
    try:
        if kind == "jsonl":
            with _open_binary(file) as handle:
                yield from _batched(_json_lines(path, handle), batch_rows)
        elif kind == "json":
            yield from _batched(_json_file(path, file), batch_rows)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            position = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows):
                records = batch.to_pylist()
                yield list(enumerate(records, start=position + 1))
                position += len(records)
        elif kind == "csv":
            yield from _batched(enumerate(_csv_file(file), start=1), batch_rows)
        else:
            yield from _batched(enumerate(_datasets_rows(source, kind, batch_rows), start=1), batch_rows)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({_first_line(exc)})") from None
    except (UnicodeDecodeError, pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        if kind == "csv" and (not_utf8 := _first_non_utf8(path, file)) is not None:
            raise not_utf8 from None
        what = {"parquet": "a Parquet file", "csv": "CSV"}.get(kind, f"a {kind} source")
        raise ValueError(f"{path}: cannot read as {what} ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- schemas


def is_placeholder_input(text: str) -> bool:
    return re.sub(r"[\s<>]", "", text.lower()).removesuffix(".") in PLACEHOLDER_INPUTS


def hh_turns(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str]:
    """posttrain.transcripts.hh_turns, with a mismatch quarantined as `prompt_mismatch` and a
    transcript without any assistant turn as `no_final_reply`."""
    if transcripts.HH_ASSISTANT not in chosen or transcripts.HH_ASSISTANT not in rejected:
        raise Unusable("no_final_reply")
    try:
        return transcripts.hh_turns(chosen, rejected)
    except transcripts.PromptMismatch:
        raise Unusable("prompt_mismatch") from None


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of an hh-rlhf pair (posttrain.transcripts.hh_turns)."""
    turns, chosen_reply, rejected_reply = hh_turns(chosen, rejected)
    return transcript_text(turns), chosen_reply, rejected_reply


class _Fields:
    """Reads a record's fields by their format names, through the source's `fields` map."""

    def __init__(self, record, source: SourceConfig, where: str):
        self.context = f"format {source.format}" if source.format != source.role else f"role {source.role}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {_type_name(record)} ({self.context})")
        self.record, self.names, self.where = record, source.fields, where

    def text(self, name: str, optional: bool = False) -> str:
        column = self.names.get(name, name)
        value = self.record.get(column)
        if value is None and optional:
            return ""
        if column not in self.record:
            raise ValueError(f"{self.where}: missing key {column!r} ({self.context})")
        if not isinstance(value, str):
            raise ValueError(f"{self.where}: key {column!r} must be a string, got {_type_name(value)} ({self.context})")
        return value

    def turns(self) -> list[tuple[str, str]]:
        column = self.names.get("messages", "messages")
        value = self.record.get(column)
        if isinstance(value, str) and value.lstrip().startswith("["):  # a chat stored as JSON text (CSV)
            value = json.loads(value)
        if column not in self.record:
            raise ValueError(f"{self.where}: missing key {column!r} ({self.context})")
        if not isinstance(value, list):
            raise ValueError(f"{self.where}: key {column!r} must be a list of turns, got {_type_name(value)} ({self.context})")
        role_key, content_key = self.names.get("role", "role"), self.names.get("content", "content")
        turns = []
        for position, turn in enumerate(value):
            at = f"{self.where}: {column}[{position}]"
            if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
                raise ValueError(f"{at} must be an object with a string {content_key!r} ({self.context})")
            role = TURN_ROLES.get(str(turn.get(role_key)).lower())
            if role is None:
                raise ValueError(f"{at}: {role_key!r} must be one of {', '.join(TURN_ROLES)}, got {turn.get(role_key)!r} ({self.context})")
            turns.append((role, turn[content_key]))
        return turns


def to_role_record(record, source: SourceConfig, where: str, removals: Removals) -> dict:
    """The role fields (+ "skill") of one record; raises ValueError (schema) or Unusable (rule).

    alpaca       prompt = instruction, + "\\n\\n" + input unless the input is empty or a placeholder
                 ("No input", "<noinput>", "N/A", …: counted as `placeholder_input`); response = output
    messages     response = the last turn, which must be the assistant's (else `no_final_reply`);
                 prompt = the turns before it (transcript_text, for dedup and decontamination);
                 a chat with more than one exchange or a system prompt also keeps `messages`
    hh           split_hh on the chosen and rejected transcripts; a multi-turn prompt keeps `messages`
    instruction, preference, prompt   the role's own fields
    """
    fields = _Fields(record, source, where)
    if source.format == "alpaca":
        instruction, given = fields.text("instruction"), normalize_text(fields.text("input", optional=True))
        placeholder = bool(given) and is_placeholder_input(given)
        removals.count("placeholder_input", int(placeholder))
        prompt = instruction if not given or placeholder else f"{instruction}\n\n{given}"
        kept = {"prompt": prompt, "response": fields.text("output")}
    elif source.format == "messages":
        turns = fields.turns()
        if not turns or turns[-1][0] != "assistant":
            raise Unusable("no_final_reply")
        kept = {"prompt": transcript_text(turns[:-1]) if turns[:-1] else "", "response": turns[-1][1]}
        if len(turns) > 2 or turns[0][0] != "user":
            # Several turns or a system prompt: the turns themselves are kept, so training renders
            # them with the model's chat template and learns every assistant reply.
            kept["messages"] = [{"role": role, "content": content} for role, content in turns]
    elif source.format == "hh":
        turns, chosen, rejected = hh_turns(fields.text("chosen"), fields.text("rejected"))
        kept = {"prompt": transcript_text(turns), "chosen": chosen, "rejected": rejected}
        if len(turns) > 1:  # a conversation: its turns are rendered with the chat template before the reply
            kept["messages"] = [{"role": role, "content": content.strip()} for role, content in turns]
    else:
        kept = {key: fields.text(key) for key in ROLE_FIELDS[source.role]}
    if "skill" in record:
        if not isinstance(record["skill"], str):
            raise ValueError(f"{where}: key 'skill' must be a string, got {_type_name(record['skill'])} ({fields.context})")
        kept["skill"] = record["skill"]
    return kept


# ----------------------------------------------------------------------------- sources


def generated_source(source: SourceConfig, index: int, out_dir: Path) -> tuple[SourceConfig, dict]:
    """Write a generated source under raw/ (so the raw input travels with the artifact); return
    it as a JSON-lines source and its planted-noise counts."""
    spec = source.generate
    noise = {key: getattr(spec, key) for key in ("exact_duplicates", "near_duplicates", "empty", "overlong")}
    records, planted = skills.generate_rows(source.role, rows=spec.rows, seed=spec.seed, skills=spec.skills, **noise)
    name = f"raw/{index}-{source.role}.jsonl"
    write_jsonl(out_dir / name, records)
    counts = {key: getattr(planted, key) for key in noise}
    return SourceConfig(path=str(out_dir / name), role=source.role, type="jsonl"), counts


@dataclass
class RawBatch:
    """Records of one source as read, before their schema is mapped (map_batch); row ids are
    `first_id`, `first_id + 1`, … in order."""

    source: SourceConfig
    name: str  # how rejected.jsonl and error messages name the source
    first_id: int
    row_numbers: list[int]
    records: list

    def split(self, parts: int) -> list[RawBatch]:
        """The batch in `parts` consecutive pieces of nearly equal size (fewer if it is short)."""
        size = max(1, -(-len(self.records) // parts))
        return [
            RawBatch(self.source, self.name, self.first_id + lo, self.row_numbers[lo : lo + size], self.records[lo : lo + size])
            for lo in range(0, len(self.records), size)
        ] or [self]

    def row(self, position: int, record: dict | None = None) -> Row:
        return Row(self.source.role, {} if record is None else record, self.records[position], self.name, self.row_numbers[position], self.first_id + position)


def read_raw_batches(source: SourceConfig, name: str, batch_rows: int, origins: Origins) -> Iterator[RawBatch]:
    """Records of one source, `batch_rows` at a time, each given a row id in `origins`."""
    origins.start_source(name)
    # A `fields` entry that names a column no row has would otherwise read as an empty optional
    # field (alpaca's input) in every row: silent loss. Checked once the whole source is read.
    # (`role` and `content` name keys inside each turn, which turns() checks turn by turn.)
    unseen_columns = {column: field for field, column in source.fields.items() if field not in ("role", "content")}
    records_read = 0
    for batch in read_records(source, batch_rows):
        records_read += len(batch)
        first_id = len(origins)
        row_numbers = [row_number for row_number, _ in batch]
        for row_number in row_numbers:
            origins.add(row_number)
        records = [record for _, record in batch]
        if unseen_columns:
            for record in records:
                if isinstance(record, dict):
                    for column in [column for column in unseen_columns if column in record]:
                        del unseen_columns[column]
        yield RawBatch(source, name, first_id, row_numbers, records)
    if records_read == 0:
        raise ValueError(f"{name}: no rows (an empty source; remove it from data.sources or fill it)")
    if unseen_columns:
        column, field = next(iter(unseen_columns.items()))
        raise ValueError(f"{name}: fields maps {field!r} to column {column!r}, which no row of the source has")


def map_batch(batch: RawBatch, removals) -> list[dict | str]:
    """Per record its role record (to_role_record), or the rule that makes it unusable; a record
    that does not fit the schema raises ValueError naming the source and row. `removals` counts
    what mapping rewrites (`count("placeholder_input", n)`): Removals, or a worker's collector."""
    source, name = batch.source, batch.name
    mapped = []
    for row_number, record in zip(batch.row_numbers, batch.records):
        try:
            mapped.append(to_role_record(record, source, f"{name} row {row_number}", removals))
        except Unusable as unusable:
            mapped.append(unusable.rule)
    return mapped


def read_batches(
    source: SourceConfig, name: str, batch_rows: int, origins: Origins, removals: Removals
) -> Iterator[list[Row]]:
    """Rows of one source, `batch_rows` at a time, each with its row id; unusable records go to
    `removals` with their rule and never reach the caller."""
    for batch in read_raw_batches(source, name, batch_rows, origins):
        rows = []
        for position, kept in enumerate(map_batch(batch, removals)):
            if isinstance(kept, str):
                removals.add(kept, batch.row(position))
            else:
                rows.append(batch.row(position, kept))
        yield rows
