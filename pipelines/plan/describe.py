"""The plan as ``vlpipe plan`` prints it: how each step runs, the stages, their columns, the schema."""

from __future__ import annotations

from operators.stage import Stage
from pipelines.execute.executor import Executor
from pipelines.execute.steps import Pass
from pipelines.plan.build import Plan


def describe(plan: Plan, executor: Executor, in_process: str | None = None) -> str:
    """Stages, how ``executor`` runs them (in this process for the reason ``in_process`` gives), columns, schema."""
    lines = [f"in this process, no Ray ({in_process})"] if in_process else []
    for number, run_pass in enumerate(plan.passes, 1):
        if len(plan.passes) > 1:
            lines.append(f"pass {number} ({_pass_note(number, run_pass, number == len(plan.passes))})")
        lines += executor.describe(run_pass)
    lines.append("")
    for stage in plan.stages:
        lines += _describe_stage(stage)
    lines += ["", "output schema:"] + [f"  {f.name:<22} {f.type}" for f in plan.output_schema]
    return "\n".join(lines)


def _pass_note(number: int, run_pass: Pass, last: bool) -> str:
    reads = "reads the input" if number == 1 else f"reads pass {number - 1}'s staged rows back"
    if last:
        return reads
    return f"{reads}, ends at the whole-run stage {run_pass.aggregate.name!r}"


def _describe_stage(stage: Stage) -> list[str]:
    model = stage.model
    lines = [
        f"{stage.name} [{stage.kind}]"
        + (f"  model {model.source}" + (f"@{model.revision}" if model.revision else "") if model else "")
    ]
    if stage.reads:
        lines.append(f"    reads  {', '.join(stage.reads)}")
    if stage.adds:
        lines.append(f"    adds   {', '.join(stage.adds)}")
    lines += [f"    {detail}" for detail in stage.details]
    return lines
