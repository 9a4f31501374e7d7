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

import functools
import json
import os
import re
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parent
SEVERITIES = ("critical", "warning")
DOCS_SITE = "data_docs"
UNUSED_DOCS_IMAGES = ("glossary_scroller.gif", "validation_failed_unexpected_values.gif", "iterative-dev-loop.png")
_DOCS_BUILD_STAMP = re.compile(r"\?d=\d{8}T\d{6}\.\d+Z")
_TIMESTAMP = re.compile(r"\d{8}T\d{6}\.\d+Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FIXED_RUN_TIME = "20000101T000000.000000Z"


def reproducible(text: str) -> str:
    """GX output without what changes between identical runs: build and load timestamps, and
    random UUIDs (expectation ids, HTML element ids) — each replaced by a counter in order of first
    appearance, so an id and its references still match."""
    text = _TIMESTAMP.sub(FIXED_RUN_TIME, _DOCS_BUILD_STAMP.sub("", text))
    numbers: dict[str, str] = {}
    return _UUID.sub(lambda match: numbers.setdefault(match.group(0), f"00000000-0000-0000-0000-{len(numbers):012x}"), text)


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


def import_gx():
    # Must be set before the import: GX reads it at import time to decide on usage statistics.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    _compile_docs_templates()
    return gx


@functools.cache
def _compile_docs_templates() -> None:
    """Compile GX's Data Docs templates once per process, like an import.

    GX makes a new jinja Environment for every view it renders, and jinja caches compiled
    templates per Environment, so every Data Docs build compiled GX's ~50 templates again (0.13 s
    of the data stage's 0.2 s of docs on the CPU box). Every view now gets one in-memory bytecode
    cache, keyed by jinja's own bucket key (template name and source checksum)."""
    import jinja2
    from great_expectations.render.view import view

    class CompiledTemplates(jinja2.BytecodeCache):
        def __init__(self) -> None:
            self.code: dict[str, bytes] = {}

        def load_bytecode(self, bucket) -> None:
            if bucket.key in self.code:
                bucket.bytecode_from_string(self.code[bucket.key])

        def dump_bytecode(self, bucket) -> None:
            self.code[bucket.key] = bucket.bytecode_to_string()

    cache, make_view = CompiledTemplates(), view.DefaultJinjaView.__init__

    def make_view_with_cache(self, *args, **kwargs) -> None:
        make_view(self, *args, **kwargs)
        self.env.bytecode_cache = cache

    view.DefaultJinjaView.__init__ = make_view_with_cache
    environment = view.DefaultJinjaView().env
    for name in environment.list_templates(filter_func=lambda name: name.endswith((".j2", ".html"))):
        environment.get_template(name)


def _build_suite(gx, spec: dict, path: Path):
    """An ExpectationSuite from the JSON, failing loudly on a bad expectation.

    GX's own `ExpectationSuite(expectations=[dict, ...])` logs an invalid expectation and silently
    drops it — a typo would turn a contract off. Building each one ourselves raises instead.
    """
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

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


class ContractRun:
    """Several suites validated in one GX context, with an optional Data Docs site.

        contracts = ContractRun(out_dir, docs_dir=out_dir / "data_docs")
        summary = contracts.validate(frame, "sft_tokenized")     # never raises on a failed expectation
        contracts.build_docs()                                  # data_docs/index.html, offline
        contracts.raise_first_violation()                       # then stop the flow, if any failed

    Validation results go to `<out_dir>/contracts/<suite>.json` either way. Data Docs are built
    from the results of this run only (the context is ephemeral) and carry no timestamp, so the
    same data gives the same HTML. The pages load their CSS/JS from public CDNs: offline they
    render unstyled but complete.
    """

    def __init__(self, out_dir: Path, docs_dir: Path | None = None):
        self.out_dir, self.docs_dir = Path(out_dir), Path(docs_dir) if docs_dir else None
        self.gx = import_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = self.gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars per suite flood the logs
        if self.docs_dir is not None:
            site = {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(self.docs_dir)},
            }
            self.context.add_data_docs_site(site_name=DOCS_SITE, site_config=site)
        self.summaries: list[dict] = []

    def validate(self, frame, suite_name: str) -> dict:
        """Validate `frame` against `data_contracts/<suite_name>.json`; return a summary dict.

        Summary: {"suite", "rows", "evaluated", "passed", "failed": {label: {"severity",
        "unexpected", "rows", "observed", "error"}}, "critical_failed", "warnings_failed",
        "results_path", "violation"} — `violation` is the one-line message of the first failed
        critical expectation (in suite order), or None.
        """
        import datetime

        from great_expectations.core.run_identifier import RunIdentifier

        spec = load_suite(suite_name)
        suite = self.context.suites.add(_build_suite(self.gx, spec, SUITES_DIR / f"{suite_name}.json"))
        batch_definition = (
            self.context.data_sources.add_pandas(suite_name)
            .add_dataframe_asset(name="frame")
            .add_batch_definition_whole_dataframe("whole_frame")
        )
        definition = self.context.validation_definitions.add(
            self.gx.ValidationDefinition(data=batch_definition, suite=suite, name=suite_name)
        )
        # A fixed run time: the results file and the Data Docs paths stay the same between identical runs.
        run_id = RunIdentifier(run_name=suite_name, run_time=datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY", run_id=run_id)

        results_path = self.out_dir / "contracts" / f"{suite_name}.json"
        results_path.parent.mkdir(parents=True, exist_ok=True)
        written = result.to_json_dict()
        # Without the load time and GX's random ids the results file (and so the data artifact's
        # digest) is the same for the same data.
        written.get("meta", {}).get("batch_markers", {}).pop("ge_load_time", None)
        results_path.write_text(reproducible(json.dumps(written, indent=2, sort_keys=True, default=str)))

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
        violation = None
        if critical:
            more = f" (+{len(critical) - 1} more critical; see {results_path})" if len(critical) > 1 else ""
            violation = f"data contract {suite_name}: {_describe_failure(critical[0], failed[critical[0]])}{more}"
        summary = {
            "suite": suite_name,
            "rows": len(frame),
            "evaluated": len(ordered),
            "passed": sum(1 for item in ordered if item.success),
            "failed": failed,
            "critical_failed": len(critical),
            "warnings_failed": len(failed) - len(critical),
            "results_path": str(results_path),
            "violation": violation,
        }
        self.summaries.append(summary)
        return summary

    def build_docs(self) -> Path | None:
        """Write the Data Docs site (index.html at the root of docs_dir); None without a docs_dir."""
        if self.docs_dir is None:
            return None
        self.context.build_data_docs(site_names=[DOCS_SITE])
        for name in UNUSED_DOCS_IMAGES:  # 3.4 MB of help-page animations no page of ours shows
            (self.docs_dir / "static" / "images" / name).unlink(missing_ok=True)
        for page in self.docs_dir.rglob("*.html"):
            page.write_text(reproducible(page.read_text(encoding="utf-8")), encoding="utf-8")
        return self.docs_dir / "index.html"

    def raise_first_violation(self) -> None:
        for summary in self.summaries:
            if summary["violation"]:
                raise ContractViolation(summary["violation"])


def validate(frame, suite_name: str, out_dir: Path) -> dict:
    """One suite, no Data Docs; raises ContractViolation naming the first failed critical expectation."""
    contracts = ContractRun(out_dir)
    summary = contracts.validate(frame, suite_name)
    contracts.raise_first_violation()
    return summary
