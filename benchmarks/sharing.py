"""Memory saved by sharing KV blocks, as in the PagedAttention paper's Fig. 15, on SmolLM2-135M-Instruct.

Three parts, each run twice in one process on the same prompts:

  parallel  parallel sampling, n = 2, 4, 6 (temperature 0.8, one seed per request): the n samples of a request
            share the prompt's blocks (``share_blocks=True``) or each gets its own copy (``share_blocks=False``).
  beam      beam search, width 2, 4, 6 (greedy, HF's beam rules): beams fork their parent's block table, or copy
            all of its blocks.
  prefix    one ~1,000-token system prompt shared by many requests with different short questions, with the
            prefix cache on and off (a single warm-up request carrying the system prompt runs first, untimed, in
            both runs, so the "on" run starts with the system prompt in the cache).

In the parallel and beam parts prefix caching is OFF in both runs, so only sharing inside a request counts. The
pool is sized so that nothing is preempted (checked and printed), and is the same size in both runs of a setting.

KV blocks in use are read after every engine step: the value the engine's metrics record inside the step, after
the forward, the forks / block copies of new samples and beams and the release of the beams they replace, and
before the requests finishing in that step free their blocks. Two figures:
  peak      the largest number of blocks in use at any step (what the pool must be able to hold);
  mean      the number of blocks in use averaged over the run's steps (every step weighs the same; both runs take
            the same steps, since sharing changes no token). The wall-time-weighted mean is in the JSON.
Saving = 1 - shared / unshared (the paper's "memory saving").

Output tokens: parallel sampling counts the tokens of all n samples; beam search counts the returned hypothesis
(``num_return_sequences``, 1 by default) -- the beams' own work is reported as forward tokens. Throughput is wall
clock around ``LLMEngine.generate`` of all requests (submitted at once), model loading and pool allocation excluded.

    python benchmarks/sharing.py                                   # the real measurement (idle machine!)
    python benchmarks/sharing.py --num-prompts 2 --max-new 8 --prefix-requests 3 --n-values 2 --beam-widths 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.throughput import GiB, _release, _rss_gib, init_torch, log  # noqa: E402  (stdlib-only at import time)

PARTS = ("parallel", "beam", "prefix")

# ---------------------------------------------------------------------------------------------------------------
# Prompts: Alpaca-style instructions (some with an input), deterministic, of varied length.
# ---------------------------------------------------------------------------------------------------------------

INSTRUCTIONS: list[tuple[str, str]] = [
    ("Give three tips for staying healthy.", ""),
    ("What are the three primary colors?", ""),
    ("Describe the structure of an atom.", ""),
    ("How can we reduce air pollution?", ""),
    ("Describe a time when you had to make a difficult decision.", ""),
    ("Identify the odd one out.", "Twitter, Instagram, Telegram"),
    ("Explain why the following fraction is equivalent to 1/4.", "4/16"),
    ("Write a short story in third person narration about a protagonist who has to make an important career "
     "decision.", ""),
    ("Render a 3D model of a house.", ""),
    ("Evaluate this sentence for spelling and grammar mistakes.", "He finnished his meal and left the resturant"),
    ("How did Julius Caesar die?", ""),
    ("What is the capital of France?", ""),
    ("Generate a list of ten items a person might need for a camping trip.", ""),
    ("Discuss the causes of the Great Depression.", ""),
    ("Classify the following into animals, plants, and minerals.", "Oak tree, copper ore, elephant"),
    ("Explain the use of word embeddings in Natural Language Processing.", ""),
    ("Describe the function of a computer motherboard.", ""),
    ("Reverse engineer this code to create a new version.",
     "def factorialize(num):\n  factorial = 1\n  for i in range(1, num):\n    factorial *= i\n  return factorial"),
    ("Propose an ethical solution to the problem of data privacy.", ""),
    ("Generate three verbs that mean the same as \"to apologize\".", ""),
    ("What does DNA stand for?", ""),
    ("Compare and contrast the Cuban Missile Crisis and the Vietnam War.", ""),
    ("Generate a list of random words.", ""),
    ("Summarize the following paragraph in two sentences.",
     "The city council met on Tuesday evening to discuss the proposed extension of the tram line into the "
     "northern suburbs. Supporters argued that the extension would cut commuting times, reduce traffic on the "
     "ring road and bring new shops to neighbourhoods that have struggled for years. Opponents worried about "
     "the cost, which has already risen twice, about two years of construction noise, and about the loss of "
     "trees along the avenue. After three hours of debate the council voted to commission an independent "
     "study of the costs and to hold public meetings in each affected district before making a final decision."),
    ("Transcribe the recording into text.", "Recording about the history of Waterloo"),
    ("Who is the world's most famous painter?", ""),
    ("Explain the concept of cogging torque.", ""),
    ("Look up the boiling point of water.", ""),
    ("Describe the life and reign of King Charles II.", ""),
    ("Find the area of a circle given its radius.", "Radius = 4"),
    ("Rewrite the following email so that it is polite and professional, keeping every fact in it.",
     "hey, the report u sent is wrong again. numbers on page 3 dont match the spreadsheet and the chart is "
     "missing. i need it fixed by friday or we miss the deadline with the client. also tell sam to stop "
     "changing the template every week, its driving everyone crazy. thx"),
    ("Identify the lines of longitude that divides North and South America.", ""),
]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat, with the generation prompt, through the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def instruction_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        instruction, inp = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        if i >= len(INSTRUCTIONS):  # more prompts than instructions: distinct variants
            instruction = f"{instruction} (Variant {i // len(INSTRUCTIONS) + 1}.)"
        content = instruction + (f"\n\n{inp}" if inp else "")
        out.append(chat_ids(tokenizer, [{"role": "user", "content": content}]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The shared system prompt (a policy document cut to ~N tokens) and the short user questions.
# ---------------------------------------------------------------------------------------------------------------

POLICY_INTRO = (
    "You are the customer support assistant of Northwind Outdoor Supply, a retailer of camping, hiking and "
    "climbing equipment that sells through its website, its mobile app and twelve physical stores. Answer "
    "customers' questions politely, briefly and accurately, using only the policy below. If the policy does not "
    "cover a question, say so and offer to connect the customer with a human agent. Never invent order details, "
    "prices, dates or promises. Never ask for a full card number or a password. Always answer in the language "
    "the customer writes in."
)

POLICY_SECTIONS: list[tuple[str, list[str]]] = [
    ("Returns", [
        "Most items can be returned within 60 days of delivery for a full refund to the original payment method.",
        "Items must be unused, in their original packaging, and with all tags and accessories included.",
        "Used tents, sleeping bags and footwear can be returned within 14 days if they are clean and undamaged.",
        "Climbing ropes, harnesses and helmets cannot be returned once opened, for safety reasons.",
        "Gift cards, downloadable maps and custom-engraved items are final sale.",
        "Returns by post are free with the prepaid label from the customer's account page.",
        "Refunds are issued within five business days after the warehouse receives the item.",
    ]),
    ("Exchanges", [
        "Size and colour exchanges are free and can be requested within 60 days of delivery.",
        "If the requested size is out of stock, the customer may wait for a restock or take a refund.",
        "Store exchanges are processed immediately when the item is in stock at that store.",
    ]),
    ("Shipping", [
        "Standard shipping takes three to six business days and is free for orders over 75 dollars.",
        "Express shipping takes one to two business days and costs 19 dollars.",
        "Orders placed before 2 pm on a business day ship the same day.",
        "Bulky items such as kayaks and canoes ship by freight and take seven to ten business days.",
        "We ship to all fifty states and to Canada; other international destinations are not served.",
        "Tracking numbers are emailed when the parcel leaves the warehouse.",
    ]),
    ("Damaged or missing items", [
        "Customers should report damaged or missing items within 7 days of delivery.",
        "Ask for a photo of the damage and the order number, then offer a replacement or a refund.",
        "For parcels marked delivered but not received, ask the customer to check with neighbours, then open a "
        "carrier investigation, which takes up to five business days.",
    ]),
    ("Warranty", [
        "All products carry the manufacturer's warranty; Northwind brand products carry a two-year warranty.",
        "The warranty covers defects in materials and workmanship, not normal wear, misuse or accidents.",
        "Warranty claims need the order number and photos; approved claims get a repair, replacement or credit.",
    ]),
    ("Price adjustments", [
        "If an item's price drops within 14 days of purchase, the customer can request the difference once.",
        "Price matching applies to identical items sold by authorised national retailers, not auctions or "
        "marketplaces.",
        "Promotional codes cannot be combined and cannot be applied to orders that have already shipped.",
    ]),
    ("Membership", [
        "Membership costs 30 dollars for life and gives 10 percent back on full-price purchases as an annual "
        "dividend.",
        "Members get free standard shipping on all orders and early access to the seasonal sale.",
        "Dividends are issued every March and expire after two years.",
        "A membership can be cancelled within 30 days of purchase for a full refund if no dividend has been used.",
    ]),
    ("Rentals", [
        "Stores rent tents, stoves, snowshoes and kayaks by the day or by the weekend.",
        "Rentals need a deposit equal to half the retail price, refunded when the gear comes back clean.",
        "Late rentals are charged one extra day for every day they are late.",
    ]),
    ("Repairs", [
        "Stores repair bicycles, skis and snowboards; tent and jacket repairs are sent to a partner workshop.",
        "Repair estimates are free; the customer approves the price before any work starts.",
    ]),
    ("Orders and accounts", [
        "Orders can be changed or cancelled within one hour of being placed, from the account page.",
        "After one hour, an order can only be returned after delivery.",
        "Customers who forgot their password should use the reset link; agents cannot see or change passwords.",
        "To protect privacy, confirm the customer's email address and order number before discussing an order.",
    ]),
    ("Payments", [
        "We accept major credit cards, debit cards, gift cards, PayPal and store credit.",
        "Buy-now-pay-later plans are available for orders between 100 and 2,000 dollars.",
        "Charges appear as NORTHWIND OUTDOOR on card statements.",
    ]),
    ("Safety", [
        "Do not give advice on technical climbing, avalanche terrain or water rescue; refer to a certified guide.",
        "Product recalls are listed on the safety page; affected customers get a full refund or replacement.",
    ]),
]

CLAUSE_SUBJECTS = ["Store managers", "Support agents", "Warehouse staff", "Regional supervisors", "Members",
                   "Guest customers", "Business accounts", "Rental desk staff"]
CLAUSE_RULES = [
    "must record the reason for every refund larger than 500 dollars in the order notes",
    "may approve one courtesy credit of up to 20 dollars per customer per year",
    "should offer the customer a written summary of any agreement by email",
    "must escalate any complaint that mentions an injury to the safety team within one business day",
    "may extend a return window by up to 15 days when a delivery was late",
    "should never promise a delivery date that the carrier has not confirmed",
    "must check the recall list before approving a warranty replacement",
    "may waive the rental late fee once when the customer reports bad weather",
    "should suggest the membership only after the customer's question has been answered",
    "must not share another customer's order details under any circumstances",
]


def policy_text(tokenizer, target_tokens: int) -> str:
    """A deterministic policy document of at most ``target_tokens`` tokens, cut at a sentence boundary."""
    sentences = [POLICY_INTRO]
    for title, rules in POLICY_SECTIONS:
        sentences.append(f"\n\n{title}.")
        sentences.extend(f" {r}" for r in rules)
    sentences.append("\n\nAdditional rules.")
    k = 0
    while True:  # numbered clauses until the target is passed
        sentences.append(f" Rule {k + 1}: {CLAUSE_SUBJECTS[k % len(CLAUSE_SUBJECTS)]} "
                         f"{CLAUSE_RULES[(k * 3) % len(CLAUSE_RULES)]}.")
        k += 1
        if len(tokenizer.encode("".join(sentences), add_special_tokens=False)) > target_tokens:
            break
    while len(sentences) > 1 and len(tokenizer.encode("".join(sentences), add_special_tokens=False)) > target_tokens:
        sentences.pop()
    return "".join(sentences)


QUESTION_STEMS = [
    "Can I return a tent I slept in twice last weekend?", "How long does express shipping take?",
    "My kayak order has not arrived after nine days, what should I do?", "Is a climbing harness returnable?",
    "Can I combine two promo codes on one order?", "How much does the membership cost?",
    "When are member dividends paid?", "Do you ship to Mexico?", "Can I change the size of my hiking boots?",
    "The price of my jacket dropped a week after I bought it. Can I get money back?",
    "How do I rent snowshoes for the weekend?", "What happens if I bring a rental back two days late?",
    "Does the warranty cover a broken zipper?", "Can you repair my ski bindings?",
    "I forgot my password, can you tell me what it is?", "Can I cancel an order I placed three hours ago?",
    "What payment methods do you accept?", "My parcel says delivered but I do not have it.",
    "Are gift cards refundable?", "Can I return an engraved water bottle?",
    "How long do refunds take to show up?", "Can you recommend a route up a glacier?",
    "Is there a recall on any camping stove?", "Can I pay for a canoe in instalments?",
]
QUESTION_FRAMES = ["{q}", "Hi! {q}", "Quick question: {q} Thanks.", "Hello, I am a member. {q}"]


def questions(n: int) -> list[str]:
    out = []
    for i in range(n):
        stem = QUESTION_STEMS[i % len(QUESTION_STEMS)]
        round_ = i // len(QUESTION_STEMS)
        frame = QUESTION_FRAMES[round_ % len(QUESTION_FRAMES)]
        q = frame.format(q=stem)
        if round_ >= len(QUESTION_FRAMES):
            q += f" (Order {1000 + i}.)"
        out.append(q)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring: blocks in use after every step, through a wrapper around engine.step.
# ---------------------------------------------------------------------------------------------------------------

class StepRecorder:
    """Wraps ``engine.step`` (the engine thread calls it through the instance) and records, for every step
    that ran a forward while ``active``, the blocks in use the engine's metrics saw and the step's wall time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.active = False
        self.in_step = False
        self.blocks: list[int] = []
        self.seconds: list[float] = []
        self.seqs: list[int] = []
        inner = engine.step

        def step():
            self.in_step = True
            try:
                before = engine.metrics.steps
                started = time.perf_counter()
                out = inner()
                took = time.perf_counter() - started
                if self.active and engine.metrics.steps > before:
                    self.blocks.append(engine.metrics.blocks_in_use)
                    self.seconds.append(took)
                    self.seqs.append(engine.metrics.running)
                return out
            finally:
                self.in_step = False

        engine.step = step

    def start(self) -> None:
        self.blocks, self.seconds, self.seqs = [], [], []
        self.active = True

    def stop(self) -> None:
        # generate() returns when the last request is done, which is set inside the last step: let it finish.
        deadline = time.perf_counter() + 60
        while self.in_step and time.perf_counter() < deadline:
            time.sleep(0.0005)
        self.active = False

    def summary(self) -> dict:
        b, s = self.blocks, self.seconds
        total = sum(s)
        return {"steps": len(b), "peak_blocks": max(b) if b else 0,
                "mean_blocks_per_step": statistics.fmean(b) if b else 0.0,
                "mean_blocks_time_weighted": sum(x * t for x, t in zip(b, s)) / total if total else 0.0,
                "max_running_seqs": max(self.seqs) if self.seqs else 0, "step_time_s": total}


