"""Read DeepSpeed ZeRO 0-3 checkpoints on CPU, with no GPU and no process group, one tensor at a time.

``engine.save_checkpoint(dir, tag)`` writes, under ``dir/tag/`` (DeepSpeed 0.19.8, checked here):

* stage 0 / 1 / 2: ``mp_rank_00_model_states.pt`` (written by rank 0) with ``module`` = the full
  module state dict in the engine's compute dtype (fp32 on CPU) and ``param_shapes``;
* stage 1 / 2 (and bf16 with stage 0): ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``
  per rank, whose ``optimizer_state_dict.single_partition_of_fp32_groups[g]`` is rank r's slice of
  param group g flattened in ``param_shapes[g]`` order (optionally with per-param
  ``param_alignment_paddings``); concatenating the ranks' slices gives the whole group;
* stage 3: per rank ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (``module`` holds empty
  placeholders, plus ``param_shapes``/buffers) and ``..._optim_states.pt`` whose
  ``optimizer_state_dict.fp32_flat_groups[g]`` holds, for each parameter of group g in order,
  ``ceil(numel / world)`` elements (rank r has elements ``[r*p, (r+1)*p)`` of the flattened
  parameter, zero-padded at the end).

Files are opened with ``torch.load(mmap=True)``, so reconstructing one parameter touches only its
slices: peak memory is about one full tensor, whatever the model size. The checkpoint files
contain pickled DeepSpeed objects (loss scaler, enums), hence ``weights_only=False``: read only
checkpoints this project wrote.

Keys are the engine module's parameter names. The workers wrap the model in the training
objective (``RecommenderLoss.model``), so the default ``strip_prefix="model."`` returns the
architecture's own keys (``item_embedding.weight``, ``blocks.0.alpha``, ``head.weight``, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL_PREFIX = "model."
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_MODEL3_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def resolve_tag_dir(ckpt_dir: str | Path, tag: str | None = None) -> Path:
    """The directory holding the shard files: ``ckpt_dir/tag``, ``ckpt_dir/<latest>``, or
    ``ckpt_dir`` itself when the shards are directly inside it."""
    root = Path(ckpt_dir)
    if tag is not None:
        path = root / tag
    elif any(root.glob("*model_states.pt")):
        path = root
    elif (root / "latest").is_file():
        path = root / (root / "latest").read_text().strip()
    else:
        tags = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
        if len(tags) != 1:
            raise FileNotFoundError(
                f"{root}: no 'latest' file and {len(tags)} tag directories with model states; pass tag="
            )
        path = tags[0]
    if not path.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint directory {path} does not exist")
    return path


@dataclass
class ZeroCheckpointInfo:
    path: Path
    zero_stage: int
    world_size: int
    param_shapes: list[dict[str, torch.Size]]  # one ordered dict per optimizer param group
    model_file: Path  # rank 0's model-states file (buffers, shared params)
    optim_files: list[Path]  # per rank, ordered by rank; empty for a plain stage-0 fp32 checkpoint


def inspect_checkpoint(ckpt_dir: str | Path, tag: str | None = None) -> ZeroCheckpointInfo:
    path = resolve_tag_dir(ckpt_dir, tag)
    optim = sorted(
        ((int(m.group(1)), p) for p in path.iterdir() if (m := _OPTIM_RE.match(p.name))),
        key=lambda x: x[0],
    )
    optim_files = [p for _, p in optim]
    if [r for r, _ in optim] != list(range(len(optim))):
        raise FileNotFoundError(f"{path}: optimizer shards of ranks {[r for r, _ in optim]} (some missing)")
    stage3_models = sorted(
        ((int(m.group(1)), p) for p in path.iterdir() if (m := _MODEL3_RE.match(p.name))),
        key=lambda x: x[0],
    )
    if stage3_models:
        model_file = stage3_models[0][1]
    elif (path / "mp_rank_00_model_states.pt").is_file():
        model_file = path / "mp_rank_00_model_states.pt"
    else:
        raise FileNotFoundError(f"{path}: no DeepSpeed model-states file")
    model_states = _load(model_file)
    world = int(model_states.get("dp_world_size", len(optim_files) or 1))
    if optim_files:
        osd = _load(optim_files[0])["optimizer_state_dict"]
        stage = int(getattr(osd.get("zero_stage"), "value", osd.get("zero_stage", 0)))
        if "fp32_flat_groups" in osd:
            stage = 3
        if len(optim_files) != world:
            raise FileNotFoundError(f"{path}: {len(optim_files)} optimizer shards for a world of {world}")
    else:
        stage = 0
    shapes = model_states.get("param_shapes")
    if shapes is None:  # plain stage 0: shapes from the module itself
        shapes = [{k: v.shape for k, v in model_states["module"].items() if k not in set(model_states.get("buffer_names") or [])}]
    elif isinstance(shapes, dict):
        shapes = [shapes]
    frozen = model_states.get("frozen_param_shapes") or {}
    if frozen and stage == 3:
        raise NotImplementedError(f"{path}: frozen parameters in a ZeRO-3 checkpoint are not supported")
    return ZeroCheckpointInfo(path, stage, world, [dict(s) for s in shapes], model_file, optim_files)


def _virtual_slice(parts: list[torch.Tensor], bounds: list[int], start: int, length: int) -> torch.Tensor:
    """Elements [start, start+length) of the concatenation of ``parts`` (bounds = cumulative starts)."""
    pieces = []
    end = start + length
    for part, lo in zip(parts, bounds):
        hi = lo + part.numel()
        if hi <= start or lo >= end:
            continue
        a, b = max(start, lo) - lo, min(end, hi) - lo
        pieces.append(part[a:b])
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    if out.numel() != length:
        raise ValueError(f"checkpoint shards too short: wanted {length} elements at {start}, got {out.numel()}")
    return out


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def iter_consolidated_tensors(
    ckpt_dir: str | Path, tag: str | None = None, strip_prefix: str = MODEL_PREFIX
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full fp32 tensor)`` for every parameter, then every buffer, one at a time."""
    info = inspect_checkpoint(ckpt_dir, tag)
    model_states = _load(info.model_file)
    module = model_states["module"]
    buffer_names = list(model_states.get("buffer_names") or [])
    emitted: dict[str, torch.Tensor] = {}
    shared = dict(model_states.get("shared_params") or {})
    keep = set(shared.values())

    def emit(name: str, tensor: torch.Tensor):
        if name in keep:
            emitted[name] = tensor
        return _strip(name, strip_prefix), tensor

    if info.zero_stage == 0 and not info.optim_files:
        for shapes in info.param_shapes:
            for name in shapes:
                yield emit(name, module[name].detach().to(torch.float32).clone())
    elif info.zero_stage == 3:
        world = info.world_size
        flat = [_load(p)["optimizer_state_dict"]["fp32_flat_groups"] for p in info.optim_files]
        for g, shapes in enumerate(info.param_shapes):
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                per_rank = math.ceil(numel / world)
                pieces = [flat[r][g][offset:offset + per_rank] for r in range(world)]
                yield emit(name, torch.cat(pieces)[:numel].to(torch.float32).view(shape).clone())
                offset += per_rank
            available = flat[0][g].numel()
            if offset > available:
                raise ValueError(f"ZeRO-3 group {g}: consumed {offset} of {available} elements per rank")
    else:
        osds = [_load(p)["optimizer_state_dict"] for p in info.optim_files]
        paddings = osds[0].get("param_alignment_paddings")
        for g, shapes in enumerate(info.param_shapes):
            parts = [osd["single_partition_of_fp32_groups"][g] for osd in osds]
            bounds = [0]
            for part in parts[:-1]:
                bounds.append(bounds[-1] + part.numel())
            total = bounds[-1] + parts[-1].numel()
            group_pad = paddings[g] if paddings is not None else None
            if group_pad is not None and len(group_pad) != len(shapes):
                group_pad = None  # layout without per-parameter padding
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                yield emit(name, _virtual_slice(parts, bounds, offset, numel).to(torch.float32).view(shape))
                offset += numel + (int(group_pad[i]) if group_pad else 0)
            if offset > total:
                raise ValueError(f"ZeRO group {g}: consumed {offset} of {total} elements")
        # Frozen parameters (stage < 3) live unpartitioned in the module state.
        for name in (model_states.get("frozen_param_shapes") or {}):
            yield emit(name, module[name].detach().to(torch.float32).clone())
    for alias, target in shared.items():
        if target in emitted:
            yield _strip(alias, strip_prefix), emitted[target]
    for name in buffer_names:
        if name in module:
            yield _strip(name, strip_prefix), module[name].detach().clone()


def load_consolidated_state_dict(
    ckpt_dir: str | Path, tag: str | None = None, strip_prefix: str = MODEL_PREFIX
) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO 0-3 checkpoint (all tensors in memory at once)."""
    return dict(iter_consolidated_tensors(ckpt_dir, tag, strip_prefix))


def load_into_module(module: torch.nn.Module, ckpt_dir: str | Path, tag: str | None = None,
                     strip_prefix: str = MODEL_PREFIX) -> None:
    """Copy a (possibly sharded) checkpoint into an unsharded module tensor by tensor; strict.

    Every module key must be found with the same shape, and every checkpoint key must be used.
    """
    params = dict(module.state_dict())
    missing = set(params)
    with torch.no_grad():
        for name, tensor in iter_consolidated_tensors(ckpt_dir, tag, strip_prefix):
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no counterpart in {type(module).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != module {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            missing.discard(name)
    # Non-persistent buffers are not in state_dict(); anything else missing is an error.
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)}")
