"""The cutover state machine: phases, the steps of a switch, and what may happen next.

A *switch* moves the primary role from one database to the other: ``cutover`` from
the source to the target, ``rollback`` back. Both run the same steps, in order; each
step is recorded in the migration state once it is done, so a crash leaves a state
from which the switch either resumes (``--resume``) or, before ``commit``, aborts.

Which side is writable follows from the record alone (:func:`writable`): the old
primary until ``freeze``, neither until ``unfreeze``, the new primary from then on.
Before ``commit`` an abort is the way back (unfence the old primary); from ``commit``
on the switch only goes forward, and ``rollback`` is the way back. This module has no
I/O: the engine (:mod:`cdcsync.engine.switch`) carries out the steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Literal

Side = Literal["source", "target"]
Direction = Literal["forward", "reverse"]


class Phase(enum.StrEnum):
    """The migration's committed phase (``migration.phase`` in the state schema)."""

    SNAPSHOT = "snapshot"  # the snapshot is running
    STREAMING = "snapshotted"  # source primary, forward stream applied to the target
    CUT_OVER = "cut_over"  # target primary, reverse stream applied to the old source
    FINALIZED = "finalized"  # the move is final; replication torn down


class Kind(enum.StrEnum):
    CUTOVER = "cutover"
    ROLLBACK = "rollback"


class Step(enum.StrEnum):
    """The steps of a switch, in the order they run."""

    PREFLIGHT = "preflight"  # gates checked, nothing changed
    FREEZE = "freeze"  # pool paused, old primary fenced (both sides now reject writes)
    DRAIN = "drain"  # every change committed on the old primary is applied
    VERIFY = "verify"  # the two sides compared under the freeze
    SEQUENCES = "sequences"  # new primary's sequences set from the old primary's
    PREPARE = "prepare"  # publication and slot on the new primary, still fenced
    COMMIT = "commit"  # the new phase is persisted: no abort from here on
    UNFREEZE = "unfreeze"  # new primary's fence lifted, pool repointed and resumed
    RETIRE = "retire"  # old direction's connector stopped and its slot dropped
    ARM = "arm"  # new direction's stored offsets at the topics' end, connector running
    HOOK = "hook"  # the operator's --on-switch command ran
    DONE = "done"


STEPS: tuple[Step, ...] = tuple(Step)
#: Steps during which both sides reject application writes.
FROZEN_STEPS = frozenset({Step.FREEZE, Step.DRAIN, Step.VERIFY, Step.SEQUENCES, Step.PREPARE})


def index(step: Step) -> int:
    return STEPS.index(step)


@dataclass(frozen=True)
class Switch:
    """A switch in progress (or the last one, when ``done`` is DONE)."""

    kind: Kind
    done: Step | None  # last step completed; None before preflight
    attempt: int = 1

    @property
    def finished(self) -> bool:
        return self.done == Step.DONE

    @property
    def committed(self) -> bool:
        return self.done is not None and index(self.done) >= index(Step.COMMIT)

    def next_step(self) -> Step | None:
        if self.done is None:
            return STEPS[0]
        if self.done == Step.DONE:
            return None
        return STEPS[index(self.done) + 1]

    def advance(self, step: Step) -> Switch:
        """The record after ``step`` completed; steps complete only in order."""
        expected = self.next_step()
        if step != expected:
            raise InvalidTransition(f"{self.kind} step {step} cannot follow {self.done}")
        return replace(self, done=step)


@dataclass(frozen=True)
class State:
    """Phase plus the switch record: everything the decisions below depend on."""

    phase: Phase
    switch: Switch | None = None

    @property
    def in_progress(self) -> Switch | None:
        if self.switch is None or self.switch.finished:
            return None
        return self.switch


class InvalidTransition(Exception):
    """A command or step that the current state does not allow."""


def old_primary(kind: Kind) -> Side:
    return "source" if kind == Kind.CUTOVER else "target"


def new_primary(kind: Kind) -> Side:
    return "target" if kind == Kind.CUTOVER else "source"


def kind_from(phase: Phase) -> Kind:
    """The switch that leaves ``phase``."""
    if phase == Phase.STREAMING:
        return Kind.CUTOVER
    if phase == Phase.CUT_OVER:
        return Kind.ROLLBACK
    raise InvalidTransition(f"no switch leaves phase {phase}")


def phase_after(kind: Kind) -> Phase:
    return Phase.CUT_OVER if kind == Kind.CUTOVER else Phase.STREAMING


def begin(state: State, kind: Kind, *, resume: bool = False) -> State:
    """The state a ``cutover``/``rollback`` command starts from, or why it may not run."""
    current = state.in_progress
    if current is not None:
        if current.kind != kind:
            raise InvalidTransition(
                f"a {current.kind} is in progress (last step {current.done or 'none'}): "
                f"finish it with `cdcsync {current.kind} --resume`"
                + ("" if current.committed else " or undo it with `cdcsync abort`")
            )
        if not resume:
            raise InvalidTransition(
                f"a {kind} is already in progress (last step {current.done or 'none'}): "
                f"run `cdcsync {kind} --resume`"
                + ("" if current.committed else " or `cdcsync abort`")
            )
        return state
    if resume:
        raise InvalidTransition(f"no {kind} to resume")
    expected = Phase.STREAMING if kind == Kind.CUTOVER else Phase.CUT_OVER
    if state.phase != expected:
        raise InvalidTransition(f"{kind} needs phase {expected}, the migration is in {state.phase}")
    attempt = state.switch.attempt + 1 if state.switch is not None else 1
    return State(state.phase, Switch(kind, None, attempt))