def discard(engine) -> None:
    """Drop an engine's KV storage now (its idle thread may keep the engine object alive for a while)."""
    engine.kv_cache.release()
    _release()


def blocks_for(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


def make_engine(model, args, num_blocks: int, *, share_blocks: bool = True, prefix_caching: bool = False,
                max_num_seqs: int = 256):
    from hf_paged.engine.llm_engine import LLMEngine

    # No tokenizer: outputs stay token ids (no detokenizing inside the timed run), as in throughput.py.
    engine = LLMEngine(model, None, block_size=args.block_size, num_blocks=num_blocks,
                       max_num_seqs=max(max_num_seqs, 256), max_num_batched_tokens=args.max_batched_tokens,
                       enable_prefix_caching=prefix_caching, share_blocks=share_blocks)
    return engine, StepRecorder(engine)


# ---------------------------------------------------------------------------------------------------------------
# Part 1 and 2: parallel sampling and beam search, with and without sharing.
# ---------------------------------------------------------------------------------------------------------------

def sharing_params(kind: str, width: int, args, num_prompts: int):
    from hf_paged.core.sequence import SamplingParams

    if kind == "parallel":
        return [SamplingParams(max_new_tokens=args.max_new, temperature=args.temperature, n=width,
                               seed=args.seed + 1000 * i, ignore_eos=args.ignore_eos) for i in range(num_prompts)]
    return [SamplingParams(max_new_tokens=args.max_new, temperature=0.0, num_beams=width,
                           num_return_sequences=min(args.num_return_sequences, width),
                           length_penalty=args.length_penalty, early_stopping=args.early_stopping,
                           ignore_eos=args.ignore_eos) for _ in range(num_prompts)]


def pool_blocks_for_sharing(kind: str, width: int, prompts: list[list[int]], args) -> int:
    """Enough blocks that the UNSHARED run is never preempted (the shared run gets the same pool)."""
    bs, m = args.block_size, args.max_new
    total = 0
    for p in prompts:
        full = blocks_for(len(p) + m, bs)
        if kind == "parallel":  # the prefilled root, plus n private copies that grow to full length
            total += blocks_for(len(p), bs) + width * full
        else:  # k beams at full length, plus k fresh copies made before the old beams are released
            total += 2 * width * full
    return total + 16


def timed_generate(engine, rec, prompts, params, what: str) -> tuple[list, float]:
    """Run the prompts with the recorder sampling the pool; (outputs, seconds); raises if any request failed."""
    rec.start()
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    rec.stop()
    errors = [o.error for o in outs if o.error is not None]
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} requests failed: {errors[0]!r}")
    return outs, elapsed


