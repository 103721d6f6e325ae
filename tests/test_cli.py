"""The hf-paged command: generate (arguments, stdin, --file; JSON lines equal to HF's greedy text; progress bar on
stderr; option errors name the option), bench, serve's delegation, and chat driven through a real pseudo-terminal
(type a message, read the streamed answer, /exit)."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

from hf_paged import cli

from dropin_helpers import one_thread  # noqa: F401

KV = ["--kv-memory", "64MiB"]
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def hf_greedy(smollm2, prompt_ids, n):
    model, tok = smollm2
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_prompts_as_arguments(smollm2, capsys):
    _, tok = smollm2
    prompts = ["Once upon a time", "The capital of France is"]
    assert cli.main(["generate", *prompts, "--max-tokens", "8", "--temperature", "0", *KV]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for r, p in zip(records, prompts):
        ids = tok(p)["input_ids"]
        assert r["text"] == hf_greedy(smollm2, ids, 8)
        assert (r["finish_reason"], r["prompt_tokens"], r["completion_tokens"], r["index"]) == \
            ("length", len(ids), 8, 0)
    assert "hf_paged" in captured.err and "req" in captured.err  # the progress bar


def test_generate_from_stdin_and_file_with_chat_n_and_stop(smollm2, tmp_path, monkeypatch, capsys):
    _, tok = smollm2
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n\nName a fruit.\n"))
    assert cli.main(["generate", "--chat", "--max-tokens", "6", "--temperature", "0", "--no-progress", *KV]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == ["What is 2+2?", "Name a fruit."]
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    assert records[0]["text"] == hf_greedy(smollm2, chat, 6) and records[0]["prompt_tokens"] == len(chat)

    (tmp_path / "prompts.txt").write_text("Once upon a time\n")
    assert cli.main(["generate", "--file", str(tmp_path / "prompts.txt"), "--n", "2", "--seed", "3",
                     "--max-tokens", "12", "--stop", ",", "--no-progress", *KV]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    for r in records:
        assert "," not in r["text"] and r["finish_reason"] in ("stop", "length")


def test_generate_option_errors_name_the_option(capsys):
    with pytest.raises(SystemExit, match="--top-p"):
        cli.main(["generate", "hi", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match="--max-tokens"):
        cli.main(["generate", "hi", "--max-tokens", "0"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "--kv-memory", "lots"])
    assert "not a size" in capsys.readouterr().err


def test_bench(capsys):
    assert cli.main(["bench", "-n", "3", "--input-len", "12", "--output-len", "4", "--no-progress", *KV]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["requests"] == 3 and report["output_tokens"] == 12 and report["output_tokens_per_s"] > 0


def test_serve_delegates_to_hf_paged_serve(capsys):
    pytest.importorskip("hf_paged.serve.cli")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    serve_help = capsys.readouterr().out
    assert "--port" in serve_help
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    generate_help = capsys.readouterr().out
    for flag in ("--model", "--dtype", "--kv-memory", "--kv-cache-dtype", "--max-num-seqs", "--max-model-len"):
        assert flag in serve_help and flag in generate_help  # one set of model and engine flags (hf_paged.loading)


def _read_until(fd: int, marker: str, seen: list[str], timeout: float = 120.0) -> str:
    """Read the terminal until ``marker`` appears after what was read so far; returns everything read."""
    start = len("".join(seen))
    deadline = time.monotonic() + timeout
    while marker not in "".join(seen)[start:]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} in the terminal output: {''.join(seen)!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"terminal closed before {marker!r}: {''.join(seen)!r}") from None
            seen.append(ANSI_ESCAPE.sub("", chunk))  # e.g. readline's bracketed-paste switches
    return "".join(seen)


def test_chat_in_a_pseudo_terminal(smollm2):
    _, tok = smollm2
    question = "What is the capital of Japan?"
    chat = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True)
    expected = hf_greedy(smollm2, list(chat["input_ids"] if hasattr(chat, "keys") else chat), 12).strip()

    controller, terminal = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-m", "hf_paged.cli", "chat", "--temperature", "0", "--max-tokens",
                             "12", *KV], stdin=terminal, stdout=terminal, stderr=terminal, env=env,
                            close_fds=True)
    os.close(terminal)
    seen: list[str] = []
    try:
        _read_until(controller, "\n> ", seen)
        os.write(controller, (question + "\n").encode())
        _read_until(controller, question, seen)  # the terminal's echo
        before = len("".join(seen))
        text = _read_until(controller, "\n> ", seen)
        answer = text[before:].rsplit("\n> ", 1)[0].replace("\r\n", "\n").strip()
        assert answer == expected
        os.write(controller, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
