"""Quantized and packed linears: the schemes (int5, int8, int4) and their modules, oneDNN packing, the
verified on-disk quantized copy of a model, and the ``--quantize auto`` choice."""