def run_sharing(model, args, kind: str, width: int, prompts: list[list[int]], share: bool, num_blocks: int) -> dict:
    params = sharing_params(kind, width, args, len(prompts))
    engine, rec = make_engine(model, args, num_blocks, share_blocks=share,
                              max_num_seqs=len(prompts) * width)
    fwd0, pre0 = engine.runner.num_forward_tokens, engine.metrics.preemptions
    outs, elapsed = timed_generate(engine, rec, prompts, params, f"{kind} width {width} share={share}")
    tokens = [[list(s.token_ids) for s in (o.samples or [o])] for o in outs]
    out_tokens = sum(len(t) for req in tokens for t in req)
    forward = engine.runner.num_forward_tokens - fwd0
    r = {"part": kind, "width": width, "share_blocks": share, "elapsed_s": elapsed, "output_tokens": out_tokens,
         "output_tok_per_s": out_tokens / elapsed, "forward_tokens": forward, "forward_tok_per_s": forward / elapsed,
         "preemptions": engine.metrics.preemptions - pre0, "pool_blocks": engine.pool.num_blocks,
         "pool_gib": engine.pool.num_blocks * engine.kv_cache.bytes_per_block / GiB,
         "engine_peak_blocks": engine.metrics.peak_blocks_in_use, **rec.summary(), "tokens": tokens}
    discard(engine)
    return r


