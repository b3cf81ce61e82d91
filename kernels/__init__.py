"""Attention kernels (installed as unimm_jax.kernels): one entry point, an XLA reference, Pallas backends."""

from unimm_jax.kernels.attention import PROVEN, attention, auto_impl
from unimm_jax.kernels.blocks import tile_counts
from unimm_jax.kernels.pallas import KernelCompileError
from unimm_jax.kernels.reference import attention_mask, attention_reference
from unimm_jax.kernels.segments import (
    cu_seqlens_from_segment_ids,
    positions_from_segment_ids,
    segment_ids_from_cu_seqlens,
    segment_ids_from_lengths,
    span_ids_from_spans,
)

__all__ = [
    "PROVEN", "KernelCompileError", "attention", "attention_mask", "attention_reference", "auto_impl",
    "cu_seqlens_from_segment_ids", "positions_from_segment_ids", "segment_ids_from_cu_seqlens",
    "segment_ids_from_lengths", "span_ids_from_spans", "tile_counts",
]
