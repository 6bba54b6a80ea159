"""Model compression for inference: dynamic int8 quantization (:func:`quantize_int8`, torchao or
torch.ao) and ONNX export of the two encoders with onnxruntime int8 copies (:mod:`.onnx`,
needs the optional ``onnx``/``onnxruntime`` packages)."""

from .int8 import available_backends, default_backend, int8_linear_bytes, quantize_int8

__all__ = ["available_backends", "default_backend", "int8_linear_bytes", "quantize_int8"]
