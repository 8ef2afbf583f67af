"""llama.cpp itself as the consumer of a GGUF adapter (used by tests/test_gguf.py, opt-in).

Needs a llama.cpp source tree (``LORA_CKPT_LLAMA_CPP``: its ``conversion/`` package and ``gguf-py``
write the base model GGUF) and a build of its libraries (``LORA_CKPT_LIBLLAMA``: the directory with
``libllama.so``), driven through llama-cpp-python's ctypes bindings (``LORA_CKPT_LLAMA_CPP_PYTHON``: the
llama-cpp-python 0.3.36 source tree, whose ``llama_cpp`` package loads ``LLAMA_CPP_LIB_PATH``).

    python tests/llama_cpp_consumer.py HF_DIR OUT.json [ADAPTER.gguf ...]  # logits: base, each adapter (TOKENS)
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path


def base_gguf(hf_dir: Path, out: Path) -> Path:
    """The HF model ``hf_dir`` as an F32 GGUF written by llama.cpp's own converter (no tokenizer:
    ``tokenizer.ggml.model = none``; tests feed token ids)."""
    src = Path(os.environ["LORA_CKPT_LLAMA_CPP"])
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(hf_dir, False)
    cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))

    class NoVocab(cls):  # type: ignore[misc,valid-type]
        model_arch = cls.model_arch

        def set_vocab(self) -> None:
            self._set_vocab_none()
            self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])  # no tokenizer to count it

    with torch.inference_mode():
        NoVocab(hf_dir, gguf.LlamaFileType.ALL_F32, out, hparams=hparams, eager=True).write()
    return out


def logits(model: Path, tokens: list[int], adapter: Path | None = None, scale: float = 1.0) -> list[list[float]]:
    """All-position logits of ``tokens`` from llama.cpp (CPU, one sequence), with ``adapter`` applied."""
    import types

    os.environ["LLAMA_CPP_LIB_PATH"] = os.environ["LORA_CKPT_LIBLLAMA"]
    if "llama_cpp" not in sys.modules:  # the ctypes bindings only (the package __init__ wants the server extras)
        pkg = types.ModuleType("llama_cpp")
        pkg.__path__ = [str(Path(os.environ["LORA_CKPT_LLAMA_CPP_PYTHON"]) / "llama_cpp")]
        sys.modules["llama_cpp"] = pkg
    from llama_cpp import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    m = L.llama_model_load_from_file(str(model).encode(), mp)
    assert m, f"llama.cpp could not load {model}"
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 64, 64, 1, 1
    cp.type_k = cp.type_v = 0  # an F32 KV cache (default F16) and no flash attention: float32 throughout
    cp.flash_attn_type = 0
    ctx = L.llama_init_from_model(m, cp)
    ad = None
    if adapter is not None:
        ad = L.llama_adapter_lora_init(m, str(adapter).encode())
        assert ad, f"llama.cpp could not load the adapter {adapter}"
        arr = (L.llama_adapter_lora_p_ctypes * 1)(ad)
        assert L.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(scale)) == 0
    n = len(tokens)
    batch = L.llama_batch_init(n, 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    assert L.llama_decode(ctx, batch) == 0
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(m))
    out = [[L.llama_get_logits_ith(ctx, i)[j] for j in range(vocab)] for i in range(n)]
    L.llama_batch_free(batch)
    if ad is not None:
        L.llama_adapter_lora_free(ad)
    L.llama_free(ctx)
    L.llama_model_free(m)
    return out


if __name__ == "__main__":
    hf, out, adapters = Path(sys.argv[1]), Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]]
    model = base_gguf(hf, out.with_suffix(".base.gguf"))
    toks = json.loads(os.environ["TOKENS"])
    result = {"base": logits(model, toks), "adapters": {str(a): logits(model, toks, a) for a in adapters}}
    out.write_text(json.dumps(result))
