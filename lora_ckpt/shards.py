"""This rank's piece of a (sharded) parameter: where it lies in the full tensor, reading exactly its
bytes from a safetensors file, slicing it from a memory map, and wrapping it back as a DTensor.
Used by :mod:`lora_ckpt.distributed`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .io import DTYPES, byte_view

__all__ = ["local_region", "nf4_local", "read_local", "slice_local", "target_device", "wrap_local"]


def local_region(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's piece of ``t`` (a DTensor), else the whole tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(shape), tuple(offset)
    return tuple(t.shape), (0,) * t.dim()


def target_device(t: torch.Tensor) -> torch.device:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        kind = t.device_mesh.device_type
        if kind == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(kind)
    return t.device if t.device.type != "meta" else torch.device("cpu")


def slice_local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``full`` for parameter ``like``, copied into new memory of ``like``'s dtype."""
    shape, offset = local_region(like)
    piece = full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))] if full.dim() else full
    out = torch.empty(shape, dtype=like.dtype, device=target_device(like))
    out.copy_(piece)
    return out


def read_local(header: Any, key: str, like: torch.Tensor) -> torch.Tensor | None:
    """This rank's piece of tensor ``key`` (for parameter ``like``) read straight from the file into
    new memory (``preadv`` of exactly its bytes: no mapped pages, no readahead into other ranks'
    rows), when the piece is one byte range (rows of dim 0, every other dim whole); else None.

    Raises:
        CheckpointFormatError: the file ends before the tensor does.
    """
    info = header.tensors[key]
    shape, offset = local_region(like)
    if tuple(shape[1:]) != tuple(info.shape[1:]) or any(offset[1:]) or not info.shape:
        return None
    row = info.nbytes // info.shape[0] if info.shape[0] else 0
    src_dtype = getattr(torch, DTYPES[info.dtype][1])
    buf = torch.empty(shape, dtype=src_dtype)
    want = row * shape[0]
    if want:
        view = byte_view(buf)
        fd = os.open(header.path, os.O_RDONLY)
        try:
            got = 0
            while got < want:  # preadv may return short
                n = os.preadv(fd, [view[got:]], info.begin + offset[0] * row + got)
                if n <= 0:
                    from .errors import CheckpointFormatError

                    raise CheckpointFormatError(f"{header.path}: the file ends inside tensor {key!r}; it is "
                                                "truncated", path=header.path)
                got += n
        finally:
            os.close(fd)
    device = target_device(like)
    return buf if buf.dtype == like.dtype and device.type == "cpu" else buf.to(device=device, dtype=like.dtype)


def wrap_local(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    return local


def nf4_local(full: torch.Tensor, like: torch.Tensor, *, key: str) -> torch.Tensor:
    """This rank's piece of NF4 parameter ``like`` from the FULL float tensor ``full``, as torchtune loads NF4
    under FSDP2: the whole tensor is quantized (NF4's double quantization centres the block scales on
    their per-tensor mean, so a quantized slice would give other bytes), then ``torch.chunk``-ed along
    dim 0 and this rank's chunk copied (1-D meshes: ``Shard(0)`` or ``Replicate``).

    Raises:
        UsageError: ``like`` is sharded another way (a 2-D mesh, or a dim other than 0).
        QuantizationError: NF4 cannot block the tensor.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from .nf4 import quantize_nf4, releasing_file_pages

    with releasing_file_pages():  # the mapped pages leave RSS chunk by chunk as they are quantized
        whole = quantize_nf4(full, dtype=like.dtype, device=target_device(like), key=key)
    if not isinstance(like, DTensor) or like.placements == (Replicate(),):
        return whole
    if like.device_mesh.ndim != 1 or like.placements != (Shard(0),):
        from .errors import UsageError

        raise UsageError(f"{key}: an NF4 weight sharded as {like.placements} on a {like.device_mesh.ndim}-D mesh; "
                         "expected Shard(0) on a 1-D mesh (fully_shard's default)")
    mesh = like.device_mesh
    piece = torch.chunk(whole, mesh.size(), dim=0)[mesh.get_local_rank()]
    local = piece.new_zeros(piece.size())  # its own storage, so the full NF4 tensor is freed; not piece.clone():
    local.copy_(piece)  # torchao's clone re-quantizes the chunk (its own scaler mean: other bytes)
    return local
