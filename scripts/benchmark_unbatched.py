"""Benchmark-only server target: `service.py` with every engine batch limited to one request.

`SEG_MAX_BATCH_SIZE=1` stops `service.py` at import (BentoML 1.4.40 requires `max_batch_size > 1`,
and its batch-size histogram needs a largest bucket above 1), so `scripts/benchmark.py
--compare-batching` serves this module instead: the same services and the same adaptive dispatcher,
which here never puts more than one request in a batch (with step-level batching: a running batch
of one slot).

    bentoml serve scripts.benchmark_unbatched:Segmentation
"""

from __future__ import annotations

import os

from bentoml._internal.marshal.dispatcher import CorkDispatcher

os.environ["SEG_MAX_BATCH_SIZE"] = "2"  # the smallest value BentoML accepts; each dispatcher takes 1
os.environ["SEG_GRAPH_BUCKETS"] = "1"  # step-level batching: one slot, so one request at a time

from service import Segmentation  # noqa: E402

_init = CorkDispatcher.__init__


def _one_request_per_batch(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    self.max_batch_size = 1


CorkDispatcher.__init__ = _one_request_per_batch

__all__ = ["Segmentation"]
