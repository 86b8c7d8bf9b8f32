"""The shared-memory ring's index protocol: a two-process stress (0 torn reads, frames intact), a hypothesis
state machine against a FIFO model, and an exhaustive model check of every producer/consumer interleaving
(atomic index words hold the invariant; index words stored in two halves break it, which the checker finds).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lorafleet.actors.channels import ATOMICS, RingCorrupted, RingFull, ShmRing

STRESS_S = float(os.environ.get("LORAFLEET_RING_STRESS_S", "8"))


def _frame(seq: int) -> bytes:
    return seq.to_bytes(8, "little") + bytes([seq % 251]) * (seq * 7919 % 700)


def _produce(name: str, backend: str, seconds: float, report) -> None:
    ring = ShmRing.attach(name, backend)
    torn = full = seq = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ring.used()
            ring.write(_frame(seq))
            seq += 1
        except RingFull:
            full += 1
        except RingCorrupted:
            torn += 1
    report.send((seq, full, torn))
    ring.close()


@pytest.mark.parametrize("backend", sorted({ATOMICS, "native-8-byte"}))
def test_two_processes_never_read_a_torn_index(backend):
    """A producer process writes numbered frames of varying length flat out into a small ring (so it wraps
    and fills constantly); this process reads them. Both check the index pair on every operation."""
    ring = ShmRing.create(capacity=4096, backend=backend)
    seconds = STRESS_S if backend == ATOMICS else STRESS_S / 2
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    producer = multiprocessing.get_context("fork").Process(target=_produce, args=(ring.name, backend, seconds, send))
    producer.start()
    expected = torn = 0
    deadline = time.monotonic() + seconds + 30
    try:
        while time.monotonic() < deadline:
            try:
                ring.used()
                frame = ring.read()
            except RingCorrupted:
                torn += 1
                continue
            if frame is not None:
                assert frame == _frame(expected), f"frame {expected} arrived damaged"
                expected += 1
            elif receive.poll():
                break
        sent, full, producer_torn = receive.recv()
        while (frame := ring.read()) is not None:
            assert frame == _frame(expected)
            expected += 1
    finally:
        producer.join(30)
        ring.close()
    assert producer.exitcode == 0
    assert (torn, producer_torn) == (0, 0), f"torn index reads: consumer {torn}, producer {producer_torn}"
    assert expected == sent and sent > 100
    assert full > 0, "the ring never filled: the stress did not exercise a full ring"


class RingMachine(RuleBasedStateMachine):
    """Random writes and reads on one ring against a FIFO of frames: RingFull exactly when the frame does not
    fit the model's free bytes, frames come out whole and in order, `used()` equals the model's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = ShmRing.create(capacity=512)
        self.model: deque[bytes] = deque()

    def model_used(self) -> int:
        return sum(4 + len(f) for f in self.model)

    @rule(frame=st.binary(max_size=600))
    def write(self, frame):
        fits = 4 + len(frame) <= self.ring.capacity - self.model_used()
        try:
            self.ring.write(frame)
        except RingFull:
            assert not fits
        else:
            assert fits
            self.model.append(frame)

    @rule()
    def read(self):
        expected = self.model.popleft() if self.model else None
        assert self.ring.read() == expected

    @invariant()
    def used_matches(self):
        assert self.ring.used() == self.model_used()

    def teardown(self):
        self.ring.close()


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


# exhaustive model check of the index protocol --------------------------------------------------------
CAPACITY, FRAMES, BITS = 2, 4, 3  # ring cells, frames sent, bits of an index word


def _successors(state, split: bool):
    """Every next state of (producer, consumer, head, tail, cells) after one atomic step of either side.

    An index load or store is one step (atomic words), or with `split` two steps: the low bit, then the
    high bits (a word written or read in pieces, as a byte-wise copy does). Yields None on a violation."""
    (p_pc, p_seq, p_head), (c_pc, c_seq, c_tail), head, tail, cells = state
    low, high = (lambda v: v & 1), (lambda v: v & ~1)
    # producer: load head (maybe in two halves), check space, write the cell, store tail (maybe halves)
    if p_seq < FRAMES:
        if p_pc == "load":
            yield ((("load_hi", p_seq, low(head)) if split else ("check", p_seq, head)), *state[1:])
        elif p_pc == "load_hi":
            yield (("check", p_seq, p_head | high(head)), *state[1:])
        elif p_pc == "check":
            used = p_seq - p_head  # the producer's tail is its own count
            if not 0 <= used <= CAPACITY:
                yield None
                return
            yield ((("write" if used < CAPACITY else "load"), p_seq, 0), *state[1:])
        elif p_pc == "write":
            new_cells = cells[:p_seq % CAPACITY] + (p_seq,) + cells[p_seq % CAPACITY + 1:]
            yield (("store", p_seq, 0), state[1], head, tail, new_cells)
        elif p_pc == "store":
            target = p_seq + 1
            if split:
                yield (("store_hi", p_seq, 0), state[1], head, high(tail) | low(target), cells)
            else:
                yield (("load", target, 0), state[1], head, target, cells)
        elif p_pc == "store_hi":
            yield (("load", p_seq + 1, 0), state[1], head, p_seq + 1, cells)
    # consumer: load tail (maybe halves), check for a frame, read the cell, store head (maybe halves)
    if c_seq < FRAMES:
        if c_pc == "load":
            yield (state[0], (("load_hi", c_seq, low(tail)) if split else ("check", c_seq, tail)), *state[2:])
        elif c_pc == "load_hi":
            yield (state[0], ("check", c_seq, c_tail | high(tail)), *state[2:])
        elif c_pc == "check":
            if not 0 <= c_tail - c_seq <= CAPACITY:
                yield None
                return
            yield (state[0], (("read" if c_tail > c_seq else "load"), c_seq, 0), *state[2:])
        elif c_pc == "read":
            if cells[c_seq % CAPACITY] != c_seq:
                yield None  # read a cell the producer has not written yet (or overwrote)
                return
            yield (state[0], ("store", c_seq, 0), *state[2:])
        elif c_pc == "store":
            target = c_seq + 1
            if split:
                yield (state[0], ("store_hi", c_seq, 0), high(head) | low(target), tail, cells)
            else:
                yield (state[0], ("load", target, 0), target, tail, cells)
        elif c_pc == "store_hi":
            yield (state[0], ("load", c_seq + 1, 0), c_seq + 1, tail, cells)


