"""The stream of training batches: a grain pipeline over step numbers, with a checkpointable position.

A batch is a pure function of (seed, step) (``method.make_batch``), so the pipeline is simply
``step -> make_batch(step) -> on the devices`` (each process feeding the rows its devices hold,
``sharding.process_rows``), prefetched by a few host threads while the device runs the previous step.
Its iterator state (``{"next_index": step}``) goes into every checkpoint; restoring it makes a
resumed run draw exactly the batches an uninterrupted run draws.
"""

from __future__ import annotations

from typing import Callable

import grain

# Steps are indices into an endless range: raising max_steps on resume changes nothing upstream.
_ENDLESS = 2**62


def batch_iterator(make_batch: Callable[[int], dict], *, start_step: int = 0,
                   place: Callable[[dict], dict] | None = None, threads: int = 1,
                   prefetch: int = 4) -> grain.DatasetIterator:
    """An iterator over the global batches from ``start_step`` on, each passed through ``place``.

    ``place`` (e.g. ``sharding.shard_batch``) puts each batch on the devices inside the prefetching
    thread, so transfers overlap the previous step; with several processes it is ``place`` that picks
    the rows this process feeds (``sharding.process_rows``). One thread by default: a batch
    takes a few milliseconds, and a single producer keeps batch making free of any shared-state race
    (two threads once shared a tokenizer's padding state, see ``tokenizer.tokenize``). Its
    ``get_state()``/``set_state()`` (JSON-serialisable) record and restore the position.
    """

    def batch(step: int) -> dict:
        rows = make_batch(int(step))
        return rows if place is None else place(rows)

    dataset = grain.MapDataset.range(_ENDLESS).map(batch)
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
    if start_step:
        iterator.set_state({"next_index": int(start_step)})
    return iterator


def position(iterator: grain.DatasetIterator) -> int:
    """The step of the next batch the iterator yields."""
    return int(iterator.get_state()["next_index"])


def restore(iterator: grain.DatasetIterator, state: dict, step: int) -> None:
    """Puts ``iterator`` where the checkpoint of ``step`` left it; refuses a state from elsewhere."""
    iterator.set_state(state)
    if position(iterator) != step:
        raise ValueError(f"the checkpoint of step {step} holds a batch-iterator state at step "
                         f"{position(iterator)}; the checkpoint is inconsistent, restore an earlier one")
