"""Deterministic tests of batch assembly: the queue and its leave rule driven by a fake clock,
and joining / padding / splitting tensors."""

from __future__ import annotations

import numpy as np
import pytest

from inhouse.core.scheduling.batching import QUEUED, RUNNING, Batch, BatchQueue, Pending, TensorLayout
from inhouse.core.spec import BatchingSpec, TensorSpec
from inhouse.errors import InferenceError, ModelSpecError, ShapeError


def _p(rows: int = 1, *, key: object = "k", priority: int = 0, t: float = 0.0,
       deadline: float | None = None, tag: int = 0) -> Pending:
    x = np.full((rows, 2), tag, np.float32)
    return Pending({"x": x}, None, rows, key, priority, t, deadline)


def _queue(**kw: object) -> BatchQueue:
    cfg = {"max_batch_size": 8, "max_queue_delay_ms": 10.0, "priority_levels": 2, **kw}
    return BatchQueue(BatchingSpec.model_validate(cfg))


def test_waits_for_company_only_while_busy() -> None:
    q = _queue()
    q.push(_p(t=0.0))
    # an idle model does not hold a lone request back
    assert isinstance(q.next_batch(0.0, hold=False), Batch)
    q.push(_p(priority=1, t=1.0))
    # while other work runs it waits until the oldest request is max_queue_delay old
    assert q.next_batch(1.001, hold=True) == pytest.approx(1.010)
    q.push(_p(priority=1, t=1.004))
    b = q.next_batch(1.010, hold=True)
    assert isinstance(b, Batch) and b.rows == 2 and len(q) == 0


def test_full_batch_and_preferred_sizes_leave_at_once() -> None:
    q = _queue(preferred_batch_sizes=[4])
    for i in range(3):
        q.push(_p(priority=1, t=0.0, tag=i))
    assert isinstance(q.next_batch(0.0, hold=True), float)
    q.push(_p(priority=1, t=0.0))
    b = q.next_batch(0.0, hold=True)
    assert isinstance(b, Batch) and b.rows == 4
    q2 = _queue()
    for _ in range(10):
        q2.push(_p(priority=1))
    b = q2.next_batch(0.0, hold=True)
    assert isinstance(b, Batch) and b.rows == 8 and len(q2) == 2


def test_priority_zero_goes_first_and_skips_the_delay() -> None:
    q = _queue()
    low = [_p(priority=1, t=0.0, tag=i) for i in range(3)]
    for p in low:
        q.push(p)
    high = _p(priority=0, t=0.5, tag=99)
    q.push(high)
    b = q.next_batch(0.5, hold=True)
    assert isinstance(b, Batch)
    assert b.requests[0] is high and b.requests[1:] == low  # same key: the low ones ride along


def test_incompatible_requests_do_not_share_a_batch() -> None:
    q = _queue()
    a, b, c = _p(key="a", priority=1), _p(key="b", priority=1), _p(key="a", priority=1)
    for p in (a, b, c):
        q.push(p)
    first = q.next_batch(1.0, hold=False)
    assert isinstance(first, Batch) and first.requests == [a, c]
    second = q.next_batch(1.0, hold=False)
    assert isinstance(second, Batch) and second.requests == [b]
    assert q.next_batch(1.0, hold=False) is None


def test_expired_requests_are_dropped_never_batched() -> None:
    q = _queue()
    stale = _p(priority=1, t=0.0, deadline=0.005)
    fresh = _p(priority=1, t=0.0)
    q.push(stale)
    q.push(fresh)
    b = q.next_batch(0.006, hold=False)
    assert isinstance(b, Batch) and b.requests == [fresh] and b.expired == [stale]
    assert fresh.state == RUNNING and stale.state != QUEUED and len(q) == 0


def test_discarded_requests_are_skipped() -> None:
    q = _queue()
    gone, kept = _p(priority=1), _p(priority=1)
    q.push(gone)
    q.push(kept)
    q.discard(gone)
    assert len(q) == 1
    b = q.next_batch(0.0, hold=False)
    assert isinstance(b, Batch) and b.requests == [kept]


def test_batching_off_runs_one_request_per_call_by_priority() -> None:
    q = _queue(max_batch_size=0)
    a, b = _p(priority=1), _p(priority=0)
    q.push(a)
    q.push(b)
    first = q.next_batch(0.0, hold=True)
    assert isinstance(first, Batch) and first.requests == [b]


