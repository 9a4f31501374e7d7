"""The promotion gate's decision, as a pure function, and the lineage check it relies on.

    decision = decide(candidate=0.84, champion=0.80, margin=0.01, quantized=0.83, budget=0.02, hacking=[])
    decision.promote, decision.reason
    decide(candidate=0.31, champion=0.35, ..., metric="completion_loss")   # lower is better: promotes

The candidate becomes the registered model's `champion` only if
  1. no artifact in its lineage carries a `reward_hacking` flag (the alignment stages write one
     when the proxy reward rose while the gold reward fell: the model learned the reward model's
     blind spot, not the task);
  2. its quantized variant, when the run quantized it, stays within `budget` of it on the primary
     metric (the variant is what gets deployed on small hardware);
  3. it beats the current champion — re-scored on the same benchmark version in this run, not read
     from an old tag — by more than `margin` (a tie keeps the champion); with no champion yet, 1
     and 2 suffice.
Otherwise the champion stays, and the reason says which rule held it back. "Beats" and "drops"
follow the metric's direction (posttrain.metrics.LOWER_IS_BETTER: a loss or an ECE must go down).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from posttrain.artifacts import MANIFEST
from posttrain.metrics import goodness


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    candidate: float,
    champion: float | None,
    margin: float,
    quantized: float | None,
    budget: float,
    hacking: list[str],
    metric: str = "exact_match",
) -> Decision:
    if hacking:
        return Decision(False, f"reward hacking flagged in the candidate's lineage ({', '.join(hacking)})")
    drop = goodness(metric, candidate) - goodness(metric, quantized) if quantized is not None else 0.0
    if drop > budget + 1e-12:
        return Decision(False, f"its quantized variant drops {drop:.4f} (budget {budget:.4f})")
    if champion is None:
        return Decision(True, "no champion yet")
    if not math.isfinite(champion) or goodness(metric, candidate) > goodness(metric, champion) + margin + 1e-12:
        return Decision(True, f"beats the champion: {candidate:.4f} vs {champion:.4f} (margin {margin:.4f})")
    return Decision(False, f"does not beat the champion by the margin: {candidate:.4f} vs {champion:.4f} (margin {margin:.4f})")


def hacking_flags(store_root: Path, artifact_path: str) -> list[str]:
    """Stages in the lineage of the artifact at `artifact_path` (relative to the store root) whose
    manifest sets `reward_hacking.flag`, found by following each manifest's inputs."""
    flagged, seen, pending = [], set(), [artifact_path]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        manifest_file = Path(store_root) / path / MANIFEST
        if not manifest_file.is_file():
            continue
        manifest = json.loads(manifest_file.read_text())
        if (manifest.get("reward_hacking") or {}).get("flag"):
            flagged.append(f"{manifest.get('stage', path)} ({path})")
        pending.extend(spec["path"] for spec in manifest.get("inputs", {}).values() if isinstance(spec, dict) and "path" in spec)
    return sorted(flagged)
