"""SD3.5 Medium (random weights) bf16, 1 text layer, 256 px: observed vs bare forward, alternated, with a thread-summed
breakdown of the observer's parts. Run once per code version (PYTHONPATH)."""
import sys, time, threading, collections, os, torch
import difffeat
from difffeat.devtools.bench_real import _backbone, benchmark_image, _observe_forward, _CAPTION_CLASSES
from difffeat.segment import Segmenter
from difffeat.segment.prompts import build_layout
import difffeat.capture.observer as obs
import difffeat.capture.session as sess
import difffeat.segment.aggregation as agg
res = int(sys.argv[1]) if len(sys.argv) > 1 else 256
T = collections.defaultdict(float); N = collections.Counter(); lock = threading.Lock()
def wrap(name, fn):
    def w(*a, **k):
        t0 = time.perf_counter(); r = fn(*a, **k); dt = time.perf_counter() - t0
        nm = name(a, k) if callable(name) else name
        with lock: T[nm] += dt; N[nm] += 1
        return r
    return w
prep, probs = obs._KERNELS["softmax"]
obs._KERNELS["softmax"] = (wrap("prepare q,k float (main)", prep), wrap("chunk: qk^T+softmax", probs))
if hasattr(sess, "attention_maps"):
    sess.attention_maps = wrap(lambda a, k: f"attention_maps {'+'.join(x[0] for x in a[1])} (main wall)", obs.attention_maps)
else:
    sess.attention_probs = wrap(lambda a, k: f"attention_probs {a[1]} (main wall)", obs.attention_probs)
agg.goca_head_weights_from_outputs = wrap("chunk: goca weights (W_O products)", agg.goca_head_weights_from_outputs)
agg.GocaHeadReducer.__call__ = wrap("chunk: GocaHeadReducer total", agg.GocaHeadReducer.__call__)
print("code", os.path.dirname(difffeat.__file__), "threads", torch.get_num_threads(), flush=True)
bb = _backbone("sd35-medium", "cpu", "bf16", 1)
seg = Segmenter(bb, resolution=res); s = seg.settings
print("cross layers", len(seg.cross_names), "self names", len(seg.self_names), flush=True)
image = benchmark_image(res)
layout = build_layout(_CAPTION_CLASSES, bb.text_segments(), s.template, list(s.background_entities), None)
inputs = bb.prepare([image], layout.caption, s.t, s.seed, res)
def pair(tag):
    T.clear(); N.clear()
    t0 = time.perf_counter(); bb.denoise(inputs); bare = time.perf_counter() - t0
    t0 = time.perf_counter(); _observe_forward(seg, image, layout, inputs); o = time.perf_counter() - t0
    kept = seg._goca_reducer.kept_bytes() / 2**20 if getattr(seg, "_goca_reducer", None) is not None else 0
    print(f"{tag}: bare {bare:.2f}s observed {o:.2f}s ratio {o/bare:.2f} (kept Gram {kept:.0f} MiB) load {os.getloadavg()[0]:.1f}", flush=True)
    for k in sorted(T, key=lambda k: -T[k]):
        print(f"    {k:40s} {T[k]:7.3f}s n={N[k]}", flush=True)
    return o / bare
with torch.no_grad():
    pair("warm")
    a = [pair(f"pair {i}") for i in range(3)]
    for i in range(2):
        t0 = time.perf_counter(); _observe_forward(seg, image, layout, inputs); print(f"extra observation {time.perf_counter()-t0:.2f}s", flush=True)
    b = [pair(f"steady pair {i}") for i in range(3)]
    print("RATIOS first", [round(x, 2) for x in a], "steady", [round(x, 2) for x in b], flush=True)