def complete(state: State, step: Step) -> State:
    """The state after ``step`` of the switch in progress; COMMIT flips the phase."""
    current = state.in_progress
    if current is None:
        raise InvalidTransition(f"step {step} outside a switch")
    switch = current.advance(step)
    phase = phase_after(current.kind) if step == Step.COMMIT else state.phase
    return State(phase, switch)


def can_abort(state: State) -> bool:
    current = state.in_progress
    return current is not None and not current.committed


def abort(state: State) -> State:
    """Back to where the switch started: the old primary writable, nothing switched."""
    current = state.in_progress
    if current is None:
        raise InvalidTransition("nothing to abort: no cutover or rollback is in progress")
    if current.committed:
        raise InvalidTransition(
            f"the {current.kind} is committed (the new primary is {new_primary(current.kind)}): "
            f"finish it with `cdcsync {current.kind} --resume`; then "
            + (
                "`cdcsync rollback` is the way back"
                if current.kind == Kind.CUTOVER
                else "cut over again"
            )
        )
    return State(state.phase, None)


def can_finalize(state: State) -> bool:
    return state.phase == Phase.CUT_OVER and state.in_progress is None


def finalize(state: State) -> State:
    if not can_finalize(state):
        raise InvalidTransition(
            f"finalize needs a finished cutover (phase {Phase.CUT_OVER}, nothing in progress); "
            f"the migration is in {state.phase}"
            + (f" with a {state.in_progress.kind} in progress" if state.in_progress else "")
        )
    return State(Phase.FINALIZED, state.switch)


def writable(state: State) -> frozenset[Side]:
    """Which sides accept application writes in this state."""
    current = state.in_progress
    if state.phase == Phase.FINALIZED:
        return frozenset({"target"})
    if current is None:
        return frozenset({"source"} if state.phase == Phase.STREAMING else {"target"})
    if current.done is None or current.done == Step.PREFLIGHT:
        return frozenset({old_primary(current.kind)})
    if index(current.done) < index(Step.UNFREEZE):
        return frozenset()
    return frozenset({new_primary(current.kind)})


def applying(state: State) -> Direction | None:
    """Which stream the daemon applies now; None while a switch hands over.

    The old direction runs until the switch commits (the drain needs it); the new one
    starts once ``arm`` is done, after the old direction's connector is stopped, so no
    change written by one applier is ever fed back to the other.
    """
    current = state.in_progress
    if state.phase in (Phase.FINALIZED, Phase.SNAPSHOT):
        return None
    primary_dir: Direction = "forward" if state.phase == Phase.STREAMING else "reverse"
    if current is None or not current.committed:
        return primary_dir
    return primary_dir if index(current.done or Step.PREFLIGHT) >= index(Step.ARM) else None


def describe(kind: Kind) -> list[tuple[Step, str]]:
    """What each step does, for ``--dry-run`` and the report."""
    old, new = old_primary(kind), new_primary(kind)
    old_dir = "forward" if kind == Kind.CUTOVER else "reverse"
    new_dir = "reverse" if kind == Kind.CUTOVER else "forward"
    return [
        (Step.PREFLIGHT, "check the gates; change nothing"),
        (Step.FREEZE, f"pause the pool (if configured), fence every migrated table on the {old}"),
        (Step.DRAIN, f"emit a marker on the {old}, wait until the {old_dir} stream applied it"),
        (Step.VERIFY, f"compare {old} and {new} under the freeze at the chosen level"),
        (Step.SEQUENCES, f"set every sequence on the {new} from the {old}"),
        (Step.PREPARE, f"create the {new_dir} publication and slot on the {new} (still fenced)"),
        (Step.COMMIT, f"persist the new phase: the {new} is the primary; no abort from here"),
        (Step.UNFREEZE, f"lift the {new}'s fence, repoint and resume the pool"),
        (Step.RETIRE, f"stop the {old_dir} connector, drop its slot on the {old}"),
        (Step.ARM, f"start the {new_dir} connector and applier (into the {old})"),
        (Step.HOOK, "run the --on-switch command with the new primary's coordinates"),
        (Step.DONE, "report the timings"),
    ]


def parse(phase: str, switch: dict[str, object] | None) -> State:
    """The state from its persisted form (``migration.phase`` and ``data['switch']``)."""
    try:
        parsed_phase = Phase(phase)
    except ValueError:
        raise InvalidTransition(f"unknown migration phase {phase!r}") from None
    if not switch:
        return State(parsed_phase)
    done = switch.get("done")
    attempt = switch.get("attempt", 1)
    return State(
        parsed_phase,
        Switch(
            Kind(str(switch["kind"])),
            Step(str(done)) if done else None,
            int(attempt) if isinstance(attempt, int | str) else 1,
        ),
    )


def dump(state: State) -> dict[str, object] | None:
    if state.switch is None:
        return None
    return {
        "kind": str(state.switch.kind),
        "done": str(state.switch.done) if state.switch.done else None,
        "attempt": state.switch.attempt,
    }
