"""The gate's decision rules, one at a time, and the lineage walk that finds a reward-hacking flag."""

from __future__ import annotations

import json

from posttrain.gate import decide, hacking_flags


def test_promotes_only_a_better_clean_candidate_within_its_quantization_budget():
    assert decide(0.8, None, 0.0, None, 0.02, []).promote  # no champion yet
    assert decide(0.8, 0.7, 0.05, 0.79, 0.02, []).promote
    worse = decide(0.7, 0.8, 0.0, None, 0.02, [])
    assert not worse.promote and "does not beat the champion" in worse.reason
    tie = decide(0.8, 0.8, 0.0, None, 0.02, [])
    assert not tie.promote  # a tie keeps the champion
    short = decide(0.82, 0.8, 0.05, None, 0.02, [])
    assert not short.promote and "margin 0.0500" in short.reason
    budget = decide(0.9, 0.5, 0.0, 0.85, 0.02, [])
    assert not budget.promote and budget.reason == "its quantized variant drops 0.0500 (budget 0.0200)"
    # A loss is better lower: the direction follows the metric.
    assert decide(0.30, 0.35, 0.01, 0.305, 0.02, [], metric="completion_loss").promote
    assert not decide(0.35, 0.30, 0.0, None, 0.02, [], metric="completion_loss").promote
    lossy = decide(0.30, 0.35, 0.0, 0.40, 0.02, [], metric="completion_loss")
    assert not lossy.promote and lossy.reason == "its quantized variant drops 0.1000 (budget 0.0200)"
    flagged = decide(0.99, 0.1, 0.0, 0.99, 0.02, ["align-ppo (store/align-ppo/ab)"])
    assert not flagged.promote and flagged.reason.startswith("reward hacking flagged")


def test_hacking_flags_follow_the_inputs_through_the_store(tmp_path):
    def manifest(path: str, stage: str, inputs: dict, flag: bool = False) -> None:
        folder = tmp_path / path
        folder.mkdir(parents=True)
        body = {"stage": stage, "path": path, "inputs": {name: {"path": p, "digest": "x"} for name, p in inputs.items()}}
        if flag:
            body["reward_hacking"] = {"flag": True, "proxy_delta": 0.4, "gold_delta": -0.2, "window": 20}
        (folder / "manifest.json").write_text(json.dumps(body))

    manifest("store/base/a", "base", {})
    manifest("store/sft/b", "sft", {"base": "store/base/a"})
    manifest("store/align-ppo/c", "align-ppo", {"sft": "store/sft/b"}, flag=True)
    manifest("store/distill/d", "distill", {"teacher": "store/align-ppo/c"})
    assert hacking_flags(tmp_path, "store/sft/b") == []
    assert hacking_flags(tmp_path, "store/distill/d") == ["align-ppo (store/align-ppo/c)"]  # a student of a hacked teacher
