"""WorkClock: a handler's seconds by stage, nested stages taken out of the enclosing one, the rest 'other';
work_stage finds the handler's clock through asyncio.to_thread and does nothing without one."""

from __future__ import annotations

import asyncio
import time

from llamaduo.runtime.work_clock import WorkClock, work_stage


def test_a_nested_stage_is_taken_out_of_the_enclosing_one() -> None:
    clock = WorkClock()
    with clock.stage("train"):
        time.sleep(0.05)
        with work_stage("load"):
            time.sleep(0.1)
        time.sleep(0.05)
    time.sleep(0.05)  # after every stage: "other"
    work = clock.work()
    assert 0.1 <= work.load < 0.15
    assert 0.1 <= work.train < 0.15  # 0.2 s in the block, less the 0.1 s of load
    assert 0.05 <= work.other < 0.1
    assert work.generate == work.judge == work.synthesize == 0
    assert abs(work.total - (time.monotonic() - clock.started)) < 0.02


def test_work_stage_reaches_the_clock_through_to_thread_and_is_a_no_op_without_one() -> None:
    def deep_down() -> None:
        with work_stage("load"):
            time.sleep(0.05)

    async def handler() -> WorkClock:
        clock = WorkClock()
        with clock.stage("generate"):
            await asyncio.to_thread(deep_down)
        return clock

    work = asyncio.run(handler()).work()
    assert work.load >= 0.05 and work.generate < 0.04
    deep_down()  # no clock running: just runs
