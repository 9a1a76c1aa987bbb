#!/usr/bin/env python3
"""Helpers of scripts/gpu-check.sh that need PyTorch (on the GPU machine):

  gpu_check.py hf OUT        the random SmolLM2-shaped model kojo wrote (OUT/small-model) in
                             Hugging Face transformers: logits of the same prompt against kojo's
                             GPU logits (OUT/model.json), and greedy tokens
  gpu_check.py ceilings OUT  device-to-device copy bandwidth and an 8192^3 bf16 GEMM's rate
                             (OUT/ceilings.json)
  gpu_check.py table OUT     the Markdown table of every figure beside its floor
"""
import json
import math
import os
import sys

# relative L2 of the last prompt position's logits against transformers (f32): kojo keeps K, V
# and q.k in f16; on the GPU the prompt's bf16 GEMMs also round activations to bf16
HF_TOL_CPU = 1e-2
HF_TOL_GPU = 5e-2


def num(v):
    """A JSON number; serde_json writes infinities and NaN as null."""
    return float("inf") if v is None else v


def read_json(path):
    with open(path) as f:
        return json.load(f)


def hf(out):
    import torch
    from transformers import AutoModelForCausalLM

    m = read_json(os.path.join(out, "model.json"))
    folder = os.path.join(out, "small-model")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except TypeError:  # transformers before 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model = model.cuda().eval()
    prompt = torch.tensor([m["prompt"]], device="cuda")
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].double().cpu()

        def rel(name):
            ref = torch.tensor(m[name], dtype=torch.float64)
            return (logits - ref).norm().item() / logits.norm().item()

        rel_gpu, rel_cpu = rel("gpu_last_prompt_logits"), rel("cpu_last_prompt_logits")
        # transformers' greedy continuation of the prompt, against the CPU backend's tokens
        ids = prompt
        hf_tokens = []
        for _ in range(len(m["cpu_tokens"])):
            nxt = model(ids).logits[0, -1].argmax().item()
            hf_tokens.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device="cuda")], dim=1)
    same = 0
    for a, b in zip(hf_tokens, m["cpu_tokens"]):
        if a != b:
            break
        same += 1
    ok = rel_gpu <= HF_TOL_GPU and rel_cpu <= HF_TOL_CPU
    res = {"rel_l2_gpu": rel_gpu, "rel_l2_cpu": rel_cpu, "tol_gpu": HF_TOL_GPU, "tol_cpu": HF_TOL_CPU,
           "ok": ok, "hf_tokens": hf_tokens, "tokens_equal_to_kojo": same}
    with open(os.path.join(out, "hf.json"), "w") as f:
        json.dump(res, f)
    print(f"transformers vs kojo: last prompt logits rel. L2 {rel_gpu:.2e} on the GPU (tolerance "
          f"{HF_TOL_GPU:.0e}), {rel_cpu:.2e} on the CPU ({HF_TOL_CPU:.0e}); greedy tokens equal for "
          f"{same} of {len(hf_tokens)}")
    if not ok:
        sys.exit(1)


def ceilings(out):
    import torch

    def timed(fn, reps):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        times.sort()
        return times[len(times) // 2]

    n = 1 << 30  # 4 GiB of float32 (random, never zeros)
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 10)
    copy_bw = 2 * n * 4 / t
    del src, dst
    s = 8192
    x = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: x @ y, 10)
    gemm = 2 * s ** 3 / t
    res = {"copy_bytes_per_s": copy_bw, "bf16_gemm_flops": gemm, "gpu": torch.cuda.get_device_name()}
    with open(os.path.join(out, "ceilings.json"), "w") as f:
        json.dump(res, f)
    print(f"copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")


