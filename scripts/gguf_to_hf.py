#!/usr/bin/env python3
"""Write a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) from a llama-architecture GGUF with a gpt2/smollm tokenizer, using the
`gguf`, `safetensors` and `tokenizers` packages. Used by kojo's tests to get a real safetensors
model where no HF checkpoint can be downloaded.

  gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype F16|BF16|F32]
"""
import argparse
import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def unpermute(w, n_head):
    # llama.cpp's converter interleaves the rotary halves of Q and K rows; undo it for HF order.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="F16", choices=["F16", "BF16", "F32"])
    a = ap.parse_args()
    r = GGUFReader(a.gguf)
    arch = field(r, "general.architecture")
    assert arch == "llama", f"only llama GGUFs are supported, got {arch}"
    hp = lambda k: field(r, f"llama.{k}")
    n_head, n_kv = hp("attention.head_count"), hp("attention.head_count_kv")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        name = t.name
        if name.startswith("blk."):
            _, i, kind, suffix = name.split(".", 3)
            if kind == "attn_q":
                w = unpermute(w, n_head)
            elif kind == "attn_k":
                w = unpermute(w, n_kv)
            hf = f"model.layers.{i}.{LAYER[kind]}.{suffix}"
        else:
            hf = NAMES[name]
        if a.dtype == "F16":
            w = w.astype(np.float16)
        elif a.dtype == "BF16":
            w = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation; safetensors.numpy lacks bf16
        tensors[hf] = np.ascontiguousarray(w)
    if a.dtype == "BF16":
        raise SystemExit("BF16 output needs torch or ml_dtypes; use F16 or F32")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    bos, eos = field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hp("embedding_length"), "intermediate_size": hp("feed_forward_length"),
        "num_hidden_layers": hp("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "vocab_size": len(tokens),
        "max_position_embeddings": hp("context_length"), "rope_theta": hp("rope.freq_base"),
        "rms_norm_eps": hp("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": "output.weight" not in [t.name for t in r.tensors],
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": {"F16": "float16", "F32": "float32"}[a.dtype],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    pre = field(r, "tokenizer.ggml.pre")
    assert field(r, "tokenizer.ggml.model") == "gpt2" and pre in ("smollm", "starcoder"), pre
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in range(len(tokens)) if types[i] == 3])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos], "eos_token": tokens[eos], "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token")),
        "chat_template": field(r, "tokenizer.chat_template"),
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
