"""Usage: python layer.py ROWS. One SD3.5-Medium-shaped joint attention layer (24 heads x 64, 333 text tokens, bf16 q/k/v and W_O): what an
observation computes there (GOCA cross map + head-mean self map), as the package's Segmenter does it (base: a fresh
reducer per observation, two passes; new: the Segmenter's kept reducer, one pass), against the layer's own bf16
SDPA call, alternated in one process; median of 7."""
import sys, time, types, os, torch, difffeat
from difffeat.capture import observer
from difffeat.capture.observer import AttentionTensors, attention_probs, head_mean
from difffeat.segment.aggregation import GocaHeadReducer
nq = int(sys.argv[1]); torch.manual_seed(0)
b, h, nt, d = 1, 24, 333, 64; C = h * d; nk = nq + nt
q, k, v = (torch.randn(b, h, n, d).bfloat16() for n in (nq, nk, nk))
W = (torch.randn(C, C) / 40).bfloat16()
attn = types.SimpleNamespace(to_out=[types.SimpleNamespace(weight=W)])
new = hasattr(observer, "attention_maps")
kept = GocaHeadReducer()
def observed():
    t = AttentionTensors(q, k, v, None, d**-0.5, image_keys=slice(0, nq), text_keys=slice(nq, nk))
    if new:
        observer.attention_maps(t, [("cross", kept), ("self", head_mean)], attn)
    else:
        attention_probs(t, "cross", GocaHeadReducer(), attn); attention_probs(t, "self", head_mean, attn)
sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
with torch.no_grad():
    for _ in range(8): observed(); sdpa()  # warm (the kept reducer forms its Gram by then)
    o, s = [], []
    for _ in range(7):
        t0 = time.perf_counter(); observed(); o.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); sdpa(); s.append(time.perf_counter() - t0)
    o.sort(); s.sort()
    print(f"{'new' if new else 'base'} rows {nq}: observed layer {o[3]*1e3:.1f} ms, bf16 SDPA {s[3]*1e3:.1f} ms, ratio {o[3]/s[3]:.2f} (load {os.getloadavg()[0]:.1f})", flush=True)
