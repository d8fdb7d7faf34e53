"""``model add FILE.gguf``: a Llama-family GGUF file to a language-model bundle, without torch.

The GGUF's weights are dequantised one tensor at a time into float32 external initializers of an
ONNX decoder (``decoder_graph``), appended straight into the bundle's buffer; the tokenizer and
chat template come from its ``tokenizer.*`` metadata. Float32 is the default on purpose: on CPU,
onnxruntime's float32 ``MatMul`` decodes several times faster than ``MatMulNBits`` with the float
zero points that GGUF's Q4_1 needs to stay exact (docs/llm.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from custodian.llm.decoder_graph import ExternalWeights, build_decoder
from custodian.llm.gguf_model import GgufModel
from custodian.llm.gguf_tokenizer import tokenizer_of
from enclave.llm.bundle import BundleWriter, TextModelInfo

# Called with (layers converted, layers in all) as each decoder layer's weights are in.
Progress = Callable[[int, int], None]


def convert_gguf(path: Path, *, keep_blocks: bool = False, progress: Progress | None = None) -> bytearray:
    """The bundle's bytes; ``ModelFormatError`` naming what Custos cannot convert.

    ``keep_blocks``: matrices stored as Q4_0, Q4_1 or Q8_0 stay in their blocks (``MatMulNBits``):
    a bundle about the GGUF's size instead of float32's, decoding slower on CPU (docs/llm.md).
    """
    model = GgufModel(path)
    tokenizer = tokenizer_of(model)
    shape = model.text.shape
    writer = BundleWriter()
    source = partial(model.weight, keep_blocks=keep_blocks)
    graph = build_decoder(shape, source, ExternalWeights(writer.data), progress=progress)
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