def _layout(pad: bool = True) -> TensorLayout:
    ins = [TensorSpec(name="ids", dtype="INT64", shape=[-1, -1], pad_value=0 if pad else None),
           TensorSpec(name="f", dtype="FP32", shape=[-1, 3])]
    outs = [TensorSpec(name="seq", dtype="FP32", shape=[-1, -1]), TensorSpec(name="pooled", dtype="FP32",
                                                                            shape=[-1, 3])]
    return TensorLayout("m", ins, outs, batching=True)


def test_padding_joins_variable_lengths_and_slices_outputs_back() -> None:
    lay = _layout()
    reqs = []
    for rows, length in ((1, 3), (2, 5)):
        inputs = {"ids": np.arange(rows * length, dtype=np.int64).reshape(rows, length) + 1,
                  "f": np.ones((rows, 3), np.float32)}
        r, key = lay.rows_and_key(inputs, None)
        reqs.append(Pending(inputs, None, r, key, 0, 0.0, None))
    assert reqs[0].key == reqs[1].key  # the padded dimension does not split batches
    feed, lengths = lay.join(reqs)
    assert feed["ids"].shape == (3, 5) and feed["ids"][0].tolist() == [1, 2, 3, 0, 0]
    results = {"seq": feed["ids"].astype(np.float32) * 2, "pooled": feed["f"] * 3}
    parts = lay.split(reqs, results, lengths)
    for req, part in zip(reqs, parts, strict=True):
        np.testing.assert_array_equal(part["seq"], req.inputs["ids"] * 2)
        np.testing.assert_array_equal(part["pooled"], req.inputs["f"] * 3)


def test_without_pad_value_lengths_split_batches() -> None:
    lay = _layout(pad=False)
    k1 = lay.rows_and_key({"ids": np.zeros((1, 3), np.int64), "f": np.zeros((1, 3), np.float32)}, None)[1]
    k2 = lay.rows_and_key({"ids": np.zeros((1, 4), np.int64), "f": np.zeros((1, 3), np.float32)}, None)[1]
    assert k1 != k2


def test_layout_errors() -> None:
    lay = _layout()
    with pytest.raises(ShapeError, match="disagree on the batch size"):
        lay.rows_and_key({"ids": np.zeros((2, 3), np.int64), "f": np.zeros((1, 3), np.float32)}, None)
    with pytest.raises(ModelSpecError, match="dynamic first"):
        TensorLayout("m", [TensorSpec(name="x", dtype="FP32", shape=[1, 3])], [], batching=True)
    reqs = [Pending({"ids": np.zeros((1, 2), np.int64), "f": np.zeros((1, 3), np.float32)}, None, 1, "k", 0,
                    0.0, None) for _ in range(2)]
    with pytest.raises(InferenceError, match="one row per input row"):
        lay.split(reqs, {"pooled": np.zeros((3, 3), np.float32)}, {})


# ---- the DynamicBatcher itself, on a fake clock ---------------------------------------------------
async def test_batcher_on_a_fake_clock_drops_what_expired_while_queued() -> None:
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from gate_backend import Gate, GateModel
    from inhouse.core.scheduling import DynamicBatcher
    from inhouse.core.spec import ModelSpec
    from inhouse.errors import DeadlineExceededError

    now = [1000.0]
    gate = Gate()
    spec = ModelSpec.model_validate({"name": "g", "backend": "gate", "batching": {"max_batch_size": 4}})
    batcher = DynamicBatcher(GateModel(gate), spec, clock=lambda: now[0])
    gate.hold()
    x = np.zeros((1, 2), np.float32)
    blocker = asyncio.ensure_future(batcher.submit({"x": x}, None))
    await asyncio.to_thread(gate.entered.acquire, True, 10)
    # queued behind the blocker with a one-hour budget on the fake clock (the loop timer stays far away)
    late = asyncio.ensure_future(batcher.submit({"x": x + 7}, None, timeout_s=3600))
    ok = asyncio.ensure_future(batcher.submit({"x": x + 8}, None))
    await asyncio.sleep(0)
    assert batcher.queue_depth() == 2
    now[0] += 7200  # two hours pass on the batcher's clock while the model is busy
    gate.open.set()
    await blocker
    assert (await ok)["y"][0, 0] == 16
    try:
        await late
        raise AssertionError("an expired request ran")
    except DeadlineExceededError:
        pass
    assert 7.0 not in gate.executed_ids()  # dropped at batch assembly, never executed
    assert batcher.stats.expired == 1 and batcher.stats.executed == 2
    await batcher.close()


