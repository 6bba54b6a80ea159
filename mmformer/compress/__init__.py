"""Model compression for inference: dynamic int8 quantization (:func:`quantize_int8`)."""

from .int8 import int8_linear_bytes, quantize_int8

__all__ = ["int8_linear_bytes", "quantize_int8"]
