"""How requests reach a loaded model, free of any transport: ``DynamicBatcher`` (admission,
instances, dispatch) in ``scheduler.py``, batch assembly in ``batching.py``, where a batch runs
in ``placement.py``, and whether an idle model waits for company in ``wait_policy.py``."""

from inhouse.core.scheduling.batching import DONE, QUEUED, RUNNING, Batch, BatchQueue, Pending, TensorLayout
from inhouse.core.scheduling.placement import runs_inline
from inhouse.core.scheduling.scheduler import DynamicBatcher, Scheduler, SchedulerStats
from inhouse.core.scheduling.wait_policy import IdleWait, LoopLoad, WaitPolicy

__all__ = ["DONE", "QUEUED", "RUNNING", "Batch", "BatchQueue", "DynamicBatcher", "IdleWait", "LoopLoad",
           "Pending", "Scheduler", "SchedulerStats", "TensorLayout", "WaitPolicy", "runs_inline"]
