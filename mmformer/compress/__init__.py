"""Model compression for inference: dynamic int8 quantization (:func:`quantize_int8`, torchao or
torch.ao), ONNX export of the two encoders with onnxruntime int8 copies (:mod:`.onnx`,
needs the optional ``onnx``/``onnxruntime`` packages) and attention-head pruning (:mod:`.prune`,
imported on its own: it reads training batches through Lightning's data module)."""

from .int8 import available_backends, default_backend, int8_linear_bytes, quantize_int8

__all__ = ["available_backends", "default_backend", "int8_linear_bytes", "quantize_int8"]
