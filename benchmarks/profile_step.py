import torch, time
from hf_paged.models import load_default_model
from hf_paged import LLMEngine, SamplingParams
from hf_paged.sequence import Sequence
torch.set_num_threads(2)
m, tok = load_default_model()
B=64
prompts = [[(i*7+j*13)%40000+100 for j in range(128)] for i in range(B)]
eng = LLMEngine(m, tok, num_blocks=2000, enable_prefix_caching=False)
# drive the engine synchronously
seqs = [eng.make_sequence(p, SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)) for p in prompts]
for s in seqs: eng.scheduler.add(s)
t=time.time()
while any(s.num_output_tokens == 0 for s in seqs): eng.step()
print("prefill", time.time()-t, "steps", eng.metrics.steps)
for _ in range(3): eng.step()
t=time.time(); n=10
for _ in range(n): eng.step()
dt=(time.time()-t)/n
print(f"decode step B={B}: {dt*1000:.1f} ms  -> {B/dt:.1f} tok/s")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(5): eng.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
# ceiling: HF forward with DynamicCache at context ~200
from transformers import DynamicCache
ids = torch.tensor(prompts)[:, :]
with torch.inference_mode():
    c = DynamicCache(config=m.config)
    out = m(input_ids=torch.cat([ids, ids[:, :72]],1), past_key_values=c, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(2): m(input_ids=nxt, past_key_values=c, use_cache=True); 
    t=time.time()
    for _ in range(5):
        m(input_ids=nxt, past_key_values=c, use_cache=True, logits_to_keep=1)
    dt2=(time.time()-t)/5
print(f"HF decode forward B={B}: {dt2*1000:.1f} ms -> {B/dt2:.1f} tok/s")
while eng.scheduler.has_work(): eng.step()
