"""SD1.5-shaped cross-attention layers at 512 px (GOCA head weights, 77 text tokens, fp32), as the package's Segmenter
runs them (base: fresh reducer per observation; new: the Segmenter's kept reducer), against fused SDPA, alternated."""
import time, types, os, torch
from difffeat.capture import observer
from difffeat.capture.observer import AttentionTensors, attention_probs
from difffeat.segment.aggregation import GocaHeadReducer
new = hasattr(observer, "attention_maps")
torch.manual_seed(0)
layers = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)]  # (rows, heads, d); C = heads*d
made = []
for nq, h, d in layers:
    q = torch.randn(1, h, nq, d); k = torch.randn(1, h, 77, d); v = torch.randn(1, h, 77, d)
    attn = types.SimpleNamespace(to_out=[types.SimpleNamespace(weight=torch.randn(h * d, h * d) / 30)])
    made.append((q, k, v, attn))
kept = GocaHeadReducer()
def observed():
    for q, k, v, attn in made:
        t = AttentionTensors(q, k, v, None, q.shape[-1] ** -0.5, image_keys=None, text_keys=slice(0, 77))
        attention_probs(t, "cross", kept if new else GocaHeadReducer(), attn)
def sdpa():
    for q, k, v, _ in made:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
with torch.no_grad():
    for _ in range(3): observed(); sdpa()
    o, s = [], []
    for _ in range(9):
        t0 = time.perf_counter(); observed(); o.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); sdpa(); s.append(time.perf_counter() - t0)
    o.sort(); s.sort()
    print(f"{'new' if new else 'base'} SD1.5 cross layers (4096/1024/256/64 rows): observed {o[4]*1e3:.1f} ms, fused SDPA {s[4]*1e3:.1f} ms, ratio {o[4]/s[4]:.2f} (load {os.getloadavg()[0]:.1f})", flush=True)
