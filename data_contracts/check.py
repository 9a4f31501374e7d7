"""Run one data-contract suite (a JSON file next to this module) on a pandas frame.

    summary = validate(frame, "instruction_clean", out_dir)   # writes out_dir/contracts/instruction_clean.json

Each expectation carries `meta.severity`: a failed "critical" one raises `ContractViolation` with
one line (`data contract instruction_clean: expect_column_value_lengths_to_be_between(response)
failed on 3 of 1200 rows`); a failed "warning" only goes into the summary. The data stage calls
this before it returns, so a broken edge stops the flow before any training starts.

Great Expectations 1.x, ephemeral context (nothing written outside `out_dir`). It is imported
lazily: the import alone takes seconds, and most callers of this package only build frames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parent
SEVERITIES = ("critical", "warning")


class ContractViolation(ValueError):
    """A failed critical expectation, said in one line."""


def suite_names() -> list[str]:
    return sorted(path.stem for path in SUITES_DIR.glob("*.json"))


def load_suite(name: str) -> dict:
    """The suite's JSON, checked for what GX does not check: every expectation has a severity."""
    path = SUITES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"data contract {name}: no suite file {path} (available: {', '.join(suite_names())})")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    for position, expectation in enumerate(spec.get("expectations", [])):
        severity = expectation.get("meta", {}).get("severity")
        if severity not in SEVERITIES:
            raise ValueError(f"{path} expectation {position}: meta.severity must be one of {SEVERITIES}, got {severity!r}")
    if not spec.get("expectations"):
        raise ValueError(f"{path}: a suite needs at least one expectation")
    return spec


def expectation_label(expectation_type: str, kwargs: dict) -> str:
    """`expect_column_values_to_be_unique(dedup_key)`: the type plus the column(s) it looks at."""
    columns = kwargs.get("column") or kwargs.get("column_list") or [kwargs[k] for k in ("column_A", "column_B") if k in kwargs]
    if isinstance(columns, list):
        columns = ",".join(columns)
    return f"{expectation_type}({columns})" if columns else expectation_type


def _import_gx():
    # Must be set before the import: GX reads it at import time to decide on usage statistics.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    return gx


def _build_suite(gx, spec: dict, path: Path):
    """An ExpectationSuite from the JSON, failing loudly on a bad expectation.

    GX's own `ExpectationSuite(expectations=[dict, ...])` logs an invalid expectation and silently
    drops it — a typo would turn a contract off. Building each one ourselves raises instead.
    """
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = []
    for position, item in enumerate(spec["expectations"]):
        meta = {**item.get("meta", {}), "position": position}
        try:
            configuration = ExpectationConfiguration(
                type=item["type"], kwargs=item.get("kwargs", {}), meta=meta, severity=meta["severity"]
            )
            expectations.append(configuration.to_domain_obj())
        except Exception as exc:  # GX raises a zoo of types here (not found, pydantic, config errors)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path} expectation {position} ({item.get('type')}): {first_line}") from exc
    return gx.ExpectationSuite(name=spec["name"], expectations=expectations, meta=spec.get("meta"))


def _exception_message(exception_info: dict) -> str | None:
    """GX reports exceptions either flat or keyed by metric id; return the first message."""
    if exception_info.get("raised_exception"):
        return exception_info.get("exception_message")
    for value in exception_info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message")
    return None


def _describe_failure(label: str, outcome: dict) -> str:
    if outcome["unexpected"] is not None and outcome["rows"] is not None:
        return f"{label} failed on {outcome['unexpected']} of {outcome['rows']} rows"
    if outcome["error"]:
        return f"{label} failed: {outcome['error']}"
    if outcome["observed"] is not None:
        return f"{label} failed (observed {outcome['observed']!r})"
    return f"{label} failed"


def validate(frame, suite_name: str, out_dir: Path) -> dict:
    """Validate `frame` against `data_contracts/<suite_name>.json`; return a summary dict.

    Summary: {"suite", "rows", "evaluated", "passed", "failed": {label: {"severity", "unexpected",
    "rows", "observed", "error"}}, "critical_failed", "warnings_failed", "results_path"}.
    Raises ContractViolation naming the first failed critical expectation (in suite order).
    """
    spec = load_suite(suite_name)
    path = SUITES_DIR / f"{suite_name}.json"
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite = _build_suite(gx, spec, path)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars per suite flood the logs
    batch_definition = (
        context.data_sources.add_pandas(suite_name)
        .add_dataframe_asset(name="frame")
        .add_batch_definition_whole_dataframe("whole_frame")
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format="SUMMARY")

    results_path = Path(out_dir) / "contracts" / f"{suite_name}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    written = result.to_json_dict()
    # The load timestamp is the only part that changes between identical runs; without it the
    # results file (and so the data artifact's digest) is reproducible.
    written.get("meta", {}).get("batch_markers", {}).pop("ge_load_time", None)
    results_path.write_text(json.dumps(written, indent=2, sort_keys=True, default=str))

    # GX returns results in its own order; sort back to the suite's so "first failure" is stable.
    ordered = sorted(result.results, key=lambda item: item.expectation_config.meta["position"])
    failed: dict[str, dict] = {}
    for item in ordered:
        if item.success:
            continue
        config = item.expectation_config
        label = expectation_label(config.type, {k: v for k, v in config.kwargs.items() if k != "batch_id"})
        if label in failed:
            label = f"{label}#{config.meta['position']}"
        failed[label] = {
            "severity": config.meta["severity"],
            "unexpected": item.result.get("unexpected_count"),
            "rows": item.result.get("element_count"),
            "observed": item.result.get("observed_value"),
            "error": _exception_message(item.exception_info or {}),
        }
    critical = [label for label, outcome in failed.items() if outcome["severity"] == "critical"]
    summary = {
        "suite": suite_name,
        "rows": int(len(frame)),
        "evaluated": len(ordered),
        "passed": sum(1 for item in ordered if item.success),
        "failed": failed,
        "critical_failed": len(critical),
        "warnings_failed": len(failed) - len(critical),
        "results_path": str(results_path),
    }
    if critical:
        more = f" (+{len(critical) - 1} more critical; see {results_path})" if len(critical) > 1 else ""
        raise ContractViolation(f"data contract {suite_name}: {_describe_failure(critical[0], failed[critical[0]])}{more}")
    return summary
