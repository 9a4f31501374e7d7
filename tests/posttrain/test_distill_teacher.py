"""`distill.teacher`: any model of the run teaches — the plan's wiring for each choice, and the
config errors for a teacher the run does not have. Pure: plan() is data, no flow runs."""

from pathlib import Path

import pytest

from flows.plan import needs_candidate, plan
from posttrain.config import ConfigError, load_config
from posttrain.report import choose_candidate

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _steps(overrides: list[str], candidate: str | None = None) -> dict:
    steps = plan(load_config(DEMO, overrides), candidate)
    names = [step.name for step in steps]
    for position, step in enumerate(steps):  # every input is made by an earlier step
        assert set(step.inputs.values()) <= set(names[:position]), step.name
    return {step.name: step for step in steps}


@pytest.mark.parametrize("teacher", ["sft", "base", "align-dpo", "align-ppo", "align-grpo"])
def test_a_named_teacher_is_wired_before_the_evaluations(teacher):
    steps = _steps([f"distill.teacher={teacher}", "quantize.source=sft"])
    assert steps["distill"].inputs == {"teacher": teacher, "data": "data"}
    assert steps["evaluate-student"].inputs["model"] == "distill"
    assert steps["report"].inputs["student"] == "evaluate-student"
    assert steps["report"].section.eligible is None  # unchanged: every trained model, the student included
    names = list(steps)
    assert names.index("distill") < names.index("evaluate-base")


def test_the_candidate_teaches_after_the_per_model_evaluations():
    cfg = load_config(DEMO, ["distill.teacher=candidate"])
    assert needs_candidate(cfg)
    first = _steps(["distill.teacher=candidate"])
    assert "distill" not in first and "evaluate-student" not in first and "report" not in first
    assert {"evaluate-sft", "evaluate-align-dpo", "evaluate-align-ppo", "evaluate-align-grpo"} <= set(first)

    steps = _steps(["distill.teacher=candidate"], candidate="align-ppo")
    names = list(steps)
    assert steps["distill"].inputs == {"teacher": "align-ppo", "data": "data"}
    assert names.index("evaluate-align-grpo") < names.index("distill") < names.index("evaluate-student") < names.index("report")
    assert steps["quantize"].inputs["source"] == "align-ppo"  # quantize.source: candidate, the same model
    # The report may not pick the student the candidate taught: the candidate stays the teacher's model.
    assert steps["report"].section.eligible == ["sft", "align-dpo", "align-ppo", "align-grpo"]
    assert steps["distill"].section.teacher == "candidate"  # the key holds the teacher's digest, as for every input


def test_a_candidate_teacher_defers_distill_even_when_quantize_does_not_wait():
    first = _steps(["distill.teacher=candidate", "quantize.source=sft"])
    assert "distill" not in first and "quantize" not in first
    steps = _steps(["distill.teacher=candidate", "quantize.source=student"], candidate="sft")
    assert steps["distill"].inputs["teacher"] == "sft" and steps["quantize"].inputs["source"] == "distill"


def test_the_report_never_picks_the_student_its_candidate_taught():
    eligible = _steps(["distill.teacher=candidate"], candidate="sft")["report"].section.eligible
    results = {model: {"mean": {"exact_match": score}} for model, score in (("base", 0.0), ("sft", 0.8), ("align-dpo", 0.7), ("student", 0.9))}
    assert choose_candidate(results, "best", eligible, "exact_match") == "sft"
    assert choose_candidate(results, "best", None, "exact_match") == "student"  # what a named teacher's run does


def test_a_named_teacher_needs_no_candidate():
    assert not needs_candidate(load_config(DEMO, ["quantize.source=sft"]))
    assert "report" in _steps(["quantize.source=sft"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["align.methods=[dpo]", "distill.teacher=align-ppo"], "distill.teacher: align-ppo is not a model of this run (align.methods: dpo)"),
        (["align.methods=[]", "distill.teacher=align-dpo"], "distill.teacher: align-dpo is not a model of this run (align.methods: none)"),
        (["distill.teacher=candidate", "gate.candidate=student"], "distill.teacher: candidate is chosen before student exists, but gate.candidate names it"),
        (["distill.teacher=candidate", "gate.eligible=[sft, student]"], "distill.teacher: candidate is chosen before student exists, but gate.eligible names it"),
        (["distill.teacher=reward"], "distill.teacher: Input should be 'sft', 'base', 'align-dpo', 'align-ppo', 'align-grpo' or 'candidate'"),
    ],
)
def test_a_teacher_the_run_does_not_have_is_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, overrides)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(DEMO)) and expected in message


def test_ppo_reads_the_reward_model_only_where_its_critic_or_a_reward_term_does():
    def ppo_inputs(*overrides):
        cfg = load_config("configs/smoke.yaml", list(overrides))
        return next(step for step in plan(cfg) if step.name == "align-ppo").inputs

    verifiable = "align.ppo.rewards=[{name: exact_match}]"
    assert "reward" in ppo_inputs(verifiable)  # critic_init: reward (the default)
    assert "reward" not in ppo_inputs(verifiable, "align.ppo.critic_init=policy")  # a reward-model change leaves it cached
    assert "reward" in ppo_inputs("align.ppo.critic_init=policy")  # the default reward: the reward model
