#!/usr/bin/env python3
"""Reference dequantization by the `gguf` Python package (llama.cpp's own), for kojo's tests.

  dequant_reference.py random OUT_DIR [SEED]
      For every block type kojo supports, write OUT_DIR/<TYPE>.bin (random blocks with finite
      f16 scales) and OUT_DIR/<TYPE>.f32 (gguf's dequantization, little-endian f32), and
      OUT_DIR/manifest.json ({type: n_weights}).
  dequant_reference.py hashes MODEL.gguf
      Print a JSON list of {name, type, sha256} with the sha256 of every tensor dequantized to
      little-endian f32 by gguf.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# Byte offsets of the f16 scale fields inside each block (kept finite so results are comparable
# bit for bit without NaN payload questions).
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def random_blocks(name, rng, n_blocks):
    qtype = T[name]
    block, size = GGML_QUANT_SIZES[qtype]
    if name == "F32":
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8), n_blocks
    if name == "F16":
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8), n_blocks
    if name == "BF16":
        f = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8), n_blocks
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        raw[:, off:off + 2] = scale
    return raw.reshape(-1), n_blocks * block


def cmd_random(out_dir, seed):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {}
    for name in TYPES:
        data, n = random_blocks(name, rng, 512 if GGML_QUANT_SIZES[T[name]][0] > 1 else 4096)
        ref = dequantize(data, T[name]).astype(np.float32, copy=False).reshape(-1)
        assert ref.size == n, (name, ref.size, n)
        (out / f"{name}.bin").write_bytes(data.tobytes())
        (out / f"{name}.f32").write_bytes(ref.astype("<f4").tobytes())
        manifest[name] = n
    (out / "manifest.json").write_text(json.dumps(manifest))


def cmd_hashes(model):
    r = GGUFReader(model)
    rows = []
    for t in r.tensors:
        f = dequantize(t.data, t.tensor_type).astype("<f4", copy=False)
        rows.append({"name": t.name, "type": t.tensor_type.name, "sha256": hashlib.sha256(f.tobytes()).hexdigest()})
    print(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "random":
        cmd_random(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    elif len(sys.argv) == 3 and sys.argv[1] == "hashes":
        cmd_hashes(sys.argv[2])
    else:
        sys.exit(__doc__)
