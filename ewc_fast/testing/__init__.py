"""Float64 oracles of ewc_fast, importable by tests and benchmarks.

* :mod:`.consolidation` -- the five consolidation ops, the naive per-task penalty and the seed
  report's expanded fp32 form, in float64.
* :mod:`.conv` -- ``persample_conv_sq_`` by per-sample autograd of the library convolution.
* :mod:`.fused_step` -- one step of the fused optimizer (SGD / Adam / AdamW + EWC + SI + WVA), in
  float64.
* :mod:`.importance` -- every importance method through per-sample gradients of the whole model
  (``torch.func``), in float64.

Nothing here is fast; everything here is meant to be obviously right.
"""