def test_only_batches_predicted_cheap_run_on_the_event_loop() -> None:
    from inhouse.core.scheduling import runs_inline

    # a 20 µs model measured at ~16 rows a call: small and full batches alike run inline
    assert runs_inline(20e-6, 16, 1) and runs_inline(20e-6, 16, 64)
    # 100 µs at 4 rows: a 4-row batch inline, a 64-row one predicted at 1.6 ms goes to a thread
    assert runs_inline(100e-6, 4, 4) and not runs_inline(100e-6, 4, 64)
    # a slow model never blocks the loop
    assert not runs_inline(5e-3, 1, 1)


def test_onnx_models_on_the_cpu_may_run_inline_device_ones_never() -> None:
    import onnxruntime as ort

    from inhouse.backends.onnx import OnnxModel
    from models import add_model

    cpu = ort.InferenceSession(add_model(), providers=["CPUExecutionProvider"])
    assert OnnxModel(cpu, [], []).inline_safe

    class OnDevice:  # what a CUDA session reports (no GPU here to make a real one)
        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert not OnnxModel(OnDevice(), [], []).inline_safe  # type: ignore[arg-type]


async def test_deadlines_share_one_timer_answer_running_requests_and_keep_no_tensors() -> None:
    import asyncio
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from gate_backend import Gate, GateModel
    from inhouse.core.scheduling import DynamicBatcher
    from inhouse.core.spec import ModelSpec
    from inhouse.errors import DeadlineExceededError

    gate = Gate()
    spec = ModelSpec.model_validate({"name": "g", "backend": "gate", "batching": {"max_batch_size": 4}})
    batcher = DynamicBatcher(GateModel(gate), spec)
    x = np.zeros((1, 2), np.float32)
    # many requests with deadlines finish long before them: one timer; the heap of deadlines
    # drops the finished ones as new requests come (it used to keep every request of the last
    # minute, and popping them all at once stalled the loop) and holds none of their tensors
    timer = None
    for i in range(20):
        assert (await batcher.submit({"x": x + i}, None, timeout_s=60))["y"][0, 0] == 2 * i
        timer = timer or batcher._deadlines._timer
        assert batcher._deadlines._timer is timer
    assert len(batcher._deadlines) == 1 and all(not p.inputs for _, _, p in batcher._deadlines)
    # a request still running when its deadline passes is answered then (504), not when the model returns
    gate.hold()
    running = asyncio.ensure_future(batcher.submit({"x": x + 99}, None, timeout_s=0.2))
    await asyncio.to_thread(gate.entered.acquire, True, 10)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(running, 5)
        raise AssertionError("the deadline did not fire")
    except DeadlineExceededError:
        assert time.monotonic() - t0 < 1.0
    gate.open.set()
    assert (await batcher.submit({"x": x + 1}, None, timeout_s=60))["y"][0, 0] == 2
    assert batcher.stats.expired == 1
    await batcher.close()


class _Load:
    """What LoopLoad answers, set by the test."""

    def __init__(self) -> None:
        self.busy = False

    def saturated(self) -> bool:
        return self.busy


