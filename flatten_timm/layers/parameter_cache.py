""" Tensors computed from parameters, kept between inference calls.

A focused linear attention layer folds its kernel's scale into the q/k projections (or takes the scale and floor
vectors that its wide layers apply in one pass on a CPU), scales or resizes its key positional encoding and sums its
depthwise kernels on every call: a dozen small ops that depend only on the parameters. In inference they are
computed once and reused, which spares a small map (a detector neck's) most of its per-call overhead and a GPU a
dozen kernel launches per layer.
"""
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, TypeVar

import torch

from .symbolic_shapes import is_symbolic

__all__ = ['LruCache', 'ParameterCache', 'MAX_CACHED_TABLE_ELEMENTS']

T = TypeVar('T')

# A limit a layer may set on the resized tables (key positional encodings) it keeps for inference: 1 MiB in float32,
# a detector neck's 20 x 20 map of 512 channels. Where every layer attends over the whole image at full width
# (FLatten-DeiT), tables kept at a large grid add up to more than the inference's own peak memory (72 MiB for
# FLatten-DeiT-S at 1024 px) and recomputing them costs 1-3%. A pyramid keeps its tables: at a detector's fixed
# size they are worth their memory (recomputing cost FLatten-CSWin-T 2.8% at 800x1344, to save 66 MiB).
MAX_CACHED_TABLE_ELEMENTS = 2 ** 18


class LruCache:
    """ Values by key, at most `max_entries` of them, the least recently used going first: a model fed
    images of ever new sizes keeps what it computed for its recent sizes, not for all. Copies and pickles
    of the owner start empty.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: 'OrderedDict[Hashable, tuple]' = OrderedDict()

    def lookup(self, key: Hashable, compute: Callable[[], T], stamp: tuple = ()) -> T:
        """The value kept under `key`, or compute()'s, kept; also recomputed when `stamp` differs from the
        stamp the value was kept with."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            entry = self._entries[key] = (stamp, compute())
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry[1]

    def clear(self):
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo):
        return type(self)(self.max_entries)

    def __getstate__(self):
        return {'max_entries': self.max_entries}

    def __setstate__(self, state):
        self.__init__(**state)


class ParameterCache(LruCache):
    """ Values computed from parameters, reused while the parameters stay the same.

    `get(key, sources, compute)` returns compute(), kept under `key` while no autograd graph is recorded
    and no graph is traced (under torch.compile or export the computation stays in the graph). An entry is
    recomputed when one of its sources changes in place (its version counter: optimizer steps,
    load_state_dict) or is replaced (its storage, dtype or device); modules that hold a cache clear it in
    `_apply` (`.to()`, `.half()`, `.cuda()`), where a freed storage's address may be reused at once.
    At most `max_entries` keys are kept (see LruCache).
    """

    @staticmethod
    def active() -> bool:
        """Whether values may be reused: no gradient to record, no graph being traced."""
        return not torch.is_grad_enabled() and not is_symbolic()

    def get(self, key: Hashable, sources: Iterable[torch.Tensor], compute: Callable[[], T]) -> T:
        if not self.active():
            return compute()
        return self.lookup(key, compute, stamp=tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in sources))
