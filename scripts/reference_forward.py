#!/usr/bin/env python3
"""A plain float64 forward pass, independent of kojo, for checking kojo's logits.

Reads a GGUF file with the `gguf` package (its own dequantizers), runs llama / qwen2 / gemma3
in numpy float64 with no KV cache and no quantized arithmetic (`--f16-kv` rounds K, V and the
query to float16, as an f16 KV cache does, and nothing else), and prints, as JSON, the top-k
log-probabilities of the next token at each position from `--from` on:

    reference_forward.py MODEL.gguf --ids '[1, 2, 3, 4]' --from 2 --top 5
    -> [[[id, logprob] x top] per position 2..len(ids)-1]

Position i's distribution predicts token i+1, so `--from len(prompt)-1` lines up with
`kojo generate --json`'s `top_logprobs`.
"""
import argparse
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def load(path):
    r = GGUFReader(path)
    arch = field(r, "general.architecture")
    k = lambda s, d=None: field(r, f"{arch}.{s}", d)
    cfg = dict(
        arch=arch,
        n_layers=k("block_count"),
        hidden=k("embedding_length"),
        n_heads=k("attention.head_count"),
        n_kv=k("attention.head_count_kv", k("attention.head_count")),
        eps=k("attention.layer_norm_rms_epsilon", 1e-6 if arch.startswith("gemma") else 1e-5),
        base=k("rope.freq_base", 10000.0),
        window=k("attention.sliding_window"),
        scale=k("rope.scaling.factor", 1.0) or 1.0,
    )
    cfg["head_dim"] = k("attention.key_length", cfg["hidden"] // cfg["n_heads"])
    cfg["n_rot"] = k("rope.dimension_count", cfg["head_dim"])
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        # gguf dims are [cols, rows]; numpy shape comes out [rows, cols]
        w[t.name] = a.reshape([int(d) for d in reversed(t.shape)])
    return cfg, w


def rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope(x, pos, n_rot, base, freq_scale, interleaved, factors=None):
    # x [T, heads, hd]
    half = n_rot // 2
    inv = base ** (-2.0 * np.arange(half) / n_rot)
    if factors is not None:
        inv = inv / factors
    th = (pos[:, None] * freq_scale) * inv[None, :]  # [T, half]
    c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
    y = x.copy()
    if interleaved:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        y[..., 0:n_rot:2] = a * c - b * s
        y[..., 1:n_rot:2] = a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:n_rot]
        y[..., :half] = a * c - b * s
        y[..., half:n_rot] = a * s + b * c
    return y


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def f16(x):
    return x.astype(np.float16).astype(np.float64)


def forward(cfg, w, ids, kv_f16):
    arch = cfg["arch"]
    T = len(ids)
    H, KV, hd = cfg["n_heads"], cfg["n_kv"], cfg["head_dim"]
    eps = cfg["eps"]
    pos = np.arange(T, dtype=np.float64)
    x = w["token_embd.weight"][ids]
    if arch == "gemma3":
        x = x * np.sqrt(cfg["hidden"])
    for l in range(cfg["n_layers"]):
        p = lambda n: w[f"blk.{l}.{n}"]
        h = rms(x, p("attn_norm.weight"), eps)
        q = h @ p("attn_q.weight").T
        k = h @ p("attn_k.weight").T
        v = h @ p("attn_v.weight").T
        if arch == "qwen2":
            q, k, v = q + p("attn_q.bias"), k + p("attn_k.bias"), v + p("attn_v.bias")
        q, k, v = q.reshape(T, H, hd), k.reshape(T, KV, hd), v.reshape(T, KV, hd)
        window = None
        base, fscale = cfg["base"], 1.0 / cfg["scale"]
        if arch == "gemma3":
            q = rms(q, p("attn_q_norm.weight"), eps)
            k = rms(k, p("attn_k_norm.weight"), eps)
            if cfg["window"] and l % 6 < 5:
                window, base, fscale = cfg["window"], 10000.0, 1.0
        inter = arch == "llama"
        factors = w.get("rope_freqs.weight")
        q = rope(q, pos, cfg["n_rot"], base, fscale, inter, factors)
        k = rope(k, pos, cfg["n_rot"], base, fscale, inter, factors)
        if kv_f16:
            # kojo's (and llama.cpp's) KV cache holds f16, and the query is rounded to f16 for q.k
            q, k, v = f16(q), f16(k), f16(v)
        g = H // KV
        out = np.zeros((T, H, hd))
        for hh in range(H):
            s = q[:, hh, :] @ k[:, hh // g, :].T / np.sqrt(hd)  # [T, T]
            i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
            mask = j > i
            if window:
                mask |= (i - j) >= window
            s[mask] = -np.inf
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, hh, :] = s @ v[:, hh // g, :]
        o = out.reshape(T, H * hd) @ p("attn_output.weight").T
        if arch == "gemma3":
            o = rms(o, p("post_attention_norm.weight"), eps)
        x = x + o
        h = rms(x, p("ffn_norm.weight"), eps)
        gate, up = h @ p("ffn_gate.weight").T, h @ p("ffn_up.weight").T
        act = gelu_tanh(gate) if arch == "gemma3" else gate / (1 + np.exp(-gate))
        d = (act * up) @ p("ffn_down.weight").T
        if arch == "gemma3":
            d = rms(d, p("post_ffw_norm.weight"), eps)
        x = x + d
    x = rms(x, w["output_norm.weight"], eps)
    out_w = w.get("output.weight", w["token_embd.weight"])
    return x @ out_w.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--from", dest="start", type=int, default=0)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--f16-kv", action="store_true", help="round K, V and Q to float16 as an f16 cache does")
    a = ap.parse_args()
    cfg, w = load(a.model)
    if cfg["arch"] not in ("llama", "qwen2", "gemma3"):
        sys.exit(f"{cfg['arch']}: not supported here")
    ids = json.loads(a.ids)
    logits = forward(cfg, w, ids, a.f16_kv)
    res = []
    for row in logits[a.start:]:
        m = row.max()
        lp = row - (m + np.log(np.exp(row - m).sum()))
        top = np.argsort(-lp, kind="stable")[: a.top]
        res.append([[int(i), float(lp[i])] for i in top])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
