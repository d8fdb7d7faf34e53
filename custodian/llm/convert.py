"""``model add FILE.gguf``: a Llama-family GGUF file to a language-model bundle, without torch.

The GGUF's weights are dequantised one tensor at a time into float32 external initializers of an
ONNX decoder (``decoder_graph``), appended straight into the bundle's buffer; the tokenizer and
chat template come from its ``tokenizer.*`` metadata. Float32 is kept on purpose: onnxruntime's CPU
kernels run it fastest and the ONNX output matches the reference exactly (see docs/llm.md for the
measurements and the trade-off against 4-bit ``MatMulNBits``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from custodian.llm.decoder_graph import ExternalWeights, build_decoder
from custodian.llm.gguf_model import GgufModel
from custodian.llm.gguf_tokenizer import tokenizer_of
from enclave.llm.bundle import BundleWriter, TextModelInfo

# Called with (layers converted, layers in all) as each decoder layer's weights are in.
Progress = Callable[[int, int], None]


def convert_gguf(path: Path, *, progress: Progress | None = None) -> bytearray:
    """The bundle's bytes; ``ModelFormatError`` naming what Custos cannot convert."""
    model = GgufModel(path)
    tokenizer = tokenizer_of(model)
    shape = model.text.shape
    writer = BundleWriter()
    graph = build_decoder(shape, model.weight, ExternalWeights(writer.data), progress=progress)
    writer.add("graph", graph.SerializeToString())
    writer.add("tokenizer", tokenizer.json.encode())
    info = TextModelInfo(
        name=model.text.name,
        architecture=model.text.architecture,
        context_length=model.text.context_length,
        layers=shape.layers,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab,
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        bos_token_id=tokenizer.bos_token_id,
        add_bos_token=tokenizer.add_bos_token,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        chat_template=tokenizer.chat_template,
        source="gguf",
    )
    return writer.finish(info)