async def test_an_idle_model_waits_for_company_only_on_a_saturated_loop_and_while_it_comes() -> None:
    import asyncio
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from gate_backend import Gate, GateModel
    from inhouse.core.scheduling import DynamicBatcher, IdleWait
    from inhouse.core.spec import ModelSpec

    class CheapModelWait(IdleWait):
        """Only a model whose calls are cheap waits, and that is measured (a moving average of its
        calls' CPU time): a collection of the whole test process's heap during one call makes it
        dear for the next dozen. This test is about the rule once cheap; the next covers a dear one."""

        def holds(self, now: float, cheap: bool) -> bool:
            return super().holds(now, True)

    gate = Gate()
    spec = ModelSpec.model_validate({"name": "g", "backend": "gate",
                                     "batching": {"max_batch_size": 64, "max_queue_delay_ms": 200}})
    load = _Load()
    model = GateModel(gate)
    model.inline_safe = True  # type: ignore[attr-defined]  # only models cheap enough for the loop wait
    wait = CheapModelWait(load)
    batcher = DynamicBatcher(model, spec, wait=wait)  # type: ignore[arg-type]
    x = np.zeros((1, 2), np.float32)

    async def seconds(i: int) -> float:
        t0 = time.monotonic()
        assert (await batcher.submit({"x": x + i}, None))["y"][0, 0] == 2 * i
        return time.monotonic() - t0

    # a loop with idle time: a lone request runs at once, whatever the queue delay
    for _ in range(20):
        assert await seconds(1) < 0.1
    # a saturated loop: the next lone request waits the queue delay for company (a probe) ...
    load.busy = True
    assert await seconds(2) >= 0.19
    # ... which found none, so the one after runs at once (a back-off of 20 ms, then 40, ...)
    assert await seconds(3) < 0.1
    await asyncio.sleep(0.05)
    # a wait during which requests keep coming until near its end: they go as one batch ...
    t0 = time.monotonic()
    first = asyncio.ensure_future(batcher.submit({"x": x + 4}, None))
    company = []
    for i, at in enumerate((0.04, 0.08, 0.12, 0.17)):  # the last in the wait's final quarter
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        company.append(asyncio.ensure_future(batcher.submit({"x": x + 5 + i}, None)))
    await asyncio.gather(first, *company)
    assert len(gate.calls[-1]) == 5 and gate.executed_ids()[-5:] == [4, 5, 6, 7, 8]
    # ... and waiting paid, so the next lone request waits again (as the rule, not as a probe);
    # that one found no company, so the one after it runs at once
    assert wait.pays
    assert await seconds(9) >= 0.19
    assert not wait.pays
    assert await seconds(10) < 0.1
    # a wait once begun runs to its end even when the loop stops being saturated meanwhile (a
    # request joining then would otherwise end it at once, and it would be judged as paying)
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    held = asyncio.ensure_future(batcher.submit({"x": x + 11}, None))
    await asyncio.sleep(0.05)
    load.busy = False
    assert (await batcher.submit({"x": x + 12}, None))["y"][0, 0] == 24
    assert time.monotonic() - t0 >= 0.19 and len(gate.calls[-1]) == 2
    await held
    assert not wait.pays
    await batcher.close()


async def test_a_model_computing_on_a_thread_never_waits_for_company_when_idle() -> None:
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from gate_backend import Gate, GateModel
    from inhouse.core.scheduling import DynamicBatcher, IdleWait
    from inhouse.core.spec import ModelSpec

    spec = ModelSpec.model_validate({"name": "g", "backend": "gate",
                                     "batching": {"max_batch_size": 64, "max_queue_delay_ms": 200}})
    load = _Load()
    load.busy = True
    # not inline-safe: its calls run on an instance thread, so an idle instance starts at once
    batcher = DynamicBatcher(GateModel(Gate()), spec, wait=IdleWait(load))  # type: ignore[arg-type]
    x = np.zeros((1, 2), np.float32)
    for i in range(3):
        t0 = time.monotonic()
        await batcher.submit({"x": x + i}, None)
        assert time.monotonic() - t0 < 0.1
    await batcher.close()


def test_loop_load_is_the_loop_threads_busy_share_over_a_window() -> None:
    import time

    from inhouse.core.scheduling import LoopLoad

    clock = {"cpu": 0.0, "wall": 0.0}
    load = LoopLoad(busy=lambda: clock["cpu"], wall=lambda: clock["wall"], window_s=0.005)
    clock["wall"], clock["cpu"] = 0.004, 0.004
    assert not load.saturated()  # within the first window: not sampled yet
    clock["wall"], clock["cpu"] = 0.010, 0.0095
    assert load.saturated() and load.share == pytest.approx(0.95)
    clock["wall"], clock["cpu"] = 0.012, 0.0095
    assert load.saturated()  # the last window's answer holds until the next one closes
    clock["wall"], clock["cpu"] = 0.020, 0.0125
    assert not load.saturated() and load.share == pytest.approx(0.3)
    # the real clocks: a spinning thread reads far busier than a sleeping one. The sleep is long
    # because waking up counts as busy (waiting for a CPU), which a loaded machine stretches.
    real = LoopLoad(window_s=0.02)
    time.sleep(0.3)
    real.saturated()
    idle = real.share
    end = time.perf_counter() + 0.03
    while time.perf_counter() < end:
        pass
    real.saturated()
    assert idle < 0.5 and real.share > 0.5
