"""The ``hf-paged`` command (also ``python -m hf_paged.cli``): generate, chat, bench and serve on hf_paged's engine.

    hf-paged generate "Once upon a time" "The capital of France is" --max-tokens 32 --temperature 0
    hf-paged generate --file prompts.txt --chat > answers.jsonl     # one prompt a line; or from stdin
    hf-paged chat                                                   # interactive, streamed; /exit to leave
    hf-paged bench -n 64 --input-len 128 --output-len 128           # offline throughput
    hf-paged serve --port 8000                                      # the OpenAI-compatible server

Every command loads the embedded SmolLM2-135M-Instruct unless ``--model`` names a local Hugging Face folder or a
``.gguf`` file; ``--dtype``, ``--kv-memory`` (the KV pool's size, e.g. ``512MiB``) and ``--kv-cache-dtype`` (``int8``:
quantized K/V) set how it runs. Sampling options have OpenAI / vLLM names: ``--max-tokens``, ``--temperature``,
``--top-p``, ``--top-k``, ``--seed``, ``--n``, ``--stop``. ``generate`` writes one JSON object per line on stdout
(the prompt, the text, the finish reason and the token counts; with ``--n`` above 1 one line per sample, numbered
by ``index``) and a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .loading import DEFAULT_MODEL_NAME, add_engine_arguments, build_engine

DEFAULT_CHAT_MAX_TOKENS = 512


# ---- sampling ------------------------------------------------------------------------------------------------------
def _add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    group = parser.add_argument_group("sampling (OpenAI / vLLM names)")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    group.add_argument("--temperature", type=float, default=temperature,
                       help=f"0 = greedy (default {temperature})")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0, help="0 or -1: off")
    group.add_argument("--seed", type=int, default=None, help="per-request seed: the same output on every run")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop at this text (not included); repeatable")


def sampling_params(args: argparse.Namespace, n: int = 1) -> Any:
    from .core.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=list(args.stop), n=n)
    try:
        params.validate()
    except ValueError as exc:  # name the command-line option, not the dataclass field
        field = str(exc).split(":", 1)[0]
        names = {"max_new_tokens": "--max-tokens", "top_p": "--top-p", "top_k": "--top-k", "n": "--n"}
        raise SystemExit(f"{names.get(field, '--' + field.replace('_', '-'))}: {str(exc).split(':', 1)[1].strip()}")
    return params


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ---- generate ------------------------------------------------------------------------------------------------------
def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from the arguments, else one per line from ``--file`` (``-``: stdin), else from piped stdin."""
    if args.prompts and args.file:
        raise SystemExit("generate: give prompts as arguments or --file, not both")
    if args.prompts:
        return list(args.prompts)
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise SystemExit("generate: no prompts (give them as arguments, --file FILE, or on stdin)")
    return [line for line in text.splitlines() if line.strip()]


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    if not prompts:
        raise SystemExit("generate: no prompts")
    if args.n < 1:
        raise SystemExit("--n: must be a positive integer")
    params = sampling_params(args, n=args.n)
    engine, _ = build_engine(args)
    try:
        tok = engine.tokenizer
        inputs = [_chat_prompt(tok, [{"role": "user", "content": p}]) if args.chat else p for p in prompts]
        show_bar = len(prompts) > 1 and not args.no_progress
        results = engine.generate(inputs, params, use_tqdm=show_bar)
        for prompt, result in zip(prompts, results):
            for index, sample in enumerate(result.samples or [result]):
                record = {"prompt": prompt, "index": index, "text": sample.text,
                          "finish_reason": sample.finish_reason.value if sample.finish_reason else None,
                          "prompt_tokens": len(result.prompt_token_ids), "completion_tokens": len(sample.token_ids)}
                sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    finally:
        engine.close()
    return 0


# ---- chat ----------------------------------------------------------------------------------------------------------
CHAT_HELP = "commands: /exit (or Ctrl-D) leaves, /reset forgets the conversation, Ctrl-C stops an answer"


