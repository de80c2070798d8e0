"""The exported graphs, one module each (transformer, VAE decoder, text encoder, safety checker); export.onnx_export
composes them into one export folder and its manifest."""