def table(out):
    def load(name):
        p = os.path.join(out, name)
        try:
            with open(p) as f:
                text = f.read()
            return json.loads(text)
        except (OSError, ValueError):
            return None

    def text(name):
        p = os.path.join(out, name)
        return open(p).read().strip() if os.path.exists(p) else "?"

    gpu, commit, date = text("gpu.txt"), text("commit.txt"), text("date.txt")
    rows = []
    kernels = load("kernels.json") or []
    bad = [k for k in kernels if not k["ok"]]
    worst = max((num(k["rel_l2"]) for k in kernels), default=float("nan"))
    rows.append(("kernel checks passed (GPU vs CPU backend)", f"{len(kernels) - len(bad)} of {len(kernels)}",
                 f"{len(kernels)}", "", ""))
    rows.append(("worst kernel rel. error (L2)", f"{worst:.1e}", "", "", ""))
    model = load("model.json")
    if model:
        rows.append(("small model: greedy tokens equal, GPU vs CPU", f"{model['tokens_equal']} of {len(model['cpu_tokens'])}",
                     f"{len(model['cpu_tokens'])}", "", ""))
        rows.append(("small model: greedy picks that differ (not near-ties)", f"{model.get('wrong_picks', '?')}", "0", "", ""))
        rows.append(("small model: logits rel. error (L2), worst step", f"{num(model['worst_rel_l2']):.1e}", "1e-2", "", ""))
    h = load("hf.json")
    if h:
        rows.append(("small model: GPU logits vs transformers, rel. L2", f"{h['rel_l2_gpu']:.1e}",
                     f"{h['tol_gpu']:.0e}", "", ""))
        rows.append(("small model: CPU logits vs transformers, rel. L2", f"{h['rel_l2_cpu']:.1e}",
                     f"{h['tol_cpu']:.0e}", "", ""))
        rows.append(("small model: transformers greedy tokens equal to kojo's", f"{h['tokens_equal_to_kojo']} of {len(h['hf_tokens'])}", "", "", ""))
    c = load("ceilings.json")
    bw = c["copy_bytes_per_s"] if c else None
    gemm = c["bf16_gemm_flops"] if c else None
    if c:
        rows.append(("ceiling: device copy bandwidth", f"{bw / 1e12:.2f} TB/s", "", "", ""))
        rows.append(("ceiling: bf16 GEMM 8192^3", f"{gemm / 1e12:.0f} TFLOP/s", "", "", ""))
    for name in ("bench-8b.out", "bench-8b-q4k.out", "bench-small.out"):
        b = load(name)
        for r in b or []:
            weights = r["size_bytes"]
            params = r["params"]
            what = f"{r['model']} {r['test']}"
            measured = r["avg_ts"]
            floor = None
            if r["n_gen"] > 0 and bw:
                # each decode step reads every weight once for all sequences, and each
                # sequence's cached K/V (its context on average: depth + half the tokens)
                par = r.get("parallel", 1)
                ctx = r.get("depth", 0) + r["n_gen"] / 2
                step_bytes = weights + par * ctx * r.get("kv_bytes_per_token", 0)
                floor = par * bw / step_bytes
            elif r["n_prompt"] > 0 and gemm:
                floor = gemm / (2 * params)
            pct = f"{100 * measured / floor:.1f} %" if floor else ""
            rows.append((what + " (tok/s)", f"{measured:.1f}", f"{floor:.0f}" if floor else "", pct, ""))
    print(f"GPU check {date}, commit {commit}, GPU (name, driver, memory, capability): {gpu}")
    print()
    print("| what | measured | floor | % of floor |")
    print("|---|---:|---:|---:|")
    for what, m, f, p, _ in rows:
        print(f"| {what} | {m} | {f} | {p} |")
    lab = text("lab.out")
    if lab not in ("?", ""):
        print()
        print("## Kernel lab (kojo kernels bench)")
        print()
        print(lab)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("hf", "ceilings", "table"):
        print(__doc__)
        sys.exit(2)
    {"hf": hf, "ceilings": ceilings, "table": table}[sys.argv[1]](sys.argv[2])
