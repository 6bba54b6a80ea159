"""Foreign checkpoints to and from MMFormer's config and state dict: open_clip and Hugging Face CLIP.

Pure mappings (config dicts and tensors in, :class:`~mmformer.config.ModelConfig` and MMFormer
state-dict keys out, and back); :meth:`mmformer.model.MMFormer.from_open_clip` and
:meth:`~mmformer.model.MMFormer.from_hf_clip` build models from them, :mod:`mmformer.clip_io`
holds the ``mmformer import`` / ``mmformer export --open-clip`` verbs.
"""