def _explore(split: bool) -> tuple[int, bool, bool]:
    """(states seen, a violation reachable, the final state (every frame read) reachable)."""
    start = (("load", 0, 0), ("load", 0, 0), 0, 0, (-1,) * CAPACITY)
    seen, frontier, done = {start}, [start], False
    while frontier:
        state = frontier.pop()
        if state[1][1] == FRAMES:
            done = True
        for nxt in _successors(state, split):
            if nxt is None:
                return len(seen), True, done
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return len(seen), False, done


def test_model_check_atomic_indices_hold_in_every_interleaving():
    states, violated, done = _explore(split=False)
    assert not violated and done and states > 50


def test_model_check_finds_the_torn_index_fault():
    """The checker is able to fail: index words stored/read in two pieces reach a torn read."""
    _, violated, _ = _explore(split=True)
    assert violated
    assert 2 ** BITS > FRAMES + CAPACITY


# the scheduler survives a plan ring that is full ----------------------------------------------------------
class _FullRingGroup:
    """ExecutorGroup stand-in over the engine's own runner whose plan ring is 'full' on chosen sends: the
    first three tries and every third after are refused (RingFull, nothing sent), and a step with more than
    `never_tokens` tokens never fits."""

    def __init__(self, runner, never_tokens: int) -> None:
        self.runner, self.never_tokens, self.tries, self.refused = runner, never_tokens, 0, 0
        self.results = []

    def send(self, plan, packed):
        from lorafleet.actors.executor import run_step

        self.tries += 1
        if plan.num_tokens > self.never_tokens:
            raise RingFull("a step larger than the ring", never_fits=True)
        if self.tries <= 3 or self.tries % 3 == 0:
            self.refused += 1
            raise RingFull("the plan ring is full now")
        self.results.append(run_step(0, self.runner, plan))  # the executor's own step: result with logprobs

    async def receive(self):
        import asyncio

        await asyncio.sleep(0)
        return self.results.pop(0)


async def test_scheduler_survives_a_full_plan_ring(tiny_llama):
    import asyncio

    from lorafleet.actors.channels import LocalChannel
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.scheduler import STEP_TOO_LARGE, SchedulerActor
    from lorafleet.actors.schema import StepDeltas, Submit
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    prompts = [[5 + i, 9, 30 + i] for i in range(4)]
    want = LLM(str(tiny_llama)).generate(prompts, max_tokens=5)
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), {})
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    group = _FullRingGroup(engine.executor, never_tokens=20)
    actor = SchedulerActor(engine, group, inbox, router, admission, prefetch, ServeHub())
    task = asyncio.create_task(actor.run())

    async def ends(count: int) -> dict:
        tokens, done = {}, {}
        while len(done) < count:
            msg = await asyncio.wait_for(router.recv(), 60)
            for item in msg.items if isinstance(msg, StepDeltas) else []:
                tokens.setdefault(item.request_id, []).extend(item.token_ids)
                if item.finished:
                    done[item.request_id] = item
        return tokens, done

    inbox.send(Submit("huge", list(range(1, 40)), {"max_tokens": 5, "temperature": 0.0}, None, None, 0.0, 1))
    _, done = await ends(1)
    assert done["huge"].error_code == STEP_TOO_LARGE and "plan ring" in done["huge"].error_message
    for i, prompt in enumerate(prompts):
        inbox.send(Submit(f"q{i}", prompt, {"max_tokens": 5, "temperature": 0.0}, None, None, 0.0, i + 2))
    tokens, done = await ends(4)
    assert not task.done(), "the scheduler actor stopped"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert all(done[f"q{i}"].error_code is None for i in range(4))
    assert [tokens[f"q{i}"] for i in range(4)] == [w.token_ids for w in want]
    assert group.refused >= 4 and engine.pool.usage()["kv"] == 0
    engine.pool.check()
