"""Steps 2-3: normalise text (NFKC, control characters, spaces, optional PII scrubbing), then drop
empty / chosen == rejected / too short / over-long rows, one batch at a time.

    normalize_batch(rows, scrub=["email", "ip"], removals=removals)   # counts pii_email, pii_ip
    kept = filter_batch(rows, config, ChatFormat(tokenizer), removals)

Token counts are what training sees: the conversation as the base tokenizer's chat template renders
it (posttrain.formatting.ChatFormat). A row whose byte-count bound (ChatFormat.length_bounds) is
within max_tokens is kept without tokenizing; the rest are tokenized in one batched call per batch
of rows, so the rows kept are exactly those full tokenization keeps. Each training stage checks its
own tokenized contract at its own max_length (data_contracts.check_tokenized), so a stage's max_length is not part of the
data stage's cache key.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from posttrain.config import DataConfig
from posttrain.formatting import ChatFormat, record_messages, token_ids
from tasks.data.records import ROLE_FIELDS, Removals, Row

# Terminal escape sequences, removed whole (removing only the ESC byte would leave "[31m" behind):
# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ST), and the two-byte escapes.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
# C0 controls except \t and \n, DEL, and C1 controls. A CR goes too, so CRLF becomes LF.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t]*\t[ \t]*| {2,}")  # tabs and runs of spaces; a lone space needs no rewrite
_INDENT = re.compile(r"(?: {2,}|[ ]*\t)")  # two spaces or a tab: one leading space is a typo, not structure
_FENCE = re.compile(r"[ \t]*(```|~~~)")

# PII patterns. Phone numbers are the risky kind (maths and dates are full of digit groups), so a
# candidate counts only with a + country code, an area code in parentheses, or the 3-3-4 layout.
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE_CANDIDATE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)")
_PHONE_3_3_4 = re.compile(r"\d{3}([ .-])\d{3}\1\d{4}")
PII_PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>"}


def normalize_text(text: str) -> str:
    """NFKC, terminal escapes and control characters out, CRLF -> LF, and spacing tidied only where
    that is safe. One line of text: runs of spaces and tabs collapsed, stripped. Several lines:
    indentation is meaning (code, nested lists), so a line indented by two spaces or a tab keeps its
    leading whitespace and its inner spacing, as does every line inside a ``` fence; other lines get
    their runs collapsed; every line loses trailing whitespace; blank lines at both ends go."""
    if not text.isascii():  # NFKC leaves ASCII as it is
        text = unicodedata.normalize("NFKC", text)  # full-width forms, ligatures, NBSP -> plain
    if text.isprintable():  # one line, no escapes, controls or tabs (most fields): decided in C
        return (_SPACES.sub(" ", text) if "  " in text else text).strip()
    if "  " not in text and "\t" not in text and text.replace("\n", "").isprintable():
        # Several lines, but no escapes, controls, tabs or runs of spaces (most multi-line fields):
        # nothing is indentation and no run needs collapsing, so only the line ends and the blank
        # lines at both ends are tidied, without a regex per line. Same result as below (tested).
        text = text.strip("\n")
        while "\n" in text and not text[: text.index("\n")].strip():
            text = text[text.index("\n") + 1 :]
        if "\n" not in text:
            return text.strip()
        lines = [line.rstrip() for line in text.rstrip().split("\n")]
        lines[0] = lines[0].lstrip()
        return "\n".join(lines)
    return _normalize_lines(text)


def _normalize_lines(text: str) -> str:
    """normalize_text after NFKC, for text that is not one plain line."""
    if "\x1b" in text:
        text = _ANSI_ESCAPE.sub("", text)
    text = _CONTROL.sub("", text)
    if "\n" in text:
        text = text.strip("\n")  # blank lines at both ends, so "    x\n" counts as one line
        while "\n" in text and not text[: text.index("\n")].strip():
            text = text[text.index("\n") + 1 :]
    if "\n" not in text:
        return _SPACES.sub(" ", text).strip()
    lines, in_fence = [], False
    for line in text.rstrip().split("\n"):
        line = line.rstrip()
        if _FENCE.match(line):
            in_fence = not in_fence
            lines.append(line)
            continue
        lines.append(line if in_fence or _INDENT.match(line) else _SPACES.sub(" ", line))
    if not _INDENT.match(lines[0]):
        lines[0] = lines[0].lstrip()
    return "\n".join(lines)


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_phone(candidate: str) -> bool:
    digits = sum(char.isdigit() for char in candidate)
    if not 9 <= digits <= 15:
        return False
    return candidate.startswith("+") or "(" in candidate or _PHONE_3_3_4.fullmatch(candidate) is not None


def scrub_pii(text: str, kinds: list[str]) -> tuple[str, dict[str, int]]:
    """`text` with each email / phone number / IP address replaced by its placeholder, and how many
    of each kind were replaced. IPs go before phones: "192.168.100.200" is not a phone number."""
    counts = {}
    if "email" in kinds:
        text, counts["email"] = _EMAIL.subn(PII_PLACEHOLDERS["email"], text)
    if "ip" in kinds:
        text, v4 = _IPV4.subn(PII_PLACEHOLDERS["ip"], text)
        found = [0]

        def ipv6(match: re.Match) -> str:
            if match.group(0).count(":") >= 2 and _is_ipv6(match.group(0)):
                found[0] += 1
                return PII_PLACEHOLDERS["ip"]
            return match.group(0)

        text = _IPV6_CANDIDATE.sub(ipv6, text)
        counts["ip"] = v4 + found[0]
    if "phone" in kinds:
        found = [0]

        def phone(match: re.Match) -> str:
            if _is_phone(match.group(0)):
                found[0] += 1
                return PII_PLACEHOLDERS["phone"]
            return match.group(0)

        text = _PHONE_CANDIDATE.sub(phone, text)
        counts["phone"] = found[0]
    return text, counts


def normalize_batch(rows: list[Row], scrub: list[str], removals: Removals) -> None:
    for row in rows:
        record = {key: normalize_text(value) if isinstance(value, str) else value for key, value in row.record.items()}
        if "messages" in record:  # a chat's turns are text too
            record["messages"] = [{**turn, "content": normalize_text(turn["content"])} for turn in record["messages"]]
        if scrub:
            for key in ROLE_FIELDS[row.role]:
                record[key], counts = scrub_pii(record[key], scrub)
                for kind, count in counts.items():
                    removals.count(f"pii_{kind}", count)
            for turn in record.get("messages", []):
                turn["content"], counts = scrub_pii(turn["content"], scrub)  # counted once, through the fields above
        row.record = record


def filter_batch(rows: list[Row], config: DataConfig, chat: ChatFormat, removals: Removals) -> list[Row]:
    """Drop empty, chosen == rejected, too short, then over-long rows (by tokens, as the model's
    chat template renders them: the whole conversation, for a pair its longer side)."""
    survivors = []
    for row in rows:
        record = row.record
        completions = [record[key] for key in ROLE_FIELDS[row.role][1:]]
        if not record["prompt"] or not all(completions):
            removals.add("empty", row)
        elif row.role == "preference" and record["chosen"] == record["rejected"]:
            removals.add("same_pair", row)
        elif min(len(text) for text in completions) < config.min_response_chars:
            removals.add("too_short", row)
        else:
            survivors.append(row)
    if not survivors:
        return []
    records = [row.record for row in survivors]
    if survivors[0].role == "preference":
        # The replies are always tokenized (two texts can be one id sequence); the prompt, the long
        # part of a chat transcript, only where its byte bound cannot clear the row.
        split = chat.split_replies(records, prompt_ids=False)
        replies = [max(len(parts["chosen_ids"]), len(parts["rejected_ids"])) for parts in split]
        contexts = [parts["prompt_text"] for parts in split]
        bounds = chat.text_bounds(contexts, [1] * len(contexts)) or [config.max_tokens + 1] * len(contexts)
        unclear = [index for index, (bound, reply) in enumerate(zip(bounds, replies)) if bound + reply > config.max_tokens]
        for index, ids in zip(unclear, token_ids(chat.tokenizer, [contexts[index] for index in unclear])):
            bounds[index] = len(ids)
        lengths = [context + reply for context, reply in zip(bounds, replies)]
        identical = [parts["chosen_ids"] == parts["rejected_ids"] for parts in split]
    else:
        reply_key = ROLE_FIELDS[survivors[0].role][1]
        # Exact counts only where the bound cannot clear a row: on Alpaca at 1,024 tokens that is
        # one row in ten; the filter keeps and drops exactly the rows full tokenization would.
        bounds = chat.record_bounds(records, reply_key) or [config.max_tokens + 1] * len(records)
        unclear = [index for index, bound in enumerate(bounds) if bound > config.max_tokens]
        lengths = list(bounds)
        exact = chat.encode_many([record_messages(records[index], reply_key) for index in unclear], max_length=1 << 30)
        for index, encoded in zip(unclear, exact):
            lengths[index] = len(encoded["input_ids"])
        identical = [False] * len(survivors)
    kept = []
    for row, longest, same in zip(survivors, lengths, identical):
        if same:
            # Different text, same ids (a character tokenizer maps every unknown character to <unk>).
            removals.add("same_pair", row, tokens_equal=True)
        elif longest > config.max_tokens:
            removals.add("overlong", row, tokens=longest)
        else:
            kept.append(row)
    return kept
