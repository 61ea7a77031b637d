"""The slot watchdog's decisions: a lost slot halts, a slot dropped on purpose never does.

The false-positive property is checked against a model of the world the switch steps
change (which slots exist), driven by hypothesis through cutovers, rollbacks, aborts,
crashes inside a step and finalize: whenever no switch holds the lock, the slot the
watchdog expects is one that exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.core import switchover as sw
from cdcsync.core.switchover import Kind, Phase, State, Step, Switch
from cdcsync.engine.slot_watch import judge, lost_reason, lsn_text, slot_expected

states = st.builds(
    State,
    st.sampled_from(list(Phase)),
    st.one_of(
        st.none(),
        st.builds(
            Switch,
            st.sampled_from(list(Kind)),
            st.one_of(st.none(), st.sampled_from(list(Step))),
            st.integers(1, 3),
        ),
    ),
)
directions = st.sampled_from(["forward", "reverse"])


@dataclass
class World:
    """Which slots exist, changed by the effects the switch engine gives each step."""

    slots: set[str] = field(default_factory=lambda: {"forward"})

    def effect(self, kind: Kind, step: Step) -> None:
        old_dir = "forward" if kind == Kind.CUTOVER else "reverse"
        new_dir = "reverse" if kind == Kind.CUTOVER else "forward"
        if step == Step.PREPARE:
            self.slots.add(new_dir)
        elif step == Step.RETIRE:
            self.slots.discard(old_dir)

    def undo(self, kind: Kind) -> None:
        self.slots.discard("reverse" if kind == Kind.CUTOVER else "forward")


def _watched_slot_exists(state: State, world: World) -> None:
    expected = slot_expected(state)
    assert expected is None or expected in world.slots, (state, world.slots)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["step", "crash", "abort", "finalize"]), st.booleans())))
def test_the_expected_slot_exists_whenever_no_switch_holds_the_lock(
    commands: list[tuple[str, bool]],
) -> None:
    state, world = State(Phase.STREAMING), World()
    _watched_slot_exists(state, world)
    for command, flag in commands:
        if state.phase == Phase.FINALIZED:
            break
        current = state.in_progress
        if command == "finalize":
            if sw.can_finalize(state):  # atomic under the lock: slots, then the phase
                world.slots.clear()
                state = sw.finalize(state)
        elif command == "abort":
            if current is not None and sw.can_abort(state):
                world.undo(current.kind)
                if flag:  # crash inside the undo (the slot dropped, the state not yet)
                    _watched_slot_exists(state, world)  # then the abort is run again
                state = sw.abort(state)
        else:
            if current is None:
                state = sw.begin(state, sw.kind_from(state.phase))
                current = state.in_progress
            assert current is not None
            step = current.next_step()
            assert step is not None
            world.effect(current.kind, step)
            if command == "step":
                state = sw.complete(state, step)
            # "crash": the step's effect happened, its completion was never recorded;
            # the CLI is gone and the lock with it (a resume would redo the step)
        _watched_slot_exists(state, world)


@given(states, states, directions, st.booleans(), st.booleans())
def test_judge_halts_only_on_a_missing_slot_in_a_quiet_expected_state(
    before: State, after: State, direction: str, exists: bool, running: bool
) -> None:
    verdict = judge(before, after, direction, slot_exists=exists, switch_running=running)  # type: ignore[arg-type]
    if verdict:
        assert not exists and not running and before == after
        assert slot_expected(before) == direction
    elif not exists and not running and before == after:
        assert slot_expected(before) != direction


@given(states, directions)
def test_a_state_that_changed_during_the_reading_never_halts(state: State, direction: str) -> None:
    later = State(
        state.phase,
        Switch(Kind.CUTOVER, Step.DONE, (state.switch.attempt if state.switch else 0) + 1),
    )
    assert not judge(state, later, direction, slot_exists=False, switch_running=False)  # type: ignore[arg-type]


def test_the_old_direction_is_not_watched_once_the_switch_committed() -> None:
    for kind, old in ((Kind.CUTOVER, "forward"), (Kind.ROLLBACK, "reverse")):
        phase = sw.phase_after(kind)
        for step in sw.STEPS[sw.index(Step.COMMIT) :]:
            state = State(phase, Switch(kind, step))
            assert slot_expected(state) != old, state


def test_nothing_is_watched_before_streaming_or_after_finalize() -> None:
    assert slot_expected(State(Phase.SNAPSHOT)) is None
    assert slot_expected(State(Phase.FINALIZED, Switch(Kind.CUTOVER, Step.DONE))) is None
    assert slot_expected(State(Phase.STREAMING)) == "forward"
    assert slot_expected(State(Phase.CUT_OVER, Switch(Kind.CUTOVER, Step.DONE))) == "reverse"


@given(st.integers(0, 2**64 - 1))
def test_lsn_text_is_postgres_notation(lsn: int) -> None:
    hi, lo = lsn_text(lsn).split("/")
    assert (int(hi, 16) << 32) + int(lo, 16) == lsn
    assert lsn_text(lsn) == lsn_text(lsn).upper()


def test_the_reason_names_the_slot_the_side_and_the_cure() -> None:
    reason = lost_reason("forward", "m1_slot", "source", 0x1_0000_00A0, 0x2_0000_0000)
    assert "replication slot m1_slot on the source is gone" in reason
    assert "1/A0" in reason and "2/0" in reason
    assert "re-snapshot" in reason
    unseen = lost_reason("reverse", "m1_rev_slot", "target", None, None)
    assert "not seen by this daemon before" in unseen and "m1_rev_slot" in unseen
