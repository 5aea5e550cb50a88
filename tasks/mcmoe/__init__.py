"""MC-MoE ("Mixture Compressor for MoE LLMs Gains More", ICLR 2025) for every adapter family.

  packing     bit-packing of 1..8-bit codes into uint8
  quantizer   group-wise asymmetric RTN and GPTQ (batched over experts)
  allocation  PMQ bit allocation: exact multiple-choice knapsack by dynamic programming
  pmq         per-expert factors (frequency, routing weight, quantization loss per width)
  packed      the packed checkpoint format, `save_quantized`, `load_quantized`
  odp         online dynamic pruning: `apply_dynamic_pruning`, `calibrate_betas`
The task entry point (config, `run_quantize`) is `slimmoe.tasks.quantize`.
"""

from .allocation import AllocationError, allocate_bits
from .odp import DynamicPruning, apply_dynamic_pruning, calibrate_betas
from .packed import QuantizedFormatError, load_quantized

__all__ = ["AllocationError", "allocate_bits", "DynamicPruning", "apply_dynamic_pruning", "calibrate_betas",
           "QuantizedFormatError", "load_quantized"]
