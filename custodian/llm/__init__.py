"""Language models at ``model add``: GGUF files read and converted to an ONNX decoder plus tokenizer."""
