"""Block stacking: pure state-dict surgery that grows a k-block model into 2k blocks.

Nothing here knows about Ray, DeepSpeed or files: tensors in, tensors out. The plan (which new
key comes from which old key) is computed from names and shapes alone, so the growth coordinator
can apply it one tensor at a time to a sharded checkpoint, and the same plan maps optimizer
moments when they are carried over.

- ``adjacent`` (StackA): new blocks 2i and 2i+1 copy old block i.
- ``cross`` (StackC): new blocks i and i+k copy old block i.
- alpha policies: ``reset`` every alpha 0 (the authors' code); ``copy`` both copies keep the old
  alpha; ``zero_new`` originals keep their alpha, the added copy gets 0. With ``zero_new`` each
  added block is the identity, so the grown model computes exactly its parent's function, as
  long as every original block keeps its dilation (``grown_block_dilations`` with ``follow``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

import torch

from stackrec_dist.config import GrowthConfig

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# LayerNorm parameters: the blocks' ln1/ln2 and SASRec's final_norm.
_LAYERNORM_KEY = re.compile(r"(^|\.)(ln\d+|final_norm)\.(weight|bias)$")
_HEAD_PREFIX = "head."

Role = Literal["copy", "zero", "fresh"]


class StackingError(ValueError):
    """The state dict does not look like the model the caller says it is."""


@dataclass(frozen=True)
class KeyMapping:
    """How one tensor of the grown model is made.

    role ``copy``: clone ``source`` (an old key); ``zero``: zeros of the source's shape (a muted
    alpha); ``fresh``: take the value from a freshly initialised model (``source`` is the new key).
    """

    key: str
    source: str
    role: Role


def source_block(new_index: int, old_blocks: int, method: str) -> int:
    """Old block that new block ``new_index`` copies."""
    if method == "adjacent":
        return new_index // 2
    if method == "cross":
        return new_index % old_blocks
    raise StackingError(f"unknown stacking method {method!r} (adjacent or cross)")


def is_added_copy(new_index: int, old_blocks: int, method: str) -> bool:
    """True for the copy that zero_new mutes: the second of each adjacent pair, the upper half for cross."""
    if method == "adjacent":
        return new_index % 2 == 1
    return new_index >= old_blocks


def grown_block_dilations(old: list[int], method: str, policy: str, cycle: list[int]) -> list[int]:
    """Per-block dilations of the 2k model: ``follow`` the copied source, or the ``position`` cycle."""
    k = len(old)
    if policy == "follow":
        return [old[source_block(j, k, method)] for j in range(2 * k)]
    return [cycle[j % len(cycle)] for j in range(2 * k)]


def _split_keys(shapes: Mapping[str, torch.Size], num_blocks: int) -> tuple[dict[int, dict[str, torch.Size]], dict[str, torch.Size]]:
    blocks: dict[int, dict[str, torch.Size]] = {}
    other: dict[str, torch.Size] = {}
    for key, shape in shapes.items():
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = tuple(shape)
        else:
            other[key] = tuple(shape)
    if sorted(blocks) != list(range(num_blocks)):
        raise StackingError(
            f"expected blocks 0..{num_blocks - 1} in the state dict, found block indices {sorted(blocks)}; "
            "model.num_blocks does not match the checkpoint"
        )
    reference = blocks[0]
    for index, params in blocks.items():
        if params != reference:
            diff = sorted(set(params.items()) ^ set(reference.items()))
            raise StackingError(f"block {index} differs from block 0 in parameters/shapes: {diff}")
    return blocks, other


def stacking_plan(shapes: Mapping[str, torch.Size], num_blocks: int, growth: GrowthConfig) -> list[KeyMapping]:
    """The key map from a ``num_blocks`` model to a ``2 * num_blocks`` one (names and shapes only)."""
    blocks, other = _split_keys(shapes, num_blocks)
    plan: list[KeyMapping] = []
    for key in other:
        fresh = (key.startswith(_HEAD_PREFIX) and not growth.copy_head) or (
            _LAYERNORM_KEY.search(key) is not None and not growth.copy_layernorm
        )
        plan.append(KeyMapping(key, key, "fresh" if fresh else "copy"))
    for new_index in range(2 * num_blocks):
        old_index = source_block(new_index, num_blocks, growth.method)
        for name in blocks[old_index]:
            new_key, old_key = f"blocks.{new_index}.{name}", f"blocks.{old_index}.{name}"
            if name == "alpha":
                zero = growth.alpha_policy == "reset" or (
                    growth.alpha_policy == "zero_new" and is_added_copy(new_index, num_blocks, growth.method)
                )
                plan.append(KeyMapping(new_key, old_key, "zero" if zero else "copy"))
            elif _LAYERNORM_KEY.search(new_key) and not growth.copy_layernorm:
                plan.append(KeyMapping(new_key, new_key, "fresh"))
            else:
                plan.append(KeyMapping(new_key, old_key, "copy"))
    return plan


def apply_plan(
    plan: list[KeyMapping],
    state: Mapping[str, torch.Tensor],
    fresh: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Build the grown state dict. ``fresh`` (a new 2k-block model's state) is needed for ``fresh`` roles."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for m in plan:
        if m.role == "fresh":
            if fresh is None or m.source not in fresh:
                raise StackingError(f"{m.key} is re-initialised by this growth policy but no fresh value was given")
            out[m.key] = fresh[m.source].detach().clone()
            if m.source in state:
                used.add(m.source)
            continue
        if m.source not in state:
            raise StackingError(f"stacking needs {m.source} but the state dict lacks it")
        tensor = state[m.source]
        out[m.key] = torch.zeros_like(tensor) if m.role == "zero" else tensor.detach().clone()
        used.add(m.source)
    leftovers = sorted(set(state) - used)
    if leftovers:
        raise StackingError(f"state dict keys not consumed by the stacking plan: {leftovers}")
    return out


def stack_state_dict(
    state: Mapping[str, torch.Tensor],
    num_blocks: int,
    growth: GrowthConfig,
    fresh: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Grow ``state`` (a ``num_blocks`` model) into a ``2 * num_blocks`` model's state dict."""
    plan = stacking_plan({k: v.shape for k, v in state.items()}, num_blocks, growth)
    return apply_plan(plan, state, fresh)


def check_matches(state: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, torch.Size]) -> None:
    """Fail with the offending keys when ``state`` does not fit a model with ``expected_shapes``."""
    missing = sorted(set(expected_shapes) - set(state))
    extra = sorted(set(state) - set(expected_shapes))
    wrong = sorted(k for k in set(state) & set(expected_shapes) if tuple(state[k].shape) != tuple(expected_shapes[k]))
    if missing or extra or wrong:
        raise StackingError(
            f"grown state dict does not fit the target model: missing={missing} unexpected={extra} "
            f"shape mismatch={[(k, tuple(state[k].shape), tuple(expected_shapes[k])) for k in wrong]}"
        )
