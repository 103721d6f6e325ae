"""Per-token cost of checking stop strings, against the output's length: the output processor's incremental check
(``IncrementalDetokenizer`` + a search of the new text only) beside re-decoding the whole output every token (what
the engine did before).

    python benchmarks/stop_strings.py [--lengths 64,256,1024,4096]

Prints, for each output length, the microseconds per token of both and their ratio; the incremental cost should
stay flat while the full re-decode grows with the length.
"""

from __future__ import annotations

import argparse
import time

from hf_paged.detokenizer import IncrementalDetokenizer
from hf_paged.models import load_default_model
from hf_paged.engine.output_processor import OutputProcessor
from hf_paged.core.sequence import SamplingParams, Sequence

STOPS = ["<|stop|>", "\n\nUser:"]


def _tokens(tok, length: int) -> list[int]:
    text = ("The quick brown fox jumps over the lazy dog; naïve café — 東京 🚀. " * (length // 8 + 1))
    return tok(text, add_special_tokens=False)["input_ids"][:length]


def incremental_us_per_token(tok, tokens: list[int]) -> float:
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=len(tokens), stop=STOPS), block_table=None)
    seq.detokenizer = IncrementalDetokenizer(tok, seq.prompt_token_ids)
    start = time.perf_counter()
    for token in tokens:
        seq.token_ids.append(token)
        new = seq.detokenizer.add(token)
        if new and OutputProcessor._find_stop_string(seq, len(new)):
            raise AssertionError("no stop string is in the text")
    return (time.perf_counter() - start) / len(tokens) * 1e6


def full_decode_us_per_token(tok, tokens: list[int]) -> float:
    out: list[int] = []
    start = time.perf_counter()
    for token in tokens:
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if any(s in text for s in STOPS):
            raise AssertionError("no stop string is in the text")
    return (time.perf_counter() - start) / len(tokens) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="64,256,1024,4096")
    args = ap.parse_args()
    _, tok = load_default_model()
    print(f"{'output tokens':>13} | {'incremental us/token':>20} | {'full re-decode us/token':>23} | ratio")
    for length in map(int, args.lengths.split(",")):
        tokens = _tokens(tok, length)
        inc = min(incremental_us_per_token(tok, tokens) for _ in range(3))
        full = min(full_decode_us_per_token(tok, tokens) for _ in range(3 if length <= 1024 else 1))
        print(f"{len(tokens):>13} | {inc:>20.1f} | {full:>23.1f} | {full / inc:.1f}x")


if __name__ == "__main__":
    main()
