"""`zoo serve` as a real process on 127.0.0.1, driven by the official openai client: greedy completions equal
`zoo predict`'s and HF's, chat, streaming, stop, fill-in-the-middle, every error status, 16 concurrent streams
each equal to its sequential result, disconnects, SIGTERM. And the continuous batch itself, in process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package ships on
import numpy as np
import pytest
from conftest import BUNDLED_TOKENIZER, zoo

openai = pytest.importorskip("openai")
KEY = "sk-zoo-test"
PROMPTS = ["def add(a, b):", "x = 1", "import os\n", "class A:", "for i in range(10):", "print(", "# sum", "return"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, hf_dir, tmp_path, *extra: str) -> None:
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        self.args = ["--weights", str(hf_dir), "--config", str(hf_dir / "config.json"), "--tokenizer", str(hf_dir)]
        cmd = [sys.executable, "-m", "registry_spec.cli", "serve", "wizardcoder-tiny", *self.args,
               "--port", str(self.port), "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("server did not start: " + self.log.read_text())

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def hf_dir(hf_tiny):
    from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer

    WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER).backend.save(str(hf_tiny / "tokenizer.json"))
    return hf_tiny


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    s = Server(hf_dir, tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--max-batch-size", "8")
    yield s
    s.stop()


def predict(hf_dir, *args: str) -> list[dict]:
    r = zoo("predict", "wizardcoder-tiny", "--weights", str(hf_dir), "--config", str(hf_dir / "config.json"),
            "--tokenizer", str(hf_dir), "--json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_greedy_completions_equal_predict_and_hf(server, hf_dir, hf_model):
    import torch
    from transformers import PreTrainedTokenizerFast

    client = server.client()
    assert [m.id for m in client.models.list().data] == ["wizardcoder-tiny"]
    out = client.completions.create(model="wizardcoder-tiny", prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    expect = predict(hf_dir, "--template", "none", "--max-new-tokens", "12", "--prompt", PROMPTS[0],
                     "--prompt", PROMPTS[1])
    assert [c.text for c in out.choices] == [e["text"] for e in expect]
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == sum(e["prompt_tokens"] for e in expect)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    ids = hf_tok.encode(PROMPTS[0])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=49152,
                                eos_token_id=None)[0, len(ids):].tolist()
    assert out.choices[0].text == hf_tok.decode(ref, skip_special_tokens=True)
    lp = client.completions.create(model="wizardcoder-tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                   logprobs=1).choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v < 0 for v in lp.token_logprobs)


def scrape(server) -> dict[tuple, float]:
    """/metrics (open without the API key, as /health is) as {(sample name, finish reason or None): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(r.text) for s in family.samples]
    assert {s.labels["model_name"] for s in samples} == {"wizardcoder-tiny"}
    return {(s.name, s.labels.get("finished_reason")): s.value for s in samples if "le" not in s.labels}


def test_metrics_count_each_request_and_time_it_inside_the_server(server):
    before = scrape(server)
    t0 = time.perf_counter()
    out = server.client().completions.create(model="wizardcoder-tiny", prompt=PROMPTS[2:4], max_tokens=6,
                                             temperature=0)
    wall = time.perf_counter() - t0
    after = scrape(server)

    def delta(name: str, reason: str | None = None) -> float:
        return after[name, reason] - before.get((name, reason), 0.0)

    assert delta("zoo_prompt_tokens_total") == out.usage.prompt_tokens
    assert delta("zoo_generation_tokens_total") == out.usage.completion_tokens
    for name in ("time_to_first_token", "request_queue_time", "e2e_request_latency"):
        assert delta(f"zoo_{name}_seconds_count") == 2
        assert 0 < delta(f"zoo_{name}_seconds_sum") < 2 * wall
    assert delta("zoo_time_to_first_token_seconds_sum") < delta("zoo_e2e_request_latency_seconds_sum")
    # each request's first token is its TTFT; the others are spaced by the time per output token
    assert delta("zoo_time_per_output_token_seconds_count") == out.usage.completion_tokens - 2
    reasons = {"length": 0, "eos": 0}
    for c in out.choices:
        reasons["length" if c.finish_reason == "length" else "eos"] += 1
    assert all(delta("zoo_request_finished_total", r) == n for r, n in reasons.items())
    assert after["zoo_num_requests_running", None] == after["zoo_num_requests_waiting", None] == 0


