""" Shape arithmetic that stays in the graph while a model is exported (ONNX, torch.export, jit.trace).

In eager mode sizes are Python ints and the models take shape-dependent shortcuts (a window that
covers the map needs no partition, nothing to pad needs no pad). While a graph is recorded, sizes
are symbols (0-dim tensors under tracing, SymInts under torch.export): every such choice must then be
made by graph ops, or the graph is right only at the size it was recorded at. These helpers compute
on all three kinds, and `is_exporting()` tells the models to take their shortcut-free path.
Under torch.compile sizes may be symbols too (dynamic shapes): `is_symbolic()` takes the paths that
do not branch on a size there, and sizes are kept short formulas (see `_int_min`).
"""
from typing import Sequence

import torch

__all__ = [
    'is_exporting', 'is_symbolic', 'is_torch_exporting', 'may_pad', 'fresh_size', 'size_min', 'size_max', 'size_gt',
    'roll_hw', 'tile_count', 'tile_padding']


def is_exporting() -> bool:
    """True while torch.onnx, torch.export or torch.jit.trace records a graph."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or is_torch_exporting()


def is_torch_exporting() -> bool:
    """True while torch.export traces, False under torch.compile. Dynamo of torch <= 2.11 answers
    torch.compiler.is_exporting() with True in every compile, so the flag torch.export sets is read
    instead (a module global, which dynamo reads as a guarded constant)."""
    flag = getattr(torch.compiler, '_is_exporting_flag', None)
    return torch.compiler.is_exporting() if flag is None else flag


def is_symbolic() -> bool:
    """Whether sizes may be symbols of a graph being recorded: while exporting, and under torch.compile (whose
    dynamic shapes dynamo does not reveal: isinstance(size, torch.SymInt) answers False there). A branch on
    a symbol fixes the graph to one side of it (a recompile per side under torch.compile, one size in an
    export): take the path that is right at every size instead."""
    return is_exporting() or torch.compiler.is_compiling()


def may_pad(*pads) -> bool:
    """Whether padding by these sizes must be done: when any is nonzero, or may be a symbol (a zero pad
    then costs one copy, which inductor fuses into its consumer)."""
    return is_symbolic() or any(pads)


def fresh_size(value):
    """Under torch.export: a size as a new symbol, its formula forgotten (the item of a 0-dim tensor). Checks
    on it are then assumed, not proven for every input size; state the facts they need with torch._check."""
    size = torch.scalar_tensor(value, dtype=torch.long).item()
    torch._check(size >= 0)
    return size


def _size_op(a, b, on_tensors, on_symints, on_ints):
    """A binary op on two sizes, by their kind: traced 0-dim tensors, torch.export SymInts, or ints (which
    under dynamo include its SymInts: isinstance answers int there)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return on_tensors(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return on_symints(a, b)
    return on_ints(a, b)


# Under torch.compile a comparison of sizes is a guard, and the result stays a plain symbol or constant;
# min()/max() there become dynamo's symbolic Min/Max, which nest stage by stage into formulas whose
# simplification made dynamic-shape compiles of FLatten-Swin take minutes. While exporting (strict
# torch.export traces with dynamo too) the symbolic form is what keeps the graph right at every size.

def _int_min(a, b):
    return min(a, b) if is_exporting() else a if a <= b else b


def _int_max(a, b):
    return max(a, b) if is_exporting() else a if a >= b else b


def size_min(a, b):
    """min() of two sizes, kept symbolic."""
    return _size_op(a, b, torch.minimum, torch.sym_min, _int_min)


def size_max(a, b):
    """max() of two sizes, kept symbolic."""
    return _size_op(a, b, torch.maximum, torch.sym_max, _int_max)


def size_gt(a, b):
    """1 if size a > size b else 0, as a size (a condition that multiplies instead of branching)."""
    return size_min(size_max(a - b, 0), 1)


def tile_count(size, tile: int):
    """How many tiles of at most `tile` cover `size`: ceil(size / tile), 1 when size <= tile (the tile
    then shrinks to the size). A floor-division by a constant, which stays cheap for torch.export."""
    return (size + tile - 1) // tile


def tile_padding(size, tile: int):
    """How much padding makes `size` a whole number of tiles (0 when it is one), through floor division:
    a modulo of sizes nests into every later size under dynamic-shape compiles, and inductor cannot lower
    one that reaches a float."""
    return tile_count(size, tile) * tile - size


def roll_hw(x: torch.Tensor, shifts: Sequence, back: bool = False) -> torch.Tensor:
    """torch.roll of a (B, H, W, C) map by 0 <= shift <= size over H and W (by -shift if `back`).

    Shifts may be symbolic while exporting: torch.roll needs constants there, so the roll is two
    slices and a concat, also under torch.compile, where a roll's modulo indexing over symbolic sizes
    made inductor's CPU code generation slow.
    """
    if not is_symbolic():
        return torch.roll(x, shifts=tuple(-s for s in shifts) if back else tuple(shifts), dims=(1, 2))
    for dim, shift in zip((1, 2), shifts):
        split = shift if back else x.shape[dim] - shift  # the first output row is input row `split`
        head, tail = (x[:, :split], x[:, split:]) if dim == 1 else (x[:, :, :split], x[:, :, split:])
        x = torch.cat([tail, head], dim=dim)
    return x
