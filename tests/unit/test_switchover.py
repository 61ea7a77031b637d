"""The cutover state machine, against a model of the world its steps change.

The model applies each step's effects (the contract :mod:`cdcsync.engine.switch`
implements) to two fences, a pool, slots and connectors; hypothesis drives random
commands, crashes between or inside steps, resumes and aborts. Whatever happens, at
most one side accepts writes, a finished command leaves exactly one writable side
that agrees with the persisted state, and a direction's applier never runs while the
other direction's connector could feed it its own writes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cdcsync.core import switchover as sw
from cdcsync.core.switchover import Kind, Phase, State, Step


@dataclass
class World:
    fenced: dict[str, bool] = field(default_factory=lambda: {"source": False, "target": True})
    pool: str = "source"
    paused: bool = False
    slots: set[str] = field(default_factory=lambda: {"forward"})
    connectors: dict[str, bool] = field(default_factory=lambda: {"forward": True})

    def effect(self, kind: Kind, step: Step) -> None:
        old, new = sw.old_primary(kind), sw.new_primary(kind)
        old_dir = "forward" if kind == Kind.CUTOVER else "reverse"
        new_dir = "reverse" if kind == Kind.CUTOVER else "forward"
        if step == Step.FREEZE:
            self.paused = True
            self.fenced[old] = True
        elif step == Step.PREPARE:
            self.slots.add(new_dir)
        elif step == Step.UNFREEZE:
            self.fenced[new] = False
            self.pool = new
            self.paused = False
        elif step == Step.RETIRE:
            self.connectors[old_dir] = False
            self.slots.discard(old_dir)
        elif step == Step.ARM:
            self.connectors[new_dir] = True

    def undo(self, kind: Kind) -> None:
        old = sw.old_primary(kind)
        new_dir = "reverse" if kind == Kind.CUTOVER else "forward"
        self.fenced[old] = False
        self.paused = False
        self.slots.discard(new_dir)

    def writable(self) -> set[str]:
        return {side for side, f in self.fenced.items() if not f and not self.paused}


class Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = State(Phase.STREAMING)
        self.world = World()
        self.crashed = False

    def _run(self, steps: int, crash_inside: bool) -> None:
        """Run up to ``steps`` steps of the switch in progress; maybe crash inside one."""
        current = self.state.in_progress
        assert current is not None
        for _ in range(steps):
            nxt = current.next_step()
            if nxt is None:
                break
            self.world.effect(current.kind, nxt)
            self.state = sw.complete(self.state, nxt)
            current = self.state.switch
            assert current is not None
        if crash_inside and self.state.in_progress is not None:
            nxt = self.state.in_progress.next_step()
            assert nxt is not None
            self.world.effect(self.state.in_progress.kind, nxt)  # effect done, not recorded
        self.crashed = self.state.in_progress is not None

    @precondition(
        lambda self: self.state.in_progress is None and self.state.phase != Phase.FINALIZED
    )
    @rule(steps=st.integers(0, len(sw.STEPS)), crash_inside=st.booleans())
    def start(self, steps: int, crash_inside: bool) -> None:
        kind = sw.kind_from(self.state.phase)
        self.state = sw.begin(self.state, kind)
        self._run(steps, crash_inside)

    @precondition(lambda self: self.state.in_progress is not None)
    @rule(steps=st.integers(0, len(sw.STEPS)), crash_inside=st.booleans())
    def resume(self, steps: int, crash_inside: bool) -> None:
        current = self.state.in_progress
        assert current is not None
        self.state = sw.begin(self.state, current.kind, resume=True)
        self._run(steps, crash_inside)

    @precondition(lambda self: self.state.in_progress is not None)
    @rule()
    def abort(self) -> None:
        current = self.state.in_progress
        assert current is not None
        if not sw.can_abort(self.state):
            with pytest.raises(sw.InvalidTransition):
                sw.abort(self.state)
            return
        self.world.undo(current.kind)
        self.state = sw.abort(self.state)
        self.crashed = False

    @rule()
    def second_command_is_refused(self) -> None:
        current = self.state.in_progress
        if current is None:
            return
        for kind in Kind:
            with pytest.raises(sw.InvalidTransition):
                sw.begin(self.state, kind)

    @precondition(lambda self: self.state.in_progress is None)
    @rule()
    def finalize(self) -> None:
        if sw.can_finalize(self.state):
            self.state = sw.finalize(self.state)
        else:
            with pytest.raises(sw.InvalidTransition):
                sw.finalize(self.state)

    @invariant()
    def never_two_writable_sides(self) -> None:
        assert len(self.world.writable()) <= 1

    @invariant()
    def settled_state_has_exactly_one_primary(self) -> None:
        if self.state.in_progress is None and self.state.phase != Phase.FINALIZED:
            assert self.world.writable() == set(sw.writable(self.state))
            assert len(self.world.writable()) == 1

    @invariant()
    def recorded_state_never_overstates_writability(self) -> None:
        # A crash inside FREEZE leaves fewer writable sides than recorded (safe); only
        # a crash inside UNFREEZE may lift a fence before the record says so.
        current = self.state.in_progress
        if current is not None and current.next_step() == Step.UNFREEZE:
            return
        assert self.world.writable() <= set(sw.writable(self.state))

    @invariant()
    def no_feedback_loop(self) -> None:
        running = sw.applying(self.state)
        if running == "reverse":
            assert not self.world.connectors.get("forward", False)
        if running == "forward":
            assert not self.world.connectors.get("reverse", False)

    @invariant()
    def applier_has_a_slot_to_follow(self) -> None:
        running = sw.applying(self.state)
        if running is not None:
            assert running in self.world.slots


TestSwitchMachine = Machine.TestCase
TestSwitchMachine.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


def test_steps_complete_only_in_order() -> None:
    state = sw.begin(State(Phase.STREAMING), Kind.CUTOVER)
    with pytest.raises(sw.InvalidTransition):
        sw.complete(state, Step.DRAIN)
    state = sw.complete(state, Step.PREFLIGHT)
    assert sw.writable(state) == {"source"}
    state = sw.complete(state, Step.FREEZE)
    assert sw.writable(state) == frozenset()


def test_commit_flips_phase_and_forbids_abort() -> None:
    state = sw.begin(State(Phase.STREAMING), Kind.CUTOVER)
    for step in sw.STEPS[: sw.index(Step.COMMIT)]:
        state = sw.complete(state, step)
    assert sw.can_abort(state)
    state = sw.complete(state, Step.COMMIT)
    assert state.phase == Phase.CUT_OVER
    assert not sw.can_abort(state)
    with pytest.raises(sw.InvalidTransition, match="resume"):
        sw.abort(state)
    assert sw.applying(state) is None


def test_rollback_needs_a_cutover_and_finalize_a_finished_one() -> None:
    with pytest.raises(sw.InvalidTransition, match="cut_over"):
        sw.begin(State(Phase.STREAMING), Kind.ROLLBACK)
    with pytest.raises(sw.InvalidTransition):
        sw.finalize(State(Phase.STREAMING))
    with pytest.raises(sw.InvalidTransition, match="no cutover to resume"):
        sw.begin(State(Phase.STREAMING), Kind.CUTOVER, resume=True)


@pytest.mark.parametrize("done", [None, *sw.STEPS])
def test_persisted_form_round_trips(done: Step | None) -> None:
    state = State(Phase.CUT_OVER, sw.Switch(Kind.ROLLBACK, done, 3))
    assert sw.parse(str(state.phase), sw.dump(state)) == state
