"""The dataset builders' pool of spawned worker processes (output order preserved)."""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
from typing import Callable, Iterator, Sequence


def _apply_chunk(fn: Callable, chunk: Sequence[tuple]) -> list:
  return [fn(*args) for args in chunk]


def default_num_workers() -> int:
  return max(1, min(os.cpu_count() or 1, 16))


def parallel_map(fn: Callable, args: Sequence[tuple], num_workers: int, *, chunk_size: int = 8,
                 min_parallel: int = 32) -> Iterator:
  """``fn(*a) for a in args`` in order, on `num_workers` spawned processes (1 = in this process).

  At most ``4 × num_workers`` chunks are in flight, so memory stays bounded however many images
  there are. 'spawn' because the caller may run JAX threads that a fork would copy broken. Fewer
  than `min_parallel` items run in-process (starting workers costs more than they save).
  """
  chunks = [args[i:i + chunk_size] for i in range(0, len(args), chunk_size)]
  if num_workers <= 1 or len(args) < min_parallel:
    for chunk in chunks:
      yield from _apply_chunk(fn, chunk)
    return
  pool = concurrent.futures.ProcessPoolExecutor(min(num_workers, len(chunks)),
                                                mp_context=multiprocessing.get_context("spawn"))
  try:
    pending: collections.deque = collections.deque()
    remaining = iter(chunks)
    for chunk in remaining:
      pending.append(pool.submit(_apply_chunk, fn, chunk))
      if len(pending) >= 4 * num_workers:
        break
    while pending:
      done = pending.popleft().result()
      following = next(remaining, None)
      if following is not None:
        pending.append(pool.submit(_apply_chunk, fn, following))
      yield from done
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
