"""Conversations as text: hh-rlhf transcripts split into turns and replies, and turns flattened
into one canonical prompt string (what dedup and decontamination compare).

    turns, chosen, rejected = hh_turns(row["chosen"], row["rejected"])
    transcript_text(turns)     # "Why is the sky blue?"  or  "User: …\\n\\nAssistant: …\\n\\nUser: …"

Shared by the data stage (hh sources, chat sources) and the benchmarks (the held-out hh slice).
"""

from __future__ import annotations

import re

TURN_LABELS = {"user": "User", "assistant": "Assistant", "system": "System"}
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class PromptMismatch(ValueError):
    """The two hh transcripts do not share the conversation before their final replies."""


def transcript_text(turns: list[tuple[str, str]]) -> str:
    """A prompt in canonical text: a lone user turn is itself; a conversation is its turns as
    "User: …" / "Assistant: …" / "System: …" paragraphs. Dedup and decontamination read it; a
    multi-turn row is rendered for training from its `messages`."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1].strip()
    return "\n\n".join(f"{TURN_LABELS[role]}: {content.strip()}" for role, content in turns)


def common_prefix_length(a: str, b: str) -> int:
    """len(os.path.commonprefix([a, b])) by bisection on slice comparisons (done in C): the shared
    prompt of an hh pair is hundreds of characters, which commonprefix walks one by one in Python."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo] holds; a[:hi + 1] == b[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def hh_turns(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str]:
    """(prompt turns, chosen reply, rejected reply) of an hh-rlhf pair.

    The prompt is the text both transcripts share, cut back to its last "\\n\\nAssistant:"; the
    replies are what follows. For nearly every pair that is simply each transcript's last
    assistant turn; it also keeps pairs where one reply itself contains an "Assistant:" line (a
    transcript's last marker is then inside the reply). A reply that contains a human turn means
    the two transcripts differ before the final reply: PromptMismatch.
    """
    cut = chosen[: common_prefix_length(chosen, rejected)].rfind(HH_ASSISTANT)
    if cut < 0:
        raise PromptMismatch("the transcripts share no prompt")
    replies = chosen[cut + len(HH_ASSISTANT) :], rejected[cut + len(HH_ASSISTANT) :]
    if any(HH_HUMAN in reply for reply in replies):
        raise PromptMismatch("the transcripts differ before the final reply")
    parts = _HH_TURN.split(chosen[:cut])
    turns = [("user", parts[0])] if parts[0].strip() else []
    turns += [("user" if label == "Human" else "assistant", text) for label, text in zip(parts[1::2], parts[2::2])]
    return turns, replies[0].strip(), replies[1].strip()