def cmd_chat(args: argparse.Namespace) -> int:
    try:  # line editing and history for input(); its prompt then goes to stdout (else to stderr)
        import readline  # noqa: F401
    except ImportError:
        pass
    params = sampling_params(args)
    engine, _ = build_engine(args)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    out = sys.stdout
    out.write(f"hf-paged chat ({CHAT_HELP})\n")
    out.flush()
    try:
        while True:
            try:
                line = input(args.user_prompt)
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history.clear()
                out.write("(conversation cleared)\n")
                out.flush()
                continue
            history.append({"role": "user", "content": text})
            prompt = _chat_prompt(tok, system + history)
            out.write(args.assistant_prompt)
            out.flush()
            answer = []
            stream = engine.stream_text(prompt, params)
            try:
                for delta in stream:
                    if delta.text:
                        answer.append(delta.text)
                        out.write(delta.text)
                        out.flush()
            except KeyboardInterrupt:
                stream.close()  # aborts the request
                answer.append(" [stopped]")
                out.write(" [stopped]")
            out.write("\n")
            out.flush()
            history.append({"role": "assistant", "content": "".join(answer).strip()})
    finally:
        engine.close()
    return 0


# ---- bench ---------------------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Offline throughput: ``-n`` requests of ``--input-len`` random token ids, each generating exactly
    ``--output-len`` tokens (greedy, eos ignored), submitted at once; one untimed warm-up request first."""
    import torch

    from .core.sequence import SamplingParams

    engine, _ = build_engine(args)
    try:
        vocab = engine.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
        params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        engine.generate([prompts[0][: max(1, args.input_len // 4)]], SamplingParams(max_new_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        results = engine.generate(prompts, params, use_tqdm=not args.no_progress)
        elapsed = time.perf_counter() - start
        output_tokens = sum(len(r.token_ids) for r in results)
        report = {"model": args.model or f"{DEFAULT_MODEL_NAME} (embedded)", "dtype": args.dtype,
                  "requests": len(results), "input_len": args.input_len, "output_len": args.output_len,
                  "elapsed_s": round(elapsed, 3), "output_tokens": output_tokens,
                  "output_tokens_per_s": round(output_tokens / elapsed, 1),
                  "total_tokens_per_s": round((output_tokens + args.input_len * len(results)) / elapsed, 1),
                  "requests_per_s": round(len(results) / elapsed, 3)}
        sys.stdout.write(json.dumps(report) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        engine.close()
    return 0


# ---- serve ---------------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import cli as serve_cli

    return serve_cli.run(args)


# ---- the command ---------------------------------------------------------------------------------------------------
def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-paged", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{generate,chat,bench,serve}", required=True)

    gen = sub.add_parser("generate", help="complete prompts; one JSON line each on stdout",
                         description="Complete prompts (arguments, --file, or one per line on stdin) as one "
                                     "continuous batch; one JSON object per line on stdout.")
    gen.add_argument("prompts", nargs="*", help="prompts (default: --file, or one per line on stdin)")
    gen.add_argument("--file", default=None, help="read prompts from this file, one per line ('-': stdin)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user message (chat template)")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_sampling_options(gen, max_tokens=64, temperature=1.0)
    add_engine_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streamed",
                          description=f"Chat with the model in the terminal; answers stream as they are "
                                      f"generated. {CHAT_HELP}.")
    chat.add_argument("--system", default=None, help="a system message at the start of the conversation")
    chat.add_argument("--user-prompt", default="> ", help=argparse.SUPPRESS)
    chat.add_argument("--assistant-prompt", default="", help=argparse.SUPPRESS)
    _add_sampling_options(chat, max_tokens=DEFAULT_CHAT_MAX_TOKENS, temperature=0.7)
    add_engine_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="offline throughput of the engine",
                           description=cmd_bench.__doc__.replace("``", "'"))
    bench.add_argument("-n", "--num-prompts", type=int, default=64)
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=128)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", default=None, help="also write the report to this file")
    bench.add_argument("--no-progress", action="store_true")
    add_engine_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (hf_paged.serve)",
                           description="The OpenAI-compatible HTTP server; options: hf-paged serve --help.")
    if list(argv[:1]) == ["serve"]:  # its options come from hf_paged.serve, imported only when asked for
        from .serve import cli as serve_cli

        serve_cli.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    for name in ("max_tokens", "num_prompts", "input_len", "output_len", "max_num_seqs"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be a positive integer (got {value})")
    from . import envs
    from .distributed import run_cli

    if envs.world_size() > 1:  # torchrun: rank 0 runs the command, the other ranks its forwards (distributed.py)
        from .serve.cli import _reexec_with_short_openmp_spin

        return run_cli(args, args.func, _reexec_with_short_openmp_spin if args.command == "serve" else None)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
