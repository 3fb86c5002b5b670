"""`vllm serve CKPT` with the deployment's arguments, driven by the official openai client.

The server starts through the image's entrypoint, deploy/bin/glowq-serve, so it gets exactly
deploy/serve-args.txt (which includes `--quantization glowq`) with `--host 127.0.0.1 --port
<free port>` in place of the file's port, and the checkpoint path. Expected answers come from the
offline engine on the same checkpoint with the same dtype and compile mode (its accuracy
against the PyTorch reference is test_plugin_offline's job), compared by token id; a
completion's text is compared with the offline engine's text for the same request, never
required to be non-empty (random byte tokens may legitimately detokenize to nothing).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_helpers import PROMPTS, REPO_ROOT, engine_env, standard_job

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
STARTUP_TIMEOUT_S = 420
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on the port and a new server could bind it (SO_REUSEADDR, as servers do,
    since the closed client connections linger in TIME_WAIT)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve was not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop_by_pid(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's pid only, as an operator would; vLLM must stop its children."""
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def checkpoint(glowq_checkpoints) -> Path:
    return glowq_checkpoints.get("llama")


@pytest.fixture(scope="module")
def chat_prompt_ids(checkpoint) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def expected(checkpoint, chat_prompt_ids, engine_results) -> dict:
    """Greedy token ids per prompt (the PROMPTS and then the rendered chat) and the PROMPTS'
    texts from offline vLLM."""
    job = standard_job(checkpoint, dtype="bfloat16", enforce_eager=False, max_tokens=MAX_TOKENS,
                       prompts=[*PROMPTS, chat_prompt_ids], inspect_layers=False)
    outputs = engine_results(job)["outputs"]
    return {"completions": [o["token_ids"] for o in outputs[:-1]], "texts": [o["text"] for o in outputs[:-1]],
            "chat": outputs[-1]["token_ids"]}


def start_glowq_serve(checkpoint: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    """A server started as the image starts it: deploy/bin/glowq-serve with deploy/serve-args.txt
    (and `extra` arguments), on 127.0.0.1:port, in its own process group, its output in `log`."""
    command = [str(REPO_ROOT / "deploy" / "bin" / "glowq-serve"), str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), *extra]
    env = engine_env(1, in_process_engine=False)
    env.update(GLOWQ_SERVE_ARGS_FILE=str(REPO_ROOT / "deploy" / "serve-args.txt"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    with log.open("w") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextlib.contextmanager
def glowq_server(checkpoint: Path, folder: Path, *extra: str) -> Iterator[dict]:
    """start_glowq_serve on a free port, healthy, stopped on the way out; yields its process,
    port and log file."""
    port = free_port()
    log = folder / "server.log"
    proc = start_glowq_serve(checkpoint, port, log, *extra)
    try:
        wait_healthy(proc, port, log)
        yield {"proc": proc, "port": port, "log": log}
    finally:
        if proc.poll() is None:
            stop_by_pid(proc)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # only reached when a test already failed


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with glowq_server(checkpoint, tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client, prompt: str, **kwargs):
    return client.completions.create(model="glowq", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                     extra_body={"return_token_ids": True, "ignore_eos": True}, **kwargs)


def test_completions(client, expected):
    """Token ids and text as offline vLLM gives them. An empty text can be right: the random
    model emits ids past the tokenizer's 259 tokens (vocab_size is 384) and lone UTF-8
    continuation bytes, which vLLM's incremental detokenizer holds back until a decodable byte
    follows and drops at the end."""
    assert any(expected["texts"]), "offline vLLM decoded no text at all, so comparing texts would check nothing"
    for prompt, tokens, text in zip(PROMPTS, expected["completions"], expected["texts"]):
        choice = complete(client, prompt).choices[0]
        assert choice.token_ids == tokens, prompt
        assert choice.text == text, prompt


def test_chat_completion_uses_the_chat_template(client, expected):
    response = client.chat.completions.create(
        model="glowq", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.token_ids == expected["chat"]


def test_streaming_matches_non_streaming(client, expected):
    chunks = list(complete(client, PROMPTS[0], stream=True))
    streamed = [token for chunk in chunks for choice in chunk.choices for token in (choice.token_ids or [])]
    assert len(chunks) > 1
    assert streamed == expected["completions"][0]
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == complete(client, PROMPTS[0]).choices[0].text


def test_sixteen_concurrent_requests(client, expected):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda p: complete(client, p), prompts))
    for i, response in enumerate(responses):
        assert response.choices[0].token_ids == expected["completions"][i % len(PROMPTS)], i


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_api_docs_are_off_and_the_open_endpoints_are_as_documented(server):
    """deploy/README.md: --disable-fastapi-docs removes /docs and /openapi.json; /version and
    /metrics answer without an API key, which is why the manifests add a NetworkPolicy."""
    port = server["port"]
    assert {path: http_status(port, path) for path in ("/docs", "/openapi.json", "/version", "/metrics")} == {
        "/docs": 404, "/openapi.json": 404, "/version": 200, "/metrics": 200}


def test_server_log_has_no_false_alarms(server):
    """Warnings a first-time reader would chase: a flag given twice, and one line per layer about
    the zero points' int32 -> uint8 load (by design, see vllm_glowq.loading)."""
    log = server["log"].read_text()
    assert "quantization=glowq" in log and "Found duplicate keys" not in log
    assert "qzeros with dtype" not in log


def test_zz_server_stops_by_pid_and_leaves_nothing(server):
    """Defined last, so it runs last in this module; the fixture's teardown then has nothing to do."""
    proc, port = server["proc"], server["port"]
    assert "quantization=glowq" in server["log"].read_text()
    stop_by_pid(proc)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_alive(proc.pid), "processes of the server's group survived SIGTERM"
    assert port_is_free(port)
