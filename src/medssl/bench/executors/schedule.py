"""Which runs of a plan are done, failed, blocked by a failure, or ready (dependencies finished on
disk), and the one-line report of each outcome. Every executor schedules with this."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medssl.runs import RunDir

from ..plan import Plan, PlannedRun
from .dispatch import ExecutionSummary, RunOutcome


class Schedule:
    """Which runs of a plan are done, failed, blocked by a failure, or ready (deps finished on disk)."""

    def __init__(self, plan: Plan, out: str | Path) -> None:
        self.plan = plan
        self.out = Path(out)
        self.summary = ExecutionSummary()
        self.by_id = plan.by_id()
        for run in plan.runs:
            if RunDir(run.run_dir(out)).is_finished():
                self.record(RunOutcome(run.run_id, run.kind, "already_finished"))

    def record(self, outcome: RunOutcome) -> None:
        self.summary.outcomes[outcome.run_id] = outcome

    def open_runs(self) -> list[PlannedRun]:
        return [r for r in self.plan.runs if r.run_id not in self.summary.outcomes]

    def done(self) -> bool:
        return not self.open_runs()

    def skip_blocked(self) -> list[RunOutcome]:
        """Mark runs whose dependency failed or was skipped (transitively) as skipped."""
        skipped = []
        changed = True
        while changed:
            changed = False
            for run in self.open_runs():
                for dep in run.depends_on:
                    dep_outcome = self.summary.outcomes.get(dep)
                    if dep_outcome is not None and dep_outcome.status in ("failed", "skipped"):
                        outcome = RunOutcome(
                            run.run_id, run.kind, "skipped", error=f"dependency {dep} {dep_outcome.status}"
                        )
                        self.record(outcome)
                        skipped.append(outcome)
                        changed = True
                        break
        return skipped

    def settle(self, log: Callable[[str], None]) -> None:
        """Skip the runs a failure blocks and say so."""
        for outcome in self.skip_blocked():
            report(outcome, self.by_id[outcome.run_id], log)

    def ready(self, exclude: set[str] | None = None) -> list[PlannedRun]:
        exclude = exclude or set()
        return [
            r
            for r in self.open_runs()
            if r.run_id not in exclude
            and all(RunDir(self.by_id[d].run_dir(self.out)).is_finished() for d in r.depends_on)
        ]


def report(outcome: RunOutcome, run: PlannedRun, log: Callable[[str], None]) -> None:
    if outcome.status == "finished":
        log(f"[green]finished[/] {run.describe()} ({outcome.seconds:.0f} s) {run.run_id}")
    elif outcome.status == "failed":
        log(f"[red]failed[/] {run.describe()} {run.run_id}: {outcome.error}")
    elif outcome.status == "skipped":
        log(f"[yellow]skipped[/] {run.describe()} {run.run_id}: {outcome.error}")


def print_to_console(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message)