def sharing_part(model, args, kind: str, prompts: list[list[int]]) -> list[dict]:
    rows = []
    widths = args.n_values if kind == "parallel" else args.beam_widths
    for width in widths:
        num_blocks = args.kv_blocks or pool_blocks_for_sharing(kind, width, prompts, args)
        runs = {}
        for share in (True, False):
            r = run_sharing(model, args, kind, width, prompts, share, num_blocks)
            runs[share] = r
            log(f"  {kind} {'n' if kind == 'parallel' else 'beams'}={width} share_blocks={share!s:<5}: "
                f"peak {r['peak_blocks']} blocks, mean {r['mean_blocks_per_step']:.1f} over {r['steps']} steps, "
                f"{r['output_tok_per_s']:.1f} out tok/s ({r['output_tokens']} tok in {r['elapsed_s']:.2f} s), "
                f"{r['forward_tok_per_s']:.1f} fwd tok/s, preemptions {r['preemptions']}, pool {r['pool_blocks']} "
                f"blocks ({r['pool_gib']:.2f} GiB)")
        sh, un = runs[True], runs[False]
        same = sum(a == b for a, b in zip(sh["tokens"], un["tokens"]))
        row = {
            "part": kind, "width": width, "num_prompts": len(prompts), "pool_blocks": num_blocks,
            "peak_blocks_shared": sh["peak_blocks"], "peak_blocks_unshared": un["peak_blocks"],
            "peak_saving": 1 - sh["peak_blocks"] / un["peak_blocks"] if un["peak_blocks"] else 0.0,
            "mean_blocks_shared": sh["mean_blocks_per_step"], "mean_blocks_unshared": un["mean_blocks_per_step"],
            "mean_saving": (1 - sh["mean_blocks_per_step"] / un["mean_blocks_per_step"]
                            if un["mean_blocks_per_step"] else 0.0),
            "time_weighted_mean_blocks_shared": sh["mean_blocks_time_weighted"],
            "time_weighted_mean_blocks_unshared": un["mean_blocks_time_weighted"],
            "time_weighted_mean_saving": (1 - sh["mean_blocks_time_weighted"] / un["mean_blocks_time_weighted"]
                                          if un["mean_blocks_time_weighted"] else 0.0),
            "steps_shared": sh["steps"], "steps_unshared": un["steps"],
            "out_tok_per_s_shared": sh["output_tok_per_s"], "out_tok_per_s_unshared": un["output_tok_per_s"],
            "throughput_ratio": sh["output_tok_per_s"] / un["output_tok_per_s"],
            "output_tokens": sh["output_tokens"], "preemptions_shared": sh["preemptions"],
            "preemptions_unshared": un["preemptions"], "identical_requests": same,
            "runs": [{k: v for k, v in x.items() if k != "tokens"} for x in (sh, un)],
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Part 3: a shared system prompt, prefix caching on and off.
# ---------------------------------------------------------------------------------------------------------------

def run_prefix(model, args, warm: list[int], prompts: list[list[int]], caching: bool, num_blocks: int) -> dict:
    from hf_paged.core.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=args.prefix_max_new, temperature=0.0, ignore_eos=args.ignore_eos)
    engine, rec = make_engine(model, args, num_blocks, prefix_caching=caching, max_num_seqs=len(prompts))
    engine.generate([warm], params, use_tqdm=False)  # untimed: puts the system prompt in the cache (when on)
    while not engine.idle():
        time.sleep(0.001)
    pool, sched = engine.pool, engine.scheduler
    fwd0, q0, h0 = engine.runner.num_forward_tokens, pool.prefix_queries, pool.prefix_hits
    cached0, pre0 = sched.num_prefix_cached_tokens, engine.metrics.preemptions
    outs, elapsed = timed_generate(engine, rec, prompts, params, f"prefix caching={caching}")
    tokens = [list(o.token_ids) for o in outs]
    out_tokens = sum(len(t) for t in tokens)
    ttfts = [o.metrics["ttft_s"] for o in outs]
    forward = engine.runner.num_forward_tokens - fwd0
    prefilled = forward - sum(max(len(t) - 1, 0) for t in tokens)  # the last sampled token is never forwarded
    cached = sched.num_prefix_cached_tokens - cached0
    prompt_tokens = sum(len(p) for p in prompts)
    queries, hits = pool.prefix_queries - q0, pool.prefix_hits - h0
    if prefilled != prompt_tokens - cached:
        log(f"  WARNING: prefilled tokens {prefilled} != prompt tokens - cached {prompt_tokens - cached}")
    r = {"part": "prefix", "prefix_caching": caching, "elapsed_s": elapsed, "output_tokens": out_tokens,
         "output_tok_per_s": out_tokens / elapsed, "mean_ttft_s": statistics.fmean(ttfts),
         "median_ttft_s": statistics.median(ttfts), "max_ttft_s": max(ttfts),
         "prompt_tokens": prompt_tokens, "prefilled_tokens": prefilled, "prefix_cached_tokens": cached,
         "prefilled_check": prompt_tokens - cached,  # equals prefilled_tokens when nothing was preempted
         "token_hit_rate": cached / prompt_tokens, "block_queries": queries, "block_hits": hits,
         "block_hit_rate": hits / queries if queries else 0.0,
         "engine_prefix_cache_hit_rate": engine.metrics.summary()["prefix_cache_hit_rate"],
         "forward_tokens": forward, "preemptions": engine.metrics.preemptions - pre0,
         "pool_blocks": pool.num_blocks, "pool_gib": pool.num_blocks * engine.kv_cache.bytes_per_block / GiB,
         **rec.summary(), "tokens": tokens}
    discard(engine)
    return r


