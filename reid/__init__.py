"""Images and vectors: what the stream runs to turn a detection into a deer.

Nothing is re-exported here, so that `import reid.matching` stays free of torch. The modules
at this level are the ones production loads:

- `reid.preprocess`: decoding, cropping and tensor preparation (square or side-view inputs);
- `reid.backbones`: the two ensemble members (multi-scale ResNet50, EfficientNet-B0);
- `reid.weights`: where the weights come from, the `embedding_version`, every checkpoint
  format (`reid-ensemble/1`, `reid-single/1`);
- `reid.calibration`: the data-free calibration of the seeded initialisation;
- `reid.embedder`: the embedding service and its PyTorch backend;
- `reid.onnx_backend`: the onnxruntime backend (export, cache, session);
- `reid.gpu_decode`: JPEG decode, crop and resize on the GPU (nvJPEG);
- `reid.matching`: the similarity and assignment rule, and its defaults (pure numpy).

Making models lives in `reid.training`, judging them in `reid.evaluation`; nothing at this
level imports either, and nothing in `reid` imports `streams` or `sinks`.
"""
