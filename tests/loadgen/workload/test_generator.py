"""The synthetic agentic workload generator: seeded, parameterised, always a valid tree."""

from __future__ import annotations

import io

import pytest

from loadgen.workload import GeneratorParams, dump_workload, generate
from protocol.messages import BranchMode


def _dump(params: GeneratorParams) -> bytes:
    out = io.BytesIO()
    dump_workload(generate(params), out)
    return out.getvalue()


def _depth(w, sid: str, parents: dict[str, str]) -> int:
    depth = 0
    while sid in parents:
        sid = parents[sid]
        depth += 1
    return depth


def test_same_seed_same_workload_other_seed_other_workload() -> None:
    p = GeneratorParams(sessions=30)
    assert _dump(p) == _dump(p)
    assert _dump(p) != _dump(p.with_(seed=8))


def test_shape_follows_the_parameters() -> None:
    p = GeneratorParams(sessions=60, fork_prob=0.5, spawn_prob=0.5, max_depth=2, turns_max=4)
    w = generate(p)
    assert len(w.roots) == 60
    parents = {c: sid for (sid, _), bs in w.branches.items() for b in bs for c in b.children}
    assert max(_depth(w, sid, parents) for sid in w.sessions) == 2
    for sid, spec in w.sessions.items():
        if sid in w.fork_children:
            assert spec.subagent_type is None
        elif sid in parents:
            assert spec.subagent_type in p.subagent_types
        limit = p.turns_max if sid in w.roots else p.child_turns_max
        assert 1 <= len(spec.turns) <= limit
    modes = {b.mode for bs in w.branches.values() for b in bs}
    assert modes == {BranchMode.FORK, BranchMode.SPAWN}
    flat = generate(p.with_(max_depth=0))
    assert flat.branches == {}
    assert len(flat.sessions) == 60


def test_shared_prefix_and_arrivals() -> None:
    w = generate(
        GeneratorParams(sessions=5, shared_prefix_tokens=128, block_tokens=64, arrival_rate=10)
    )
    firsts = [w.sessions[r].turns[0] for r in w.roots]
    assert all(t.hash_ids == firsts[0].hash_ids and len(t.hash_ids or ()) == 2 for t in firsts)
    assert all((t.input_tokens or 0) > 128 for t in firsts)
    starts = [w.sessions[r].start_s for r in w.roots]
    assert starts[0] == 0.0
    assert starts == sorted(starts)


@pytest.mark.parametrize(
    "bad",
    [{"sessions": 0}, {"turns_min": 3, "turns_max": 2}, {"fork_prob": 1.5}, {"max_depth": -1}],
)
def test_bad_parameters_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (each names its own parameter)
        GeneratorParams().with_(**bad)