def test_chat_streaming_stop_and_fill_in_the_middle(server, hf_dir):
    client = server.client()
    chat = client.chat.completions.create(model="wizardcoder-tiny", max_tokens=10, temperature=0,
                                          messages=[{"role": "user", "content": "Write a sum function."}])
    expect = predict(hf_dir, "--template", "wizardcoder", "--max-new-tokens", "10", "--prompt",
                     "Write a sum function.")[0]
    assert chat.choices[0].message.content == expect["text"] and chat.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="wizardcoder-tiny", max_tokens=10, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Write a sum function."}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expect["text"]
    assert chunks[-1].usage.completion_tokens == 10

    full = client.completions.create(model="wizardcoder-tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    for stream in (False, True):
        got = client.completions.create(model="wizardcoder-tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                        stop=[stop], stream=stream)
        if stream:
            parts = list(got)
            streamed = "".join(c.choices[0].text for c in parts if c.choices)
            reasons = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
            assert streamed == text[: text.find(stop)] and reasons == ["stop"]
        else:
            assert got.choices[0].text == text[: text.find(stop)] and got.choices[0].finish_reason == "stop"

    fim = client.completions.create(model="wizardcoder-tiny", prompt="def f(x):\n    ", suffix="\n    return y",
                                    max_tokens=8, temperature=0)
    expect = predict(hf_dir, "--template", "none", "--max-new-tokens", "8", "--prompt",
                     "<fim_prefix>def f(x):\n    <fim_suffix>\n    return y<fim_middle>")[0]
    assert fim.choices[0].text == expect["text"]
    a, b = (client.completions.create(model="wizardcoder-tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0.9,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_every_error_status_and_the_server_survives(server):
    client = server.client()
    bad = [({"temperature": 5}, 400), ({"n": 2}, 400), ({"logit_bias": {"1": 2}}, 400), ({"top_p": 0}, 400),
           ({"model": "gpt-4"}, 404), ({"prompt": "word " * 600}, 413)]
    for change, status in bad:
        args = {"model": "wizardcoder-tiny", "prompt": "x", "max_tokens": 2, **change}
        with pytest.raises(openai.APIStatusError) as exc:
            client.completions.create(**args)
        assert exc.value.status_code == status, (change, exc.value)
        assert set(exc.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").completions.create(model="wizardcoder-tiny", prompt="x", max_tokens=2)
    r = httpx.post(server.url + "/v1/completions", json={"bogus": 1}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # the key before the body
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "wizardcoder-tiny", "messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and "user" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_max_tokens_over_the_context_is_400_as_vllm_answers(server):
    client = server.client()
    context = httpx.post(server.url + "/tokenize", json={"model": "wizardcoder-tiny", "prompt": "x"},
                         headers={"Authorization": f"Bearer {KEY}"}).json()
    prompt_tokens, room = context["count"], context["max_model_len"] - context["count"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="wizardcoder-tiny", prompt="x", max_tokens=room + 1)
    assert exc.value.body["param"] == "max_tokens" and exc.value.body["code"] == "context_length_exceeded"
    assert f"max_tokens {room} or less" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="wizardcoder-tiny", max_completion_tokens=context["max_model_len"],
                                       messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["param"] == "max_completion_tokens"
    fits = client.completions.create(model="wizardcoder-tiny", prompt="x", max_tokens=room, temperature=0)
    assert fits.usage.prompt_tokens == prompt_tokens and fits.usage.completion_tokens <= room
    assert fits.usage.completion_tokens == room or fits.choices[0].finish_reason == "stop"


def test_tokenize_and_detokenize_as_vllm_serves_them(server, hf_dir):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(route: str, **body) -> httpx.Response:
        return httpx.post(server.url + route, json={"model": "wizardcoder-tiny", **body}, headers=headers)

    r = post("/tokenize", prompt=PROMPTS[0]).json()
    assert r == {"tokens": hf_tok.encode(PROMPTS[0]), "count": len(hf_tok.encode(PROMPTS[0])), "max_model_len": 256}
    messages = [{"role": "user", "content": "Reverse a string."}]
    chat = server.client().chat.completions.create(model="wizardcoder-tiny", messages=messages, max_tokens=1)
    assert post("/tokenize", messages=messages).json()["count"] == chat.usage.prompt_tokens
    text = "def f(x):\n    return x<|endoftext|>"
    assert post("/detokenize", tokens=hf_tok.encode(text)).json() == {"prompt": text}
    for route, body, param in (("/detokenize", {"tokens": [5, 10**6]}, "tokens"),
                               ("/tokenize", {"prompt": "x", "messages": messages}, None),
                               ("/tokenize", {"prompt": "x", "add_special_tokens": True}, "add_special_tokens")):
        r = post(route, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
    assert post("/tokenize", model="gpt-4", prompt="x").status_code == 404
    assert httpx.post(server.url + "/tokenize", json={"model": "wizardcoder-tiny", "prompt": "x"}).status_code == 401


def test_prompts_as_token_ids_complete_as_their_text_does(server, hf_dir):
    """OpenAI's token-id prompt forms (one prompt's ids, a list of them), as lm-eval's local-completions sends them:
    the same greedy completions as the texts; ids outside the vocabulary and mixed forms are 400s."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    client = server.client()
    ids = [hf_tok.encode(p) for p in PROMPTS[:2]]
    as_text = client.completions.create(model="wizardcoder-tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    as_ids = client.completions.create(model="wizardcoder-tiny", prompt=ids, max_tokens=6, temperature=0)
    one = client.completions.create(model="wizardcoder-tiny", prompt=ids[1], max_tokens=6, temperature=0)
    assert [c.text for c in as_ids.choices] == [c.text for c in as_text.choices]
    assert one.choices[0].text == as_text.choices[1].text and as_ids.usage == as_text.usage
    for prompt, says in (([ids[0][0], 10**6], "outside the vocabulary"), (["x", ids[0]], "token-id lists"),
                         ([], "not empty"), ([[]], "empty prompt")):
        r = httpx.post(server.url + "/v1/completions", json={"model": "wizardcoder-tiny", "prompt": prompt},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.json()


def test_sixteen_concurrent_streams_each_equal_their_sequential_result(server):
    client = server.client()
    jobs = [(PROMPTS[i % 8], 6 + 3 * (i % 5)) for i in range(16)]  # different lengths: rows leave and join
    sequential = [client.completions.create(model="wizardcoder-tiny", prompt=p, max_tokens=n,
                                            temperature=0).choices[0].text for p, n in jobs[:8]]
    sequential += [client.completions.create(model="wizardcoder-tiny", prompt=p, max_tokens=n,
                                             temperature=0).choices[0].text for p, n in jobs[8:]]
    results: list[str | None] = [None] * 16

    def run(i: int) -> None:
        p, n = jobs[i]
        stream = client.completions.create(model="wizardcoder-tiny", prompt=p, max_tokens=n, temperature=0,
                                           stream=True)
        results[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == sequential


def test_an_exported_backend_serves_concurrent_streams_as_the_online_engine(server, hf_dir, tmp_path):
    """`--backend onnx --artifacts D` (a fixed batch of 4: rows arriving together join in one call of its prefill
    graph): 8 concurrent streams on 4 slots, each client's greedy text the online server's."""
    out = tmp_path / "onnx"
    r = zoo("export", "wizardcoder-tiny", "--weights", str(hf_dir), "--config", str(hf_dir / "config.json"),
            "--tokenizer", str(hf_dir), "--backend", "onnx", "--output-dir", str(out), "--batch-size", "4",
            "--seq-length", "64")
    assert r.returncode == 0, r.stderr
    jobs = [(PROMPTS[i], 4 + 3 * (i % 3)) for i in range(8)]
    want = [server.client().completions.create(model="wizardcoder-tiny", prompt=p, max_tokens=n,
                                               temperature=0).choices[0].text for p, n in jobs]
    exported = Server(hf_dir, tmp_path, "--backend", "onnx", "--artifacts", str(out), "--max-batch-size", "4")
    try:
        client, results = exported.client(), [None] * len(jobs)
        start = threading.Barrier(len(jobs))

        def run(i: int) -> None:
            p, n = jobs[i]
            start.wait()
            stream = client.completions.create(model="wizardcoder-tiny", prompt=p, max_tokens=n, temperature=0,
                                               stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results == want
        assert httpx.get(exported.url + "/health", timeout=10).json()["completed"] == len(jobs)
    finally:
        exported.stop()


def test_a_disconnected_stream_frees_its_row(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "wizardcoder-tiny", "prompt": "def", "max_tokens": 250, "temperature": 0, "stream": True}
    before, counted = httpx.get(server.url + "/health").json(), scrape(server)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + 5
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.02)
    after = httpx.get(server.url + "/health").json()
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    key = ("zoo_request_finished_total", "cancelled")
    assert scrape(server)[key] == counted.get(key, 0) + 1


def test_a_stream_closed_while_it_waits_for_a_slot_leaves_the_queue_and_is_counted_once(tmp_path):
    from conftest import make_hf_checkpoint

    from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer

    long_dir = make_hf_checkpoint(tmp_path / "long", n_positions=2048)  # the first request runs for seconds
    WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER).backend.save(str(long_dir / "tokenizer.json"))
    s = Server(long_dir, tmp_path, "--max-batch-size", "1")
    body = {"model": "wizardcoder-tiny", "prompt": "def", "max_tokens": 2000, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # it holds the one slot
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60):
                health = httpx.get(s.url + "/health").json()
                assert health["waiting"] == 1 and health["cancelled"] == 0, health
            deadline = time.time() + 5
            while httpx.get(s.url + "/health").json()["waiting"] and time.time() < deadline:
                time.sleep(0.02)
            health = httpx.get(s.url + "/health").json()
            assert health["waiting"] == 0 and health["running"] == 1 and health["cancelled"] == 1, health
            assert scrape(s)[("zoo_request_finished_total", "cancelled")] == 1
    finally:
        s.stop()


def test_a_client_gone_before_a_plain_completion_ends_frees_its_row(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "wizardcoder-tiny", "prompt": "def", "max_tokens": 250, "temperature": 0}
    before = httpx.get(server.url + "/health").json()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(5, read=0.05))
    deadline = time.time() + 5
    while httpx.get(server.url + "/health").json()["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.02)
    after = httpx.get(server.url + "/health").json()
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    from registry_spec.serving.server import api_key
    from registry_spec.specs import ServeSpec

    monkeypatch.delenv("ZOO_API_KEY", raising=False)
    assert api_key(ServeSpec(model="m")) is None
    monkeypatch.setenv("ZOO_API_KEY", "from-env")  # kept out of `ps`, as VLLM_API_KEY is
    assert api_key(ServeSpec(model="m")) == "from-env"
    assert api_key(ServeSpec(model="m", api_key="flag")) == "flag"


def test_full_queue_is_429_and_sigterm_finishes_in_flight_requests(tmp_path):
    from conftest import make_hf_checkpoint

    from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer

    # a long context, so the first request is still running (a second queued) while the third is refused
    long_dir = make_hf_checkpoint(tmp_path / "long", n_positions=2048)
    WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER).backend.save(str(long_dir / "tokenizer.json"))
    s = Server(long_dir, tmp_path, "--max-batch-size", "1", "--max-queue", "1", "--shutdown-timeout", "120")
    tokens = 2000
    try:
        client = s.client("none")
        done: dict[str, object] = {}

        def long(name: str) -> None:
            try:
                done[name] = client.completions.create(model="wizardcoder-tiny", prompt="def", max_tokens=tokens,
                                                       temperature=0)
            except openai.APIStatusError as exc:
                done[name] = exc.status_code

        first = threading.Thread(target=long, args=("first",))
        first.start()
        while httpx.get(s.url + "/health").json()["running"] == 0:
            time.sleep(0.02)
        second = threading.Thread(target=long, args=("second",))
        second.start()
        while httpx.get(s.url + "/health").json()["waiting"] == 0:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="wizardcoder-tiny", prompt="x", max_tokens=2)
        s.proc.send_signal(signal.SIGTERM)
        first.join(60)
        second.join(60)
        assert s.proc.wait(60) == 0, s.log.read_text()
        assert done["first"].choices[0].finish_reason == "length"  # type: ignore[union-attr]
        assert done["first"].usage.completion_tokens == tokens  # type: ignore[union-attr]
        assert done["second"] == 500 or done["second"].usage.completion_tokens == tokens  # type: ignore[union-attr]
        shown = dict(line.split(None, 1) for line in s.proc.stdout.read().splitlines() if line.strip())  # the result
        completed = 1 + (done["second"] != 500)
        assert int(shown["completions"]) == completed, shown
        assert int(shown["completion_tokens"]) >= tokens * completed, shown
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()


def test_rows_joining_a_running_batch_decode_as_they_would_alone(hf_tiny):
    """In process, on the online engine: rows admitted between steps give their unbatched greedy tokens."""
    from registry_spec.generation import Batch, GenerationConfig, Row
    from wizardcoder_plugin.generation.online import Generator
    from wizardcoder_plugin.model.config import load_config
    from wizardcoder_plugin.model.runtime import build_model

    gen = Generator(build_model("custom", load_config(hf_tiny / "config.json"), hf_tiny), 10**6, 49152, max_batch=4)
    prompts = [[5, 17, 2000, 31, 7], [123, 4567, 89], [42] * 20, [9, 9]]
    alone = [gen.generate([p], GenerationConfig(max_new_tokens=10))[0].token_ids for p in prompts]
    batch = Batch(gen, 10**6, 49152, 8, 64)
    batch.open()
    rows = [Row(p, GenerationConfig(max_new_tokens=10), np.random.default_rng(0)) for p in prompts]
    sampled = Row(prompts[0], GenerationConfig(max_new_tokens=10, do_sample=True), np.random.default_rng(0))
    batch.admit(rows[:1])
    for step in range(40):
        if step in (2, 3, 5):
            batch.admit([rows[{2: 1, 3: 2, 5: 3}[step]]])
        if step == 4:
            batch.admit([sampled])  # a row needing logits switches the steps to the logits graph
        batch.step()
    assert not batch.rows and [r.generated for r in rows] == alone and len(sampled.generated) == 10
