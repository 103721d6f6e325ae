"""The benchmark workloads: token-id prompts plus the exact number of new tokens each request generates.

``fixed``: the shared peer workload (``/work/shared/peers/workload.py``): N deterministic prompts, each cut or
padded (by repeating ``FILLER_TEXT``) to exactly ``prompt_len`` tokens, exactly M new tokens each. The prompt
texts are tokenized the way the peer scripts do (``tokenizer.encode(text)``, no chat template), so the token ids
are the ones vLLM CPU and the other peers run on.

``mixed``: N prompts with lengths uniform in [20, 1000] and output lengths uniform in [16, 512] (both ranges
configurable), deterministic from a seed. Each prompt starts with the same request text as the fixed workload
and is extended with seeded, varied sentences, then cut to its length, so no two prompts share more than a few
leading tokens.
"""

from __future__ import annotations

import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

PEERS_DIR = Path("/work/shared/peers")

try:  # the shared definition, so every engine in every script runs the same prompts
    if PEERS_DIR.is_dir() and str(PEERS_DIR) not in sys.path:
        sys.path.insert(0, str(PEERS_DIR))
    import workload as _shared  # type: ignore

    make_prompt_texts = _shared.make_prompt_texts
    fit_prompt_ids = _shared.fit_prompt_ids
    FILLER_TEXT = _shared.FILLER_TEXT
    WARMUP_TEXTS = _shared.WARMUP_TEXTS
    WORKLOAD_SOURCE = str(Path(_shared.__file__).resolve())
except ImportError:  # a verbatim copy of the generator, for machines without /work/shared/peers
    _TOPICS = [
        "the history of the printing press", "how bees communicate", "a lighthouse keeper",
        "the water cycle", "a robot learning to paint", "the rules of chess",
        "why the sky is blue", "a journey across the desert", "how compilers work",
        "the life of a river otter", "a city on Mars", "baking sourdough bread",
        "the invention of the telephone", "volcanoes and plate tectonics",
        "a detective in Victorian London", "how vaccines train the immune system",
    ]

    def make_prompt_texts(n):
        out = []
        for i in range(n):
            topic = _TOPICS[i % len(_TOPICS)]
            out.append(f"Request {i}: Write a detailed, friendly explanation about {topic}. "
                       f"Start with an introduction and then give three key facts.")
        return out

    def fit_prompt_ids(ids, prompt_len, filler_ids):
        ids = list(ids)
        if prompt_len is None or prompt_len <= 0:
            return ids
        while len(ids) < prompt_len:
            ids.extend(filler_ids)
        return ids[:prompt_len]

    FILLER_TEXT = " The quick brown fox jumps over the lazy dog."
    WARMUP_TEXTS = ["Warm-up one: name three colours of the rainbow.",
                    "Warm-up two: what is the capital city of France?"]
    WORKLOAD_SOURCE = "local copy in benchmarks/workloads.py"


# Material for the mixed workload's prompt bodies (seeded choice, so prompts differ after their first tokens).
_SUBJECTS = ["The old lighthouse", "A curious otter", "The compiler", "Every honeybee", "The desert caravan",
             "A Victorian detective", "The printing press", "Our small robot", "The volcano", "A sourdough starter",
             "The chess grandmaster", "The river", "A telephone operator", "The immune system", "The Martian city",
             "An astronomer"]
_VERBS = ["quietly observed", "carefully explained", "slowly rebuilt", "suddenly remembered", "patiently measured",
          "happily described", "nervously questioned", "boldly challenged", "gently repaired", "eagerly compared"]
_OBJECTS = ["the pattern of the tides", "a forgotten map", "the rules of the game", "an unusual signal",
            "the colour of the evening sky", "a stack of handwritten letters", "the temperature of the oven",
            "the speed of the wind", "a long list of numbers", "the shape of the mountains",
            "the sound of distant bells", "a box of old photographs"]
_TAILS = ["before the sun went down.", "while everyone else was asleep.", "and wrote everything down.",
          "for the third time that week.", "without saying a single word.", "as the rain began to fall.",
          "and then asked a new question.", "in front of a small crowd."]


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    out_lens: list[int]  # exact number of new tokens per request
    warmup_prompts: list[list[int]]
    description: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def total_output_tokens(self) -> int:
        return sum(self.out_lens)

    @property
    def mean_decode_context(self) -> float:
        """Mean KV length a decode step attends over: prompt + half the output, averaged over requests."""
        return statistics.fmean(len(p) + o / 2 for p, o in zip(self.prompts, self.out_lens))

    @property
    def max_total_len(self) -> int:
        return max(len(p) + o for p, o in zip(self.prompts, self.out_lens))

    def summary(self) -> dict:
        pl = self.prompt_lens
        return {"name": self.name, "n": self.n, "prompt_len_min": min(pl), "prompt_len_max": max(pl),
                "prompt_len_mean": statistics.fmean(pl), "out_len_min": min(self.out_lens),
                "out_len_max": max(self.out_lens), "out_len_mean": statistics.fmean(self.out_lens),
                "output_tokens_total": self.total_output_tokens, "prompt_tokens_total": sum(pl),
                "mean_decode_context": round(self.mean_decode_context, 1), "description": self.description,
                **self.meta}


def _warmup_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in WARMUP_TEXTS]


def fixed_workload(tokenizer, n: int, prompt_len: int, max_new: int) -> Workload:
    filler = tokenizer.encode(FILLER_TEXT, add_special_tokens=False)
    prompts = [fit_prompt_ids(tokenizer.encode(t), prompt_len, filler) for t in make_prompt_texts(n)]
    return Workload("fixed", prompts, [max_new] * n, _warmup_ids(tokenizer),
                    f"{n} prompts x {prompt_len} tokens, exactly {max_new} new tokens each",
                    {"source": WORKLOAD_SOURCE})


def mixed_workload(tokenizer, n: int, seed: int, prompt_range: tuple[int, int],
                   out_range: tuple[int, int]) -> Workload:
    rng = random.Random(seed)
    texts = make_prompt_texts(n)
    prompts, out_lens = [], []
    for i in range(n):
        length = rng.randint(*prompt_range)
        out_lens.append(rng.randint(*out_range))
        ids = tokenizer.encode(texts[i])
        while len(ids) < length:
            sentence = (f" {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                        f"{rng.choice(_TAILS)}")
            ids.extend(tokenizer.encode(sentence, add_special_tokens=False))
        prompts.append(ids[:length])
    return Workload("mixed", prompts, out_lens, _warmup_ids(tokenizer),
                    f"{n} prompts, lengths uniform in [{prompt_range[0]}, {prompt_range[1]}], outputs uniform in "
                    f"[{out_range[0]}, {out_range[1]}] (seed {seed})", {"seed": seed})


def peer_workload(name: str, tokenizer, n: int, seed: int = 0) -> Workload:
    """The workloads hf_paged is measured on against vLLM: "fixed" (n x 128 prompt tokens x 128 new tokens, the
    peers' reference workload) and "mixed" (prompts of 20-1000 tokens, 16-512 new tokens)."""
    if name == "fixed":
        return fixed_workload(tokenizer, n, 128, 128)
    if name == "mixed":
        return mixed_workload(tokenizer, n, seed, (20, 1000), (16, 512))
    raise ValueError(f"workload: expected 'fixed' or 'mixed', got {name!r}")
