"""Q-DiT on the built-in models: SQNR vs FP of rtn-w4a8, q-dit-w4a8/w6a8 and a SMALL_SEARCH genome.
Usage: PYTHONPATH=<dir containing ditq> python3 bench/q_dit_tiny.py dit|pixart"""
import copy, time, sys, torch
torch.set_num_threads(2)
from ditq import QuantConfig, calibrate, quantize
from ditq.evaluation import builtin
from ditq.quant_core.passes.fitness import capture_model_inputs, OutputFidelity
from ditq.quant_core.methods.q_dit.method import search_group_sizes, SMALL_SEARCH
import math
which = sys.argv[1]
if which == "dit":
    pipe = builtin.tiny_dit_pipeline(); conds = [0, 1, 2, 3]; call = dict(builtin.DIT_CALL)
else:
    pipe = builtin.tiny_pixart_pipeline(); conds = ["a red fox in snow", "a city at night"]; call = dict(builtin.PIXART_CALL)
pipe.set_progress_bar_config(disable=True)
steps = call.pop("num_inference_steps")
t=time.time()
calib = calibrate(pipe, conds, num_inference_steps=steps, needs=("act_samples",), stat_options={"act_samples": {"limit": 1024}}, progress=False, **call)
print("calib", time.time()-t)
calls = capture_model_inputs(pipe, conds[:2], dict(call, num_inference_steps=steps), seed=123, steps_per_run=1)
fid = OutputFidelity(pipe.transformer, calls)
db = lambda l: -10*math.log10(l)
res = {}
for name in ["rtn-w4a8", "q-dit-w4a8", "q-dit-w6a8"]:
    m = copy.deepcopy(pipe.transformer); t=time.time()
    quantize(m, QuantConfig.preset(name), calib, progress=False)
    tq=time.time()-t; t=time.time()
    res[name] = db(fid(m)); print(name, f"{res[name]:.2f} dB", f"quant {tq:.1f}s eval {time.time()-t:.1f}s", flush=True)
cfg = QuantConfig.preset("q-dit-w4a8")
t=time.time()
cfg_s, r = search_group_sizes(pipe, cfg, conds, num_inference_steps=steps, settings=SMALL_SEARCH, progress=False, **call)
print("search", time.time()-t, r.best_loss, r.history, r.evaluations, sum(r.best)/len(r.best))
m = copy.deepcopy(pipe.transformer)
quantize(m, cfg_s, calib, progress=False)
print("q-dit-w4a8 searched", f"{db(fid(m)):.2f} dB")
print(cfg_s.options["group_sizes"])
