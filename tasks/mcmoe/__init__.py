"""MC-MoE ("Mixture Compressor for MoE LLMs Gains More", ICLR 2025) for every adapter family.

  config      QuantizeConfig and the checks a model's shape alone decides
  pipeline    PMQ over a whole model: calibration pass, per-layer allocation, quantization
  pmq         per-expert factors (frequency, routing weight, quantization loss per width)
  allocation  PMQ bit allocation: exact multiple-choice knapsack by dynamic programming
  quantizer   group-wise asymmetric RTN and GPTQ (batched over experts)
  packing     bit-packing of 1..8-bit codes into uint8
  packed      the packed checkpoint format, `save_quantized`, `load_quantized`
  experts     expert weights in one canonical layout, routing capture
  odp         online dynamic pruning: `apply_dynamic_pruning`, `calibrate_betas`
The node entry point (`run_quantize`) is `slimmoe.tasks.nodes.quantize`. Nothing is imported here,
so reading the config does not load torch.
"""
