"""How requests reach a loaded model, free of any transport: ``DynamicBatcher`` (admission,
instances, dispatch) in ``scheduler.py``, batch assembly in ``batching.py``."""

from inhouse.core.scheduling.batching import DONE, QUEUED, RUNNING, Batch, BatchQueue, Pending, TensorLayout
from inhouse.core.scheduling.scheduler import DynamicBatcher, LoopLoad, Scheduler, SchedulerStats, runs_inline

__all__ = ["DONE", "QUEUED", "RUNNING", "Batch", "BatchQueue", "DynamicBatcher", "LoopLoad", "Pending",
           "Scheduler", "SchedulerStats", "TensorLayout", "runs_inline"]