def prefix_part(model, tokenizer, args) -> dict:
    system = policy_text(tokenizer, args.system_tokens)
    system_tokens = len(tokenizer.encode(system, add_special_tokens=False))
    qs = questions(args.prefix_requests + 1)
    warm = chat_ids(tokenizer, [{"role": "system", "content": system},
                                {"role": "user", "content": "Warm-up: what is this document about?"}])
    prompts = [chat_ids(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in qs[:args.prefix_requests]]
    common = len(os.path.commonprefix(prompts + [warm]))
    bs = args.block_size
    num_blocks = args.kv_blocks or (sum(blocks_for(len(p) + args.prefix_max_new, bs) for p in prompts + [warm])
                                    + 16)
    log(f"prefix: system prompt {system_tokens} tokens, prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
        f"tokens, common prefix {common} tokens ({common // bs} full blocks), {len(prompts)} requests, "
        f"{args.prefix_max_new} new tokens each")
    runs = {}
    for caching in (True, False):
        r = run_prefix(model, args, warm, prompts, caching, num_blocks)
        runs[caching] = r
        log(f"  prefix caching {'on ' if caching else 'off'}: {r['output_tok_per_s']:.1f} out tok/s "
            f"({r['output_tokens']} tok in {r['elapsed_s']:.2f} s), mean TTFT {r['mean_ttft_s']:.3f} s, prefilled "
            f"{r['prefilled_tokens']} of {r['prompt_tokens']} prompt tokens, cached {r['prefix_cached_tokens']}, "
            f"block hit rate {r['block_hit_rate']:.3f}, preemptions {r['preemptions']}, pool {r['pool_blocks']} "
            f"blocks ({r['pool_gib']:.2f} GiB)")
    on, off = runs[True], runs[False]
    return {"part": "prefix", "requests": len(prompts), "system_prompt_tokens": system_tokens,
            "common_prefix_tokens": common, "prompt_len_min": min(map(len, prompts)),
            "prompt_len_max": max(map(len, prompts)), "max_new": args.prefix_max_new, "pool_blocks": num_blocks,
            "ttft_ratio_off_over_on": off["mean_ttft_s"] / on["mean_ttft_s"],
            "throughput_ratio_on_over_off": on["output_tok_per_s"] / off["output_tok_per_s"],
            "prefill_ratio_off_over_on": off["prefilled_tokens"] / max(on["prefilled_tokens"], 1),
            "identical_requests": sum(a == b for a, b in zip(on["tokens"], off["tokens"])),
            "runs": [{k: v for k, v in x.items() if k != "tokens"} for x in (on, off)]}


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--num-prompts", type=int, default=32, help="instruction prompts for parallel / beam")
    ap.add_argument("--max-new", type=int, default=128, help="max new tokens, parallel sampling and beam search")
    ap.add_argument("--n-values", default="2,4,6", help="parallel sampling: n")
    ap.add_argument("--beam-widths", default="2,4,6", help="beam search: widths")
    ap.add_argument("--temperature", type=float, default=0.8, help="parallel sampling temperature")
    ap.add_argument("--seed", type=int, default=0, help="request i samples with seed SEED + 1000*i (+ sample index)")
    ap.add_argument("--num-return-sequences", type=int, default=1, help="beam search: hypotheses returned")
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--early-stopping", default="false", choices=["false", "true", "never"],
                    help="beam search early stopping (HF's; default false)")
    ap.add_argument("--ignore-eos", action="store_true", help="every request runs to its max new tokens")
    ap.add_argument("--prefix-requests", type=int, default=64, help="requests sharing the system prompt")
    ap.add_argument("--prefix-max-new", type=int, default=32, help="max new tokens, shared-system-prompt part")
    ap.add_argument("--system-tokens", type=int, default=1000, help="system prompt length (tokens, at most)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cpu", help="where the model and the KV pool live (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="engine max_num_batched_tokens")
    ap.add_argument("--kv-blocks", type=int, default=None,
                    help="pool size in blocks for every run (default: sized per setting so nothing is preempted)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.only if p not in PARTS]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {PARTS}")
    args.n_values = [int(x) for x in args.n_values.split(",") if x.strip()]
    args.beam_widths = [int(x) for x in args.beam_widths.split(",") if x.strip()]
    if any(v < 2 for v in args.n_values + args.beam_widths):
        ap.error("--n-values / --beam-widths: every value must be >= 2 (1 shares nothing)")
    args.early_stopping = {"false": False, "true": True, "never": "never"}[args.early_stopping]
    return args


def print_table(sharing_rows: list[dict], prefix: dict | None) -> None:
    if sharing_rows:
        print()
        print("KV blocks in use with (shared) and without (unshared) sharing; saving = 1 - shared/unshared.")
        print("  peak = largest blocks-in-use at any step; mean = blocks in use averaged over the run's steps.")
        print("  tok/s = output tokens (parallel: all n samples; beam: the returned hypothesis) / wall time.")
        header = (f"{'setting':<10} {'peak sh':>8} {'peak un':>8} {'peak save':>9} {'mean sh':>9} {'mean un':>9} "
                  f"{'mean save':>9} {'tok/s sh':>9} {'tok/s un':>9} {'sh/un':>6} {'preempt':>7} {'same out':>8}")
        print(header)
        print("-" * len(header))
        for r in sharing_rows:
            name = f"{'n' if r['part'] == 'parallel' else 'beam'}={r['width']}"
            print(f"{name:<10} {r['peak_blocks_shared']:>8} {r['peak_blocks_unshared']:>8} "
                  f"{r['peak_saving'] * 100:>8.1f}% {r['mean_blocks_shared']:>9.1f} {r['mean_blocks_unshared']:>9.1f} "
                  f"{r['mean_saving'] * 100:>8.1f}% {r['out_tok_per_s_shared']:>9.1f} "
                  f"{r['out_tok_per_s_unshared']:>9.1f} {r['throughput_ratio']:>5.2f}x "
                  f"{r['preemptions_shared']:>3}/{r['preemptions_unshared']:<3} "
                  f"{r['identical_requests']:>3}/{r['num_prompts']:<4}")
    if prefix:
        on, off = prefix["runs"]
        print()
        print(f"Shared system prompt: {prefix['requests']} requests, system prompt {prefix['system_prompt_tokens']} "
              f"tokens (prompts {prefix['prompt_len_min']}-{prefix['prompt_len_max']} tokens, common prefix "
              f"{prefix['common_prefix_tokens']}), {prefix['max_new']} new tokens, greedy; one untimed warm-up "
              f"request with the system prompt first in both runs.")
        header = (f"{'prefix cache':<12} {'out tok/s':>9} {'mean TTFT s':>11} {'med TTFT s':>10} {'prefilled':>9} "
                  f"{'cached':>8} {'tok hit':>7} {'blk hit':>7} {'preempt':>7}")
        print(header)
        print("-" * len(header))
        for r in (on, off):
            print(f"{'on' if r['prefix_caching'] else 'off':<12} {r['output_tok_per_s']:>9.1f} "
                  f"{r['mean_ttft_s']:>11.3f} {r['median_ttft_s']:>10.3f} {r['prefilled_tokens']:>9} "
                  f"{r['prefix_cached_tokens']:>8} {r['token_hit_rate']:>7.3f} {r['block_hit_rate']:>7.3f} "
                  f"{r['preemptions']:>7}")
        print(f"TTFT off/on {prefix['ttft_ratio_off_over_on']:.2f}x, throughput on/off "
              f"{prefix['throughput_ratio_on_over_off']:.2f}x, prefilled tokens off/on "
              f"{prefix['prefill_ratio_off_over_on']:.2f}x, identical greedy outputs "
              f"{prefix['identical_requests']}/{prefix['requests']}")
        print("  prefilled = prompt tokens run through the model (forward tokens - decode tokens); tok hit = "
              "prompt tokens served from the cache / prompt tokens; blk hit = the pool's block lookups that hit.")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, transformers = init_torch(args.threads)

    from hf_paged.models import load_default_model
    from hf_paged.core.sequence import SamplingParams

    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_default_model(dtype, attn_implementation="sdpa")
    model.to(args.device)
    env = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "dtype": args.dtype, "device": args.device, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    log(f"torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} threads, {args.dtype} "
        f"on {args.device}; parts {','.join(args.only)}")

    # Warm-up (untimed): the model, the engine's kernels, a forked request and a beam search.
    engine, _ = make_engine(model, args, 256)
    warm = chat_ids(tokenizer, [{"role": "user", "content": "Name three colours of the rainbow."}])
    engine.generate([warm, warm, warm], [SamplingParams(max_new_tokens=4, temperature=0.0),
                                         SamplingParams(max_new_tokens=4, temperature=0.8, n=2, seed=0),
                                         SamplingParams(max_new_tokens=4, temperature=0.0, num_beams=2)],
                    use_tqdm=False)
    discard(engine)

    sharing_rows: list[dict] = []
    prompts = instruction_prompts(tokenizer, args.num_prompts) if {"parallel", "beam"} & set(args.only) else []
    if prompts:
        lens = [len(p) for p in prompts]
        log(f"instruction prompts: {len(prompts)}, {min(lens)}-{max(lens)} tokens (mean {statistics.fmean(lens):.1f}), "
            f"max {args.max_new} new tokens, prefix caching off")
    for kind in ("parallel", "beam"):
        if kind in args.only:
            sharing_rows += sharing_part(model, args, kind, prompts)
    prefix = prefix_part(model, tokenizer, args) if "prefix" in args.only else None

    print_table(sharing_rows, prefix)
    preempted = sum(r["preemptions_shared"] + r["preemptions_unshared"] for r in sharing_rows)
    if prefix:
        preempted += sum(r["preemptions"] for r in prefix["runs"])
    print(f"preemptions in all timed runs: {preempted}" + ("" if not preempted else
                                                          "  (WARNING: the pool was too small; figures are off)"))
    if args.json:
        dump = {"args": vars(args), "env": env, "sharing": sharing_rows, "prefix": prefix,
                "rss_gib": round(_rss_gib(), 2)}
        Path(args.json).write_text(json.dumps(dump, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
