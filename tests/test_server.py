"""mlx_dlm.server over loopback: OpenAI-shaped endpoints, streaming, frames, errors, disconnects, a bounded load."""

import http.client
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import mlx_dlm
from mlx_dlm.server import make_server


@pytest.fixture
def served(tiny_model_dir):
    server = make_server(str(tiny_model_dir), port=0, max_queue=8, max_body=4096, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _request(server, method, path, body=None, raw=None, timeout=120):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.getheader("Content-Type"), payload


def _host(server) -> bytes:
    """The Host header a client of this server sends."""
    return ("%s:%d" % server.server_address[:2]).encode()


def _post_head(server, length: int) -> bytes:
    """The request line and headers of a completions POST whose body is `length` bytes (sent separately)."""
    return (b"POST /v1/completions HTTP/1.1\r\nHost: " + _host(server) + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def _count_steps(server) -> list:
    """Record the step number of every state the server's generations produce (in the returned list)."""
    produced = []
    original = server.app.steps

    def counting(prompt, options):
        for state in original(prompt, options):
            produced.append(state.step)
            yield state

    server.app.steps = counting
    return produced


def _json(server, method, path, body=None, raw=None):
    status, _, payload = _request(server, method, path, body, raw)
    return status, json.loads(payload)


def _events(payload: bytes) -> list:
    return [json.loads(line[6:]) if line[6:] != b"[DONE]" else "[DONE]"
            for line in payload.split(b"\n\n") if line.startswith(b"data: ")]


def test_health_models_and_page(served):
    assert _json(served, "GET", "/health") == (200, {"status": "ok", "api_key_required": False})
    status, models = _json(served, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny" and models["object"] == "list"
    status, kind, page = _request(served, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b"<script" in page
    assert b"http://" not in page and b"https://" not in page  # self-contained: nothing from a CDN


def test_completion_matches_the_python_api(served, tiny_model_dir):
    body = {"prompt": "ROMEO:", "max_tokens": 24, "steps": 6, "seed": 3, "temperature": 0.8}
    status, r = _json(served, "POST", "/v1/completions", body)
    assert status == 200 and r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    model, tok = mlx_dlm.load(tiny_model_dir)
    want = mlx_dlm.generate(model, tok, "ROMEO:", max_tokens=24, steps=6, seed=3, temp=0.8)
    assert r["choices"][0]["text"] == want[len("ROMEO:"):] and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 6, "completion_tokens": 24, "total_tokens": 30} and r["nfe"] == 6


def test_stream_and_frames(served):
    body = {"prompt": "ROMEO:", "max_tokens": 16, "steps": 4, "seed": 1}
    _, _, plain = _request(served, "POST", "/v1/completions", body)
    status, kind, payload = _request(served, "POST", "/v1/completions", {**body, "stream": True})
    events = _events(payload)
    assert status == 200 and kind == "text/event-stream" and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["text"] == json.loads(plain)["choices"][0]["text"]
    _, _, payload = _request(served, "POST", "/v1/completions", {**body, "stream_frames": True})
    events = _events(payload)
    frames = [e for e in events if isinstance(e, dict) and e["object"] == "text_completion.frame"]
    assert [f["step"] for f in frames] == [1, 2, 3, 4]
    assert all(len(f["cells"]) == 6 + 16 for f in frames)
    masked = [sum(kind == "masked" for _, kind in f["cells"]) for f in frames]
    assert masked == [12, 8, 4, 0]  # the canvas fills as it denoises
    assert [sum(kind == "new" for _, kind in f["cells"]) for f in frames] == [4, 4, 4, 4]
    text = "".join(t for t, _ in frames[-1]["cells"][6:])
    assert text == events[-2]["choices"][0]["text"]


@pytest.mark.parametrize("body, raw, status, match", [
    (None, b"{not json", 400, "malformed JSON"),
    ({"prompt": "x", "model": "gpt-4"}, None, 400, "unknown model 'gpt-4'"),
    ({"prompt": 7}, None, 400, "'prompt' must be a string"),
    ({"prompt": "x", "max_tokens": "ten"}, None, 400, "'max_tokens' has the wrong type"),
    ({"prompt": "x", "steps": True}, None, 400, "'steps' has the wrong type"),
    ({"prompt": "x", "max_tokens": 100000}, None, 400, "between 1 and 256 (the model's context"),
    ({"prompt": "caf\u00e9"}, None, 400, "is not in the tokenizer's vocabulary"),
    ({"prompt": "x", "strategy": "best"}, None, 400, "unknown strategy 'best' (choose from"),
    ({"prompt": "x", "steps": 0}, None, 400, "'steps' must be at least 1, got 0"),
    ({"prompt": "x", "top_k": -1}, None, 400, "'top_k' must be >= 0 and 'top_p' in (0, 1]"),
    ({"prompt": "x", "seed": -1}, None, 400, "'seed' must be in [0, 2^64), got -1"),
    ({"prompt": "x", "seed": 2**64}, None, 400, "'seed' must be in [0, 2^64)"),
    (None, b'{"prompt": "x", "temperature": NaN}', 400, "'temperature' must be a finite number, got nan"),
    (None, b'{"prompt": "x", "cfg_scale": Infinity}', 400, "'cfg_scale' must be a finite number, got inf"),
    ({"prompt": "x", "template": "a[MASK]", "temperature": 0.5, "threshold": 2}, None, 400,
     "'threshold' must be in (0, 1], got 2"),
    (None, b'{"prompt": "' + b"a" * 5000 + b'"}', 413, "request body over 4096 bytes"),
])
def test_bad_requests_get_openai_style_errors(served, body, raw, status, match):
    got, err = _json(served, "POST", "/v1/completions", body, raw)
    assert got == status and match in err["error"]["message"] and err["error"]["type"]
    assert _json(served, "GET", "/health")[0] == 200  # and the server is still fine


def test_bad_options_are_refused_before_the_request_queues(served):
    """SamplerOptions.check runs before a request takes a queue slot or waits for the lock: with the lock held by
    another generation, {"steps": 0} still gets its 400 at once, naming the field."""
    with served.app.lock:
        tic = time.perf_counter()
        status, err = _json(served, "POST", "/v1/completions", {"prompt": "x", "steps": 0})
        assert time.perf_counter() - tic < 10  # the lock is held for the whole call: only a pre-queue check answers
    assert status == 400 and err["error"]["param"] == "steps"
    assert err["error"]["message"] == "'steps' must be at least 1, got 0"


def test_chat_needs_a_template_and_unknown_routes_404(served):
    status, err = _json(served, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400 and "chat template" in err["error"]["message"]
    assert _json(served, "POST", "/v1/nothing", {})[0] == 404
    assert _json(served, "GET", "/nothing")[0] == 404


def test_full_queue_is_503(served):
    held = [served.app.slots.acquire(blocking=False) for _ in range(9)]  # the running slot and all 8 waiting ones
    try:
        assert all(held)
        status, err = _json(served, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4})
        assert status == 503 and "busy" in err["error"]["message"]
    finally:
        for _ in held:
            served.app.slots.release()
    assert _json(served, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "steps": 2})[0] == 200


def test_a_client_that_disconnects_stops_its_generation(served):
    produced = _count_steps(served)
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 200, "steps": 200, "stream_frames": True}).encode()
    sock = socket.create_connection(served.server_address[:2])
    sock.sendall(_post_head(served, len(body)) + body)
    received = b""
    while b"data: " not in received:  # headers first, then the first frame
        chunk = sock.recv(4096)
        assert chunk, received  # the server answered and closed instead of streaming
        received += chunk
    sock.close()
    deadline = time.time() + 30
    while served.app.lock.locked() and time.time() < deadline:  # wait until the handler has given up
        time.sleep(0.05)
    assert not served.app.lock.locked() and 0 < len(produced) < 200


def test_loopback_load_every_request_answered_or_refused(served):
    """200 requests from 8 concurrent clients: each gets 200 or a clean 503, and the server stays healthy."""
    body = {"prompt": "ROMEO:", "max_tokens": 8, "steps": 2}

    def one(_):
        tic = time.perf_counter()
        status, _ = _json(served, "POST", "/v1/completions", body)
        return status, time.perf_counter() - tic

    tic = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    wall = time.perf_counter() - tic
    statuses = [s for s, _ in results]
    assert len(results) == 200 and set(statuses) <= {200, 503} and statuses.count(200) > 0
    assert _json(served, "GET", "/health") == (200, {"status": "ok", "api_key_required": False})
    latencies = sorted(t for _, t in results)
    print(f"load: {len(results) / wall:.1f} requests/s, p50 {statistics.median(latencies) * 1e3:.0f} ms, "
          f"p99 {latencies[int(0.99 * len(latencies)) - 1] * 1e3:.0f} ms, {statuses.count(503)} refused")


def test_binding_beyond_loopback_warns(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mlx_dlm.server", "--model", str(tiny_model_dir), "--host",
                             "0.0.0.0", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        second = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first.startswith("warning: binding 0.0.0.0") and "no authentication" in first
    assert "mlx_dlm.server: tiny on http://0.0.0.0:" in second


def test_a_half_precision_model_serves_from_worker_threads(tmp_path, tiny_model_dir):
    model, tok = mlx_dlm.load(tiny_model_dir)
    model.set_dtype(mlx_dlm.model.mx.float16)
    mlx_dlm.save_model(tmp_path / "half", model, tok)  # stored in float16, computed in float32 on the CPU
    server = make_server(str(tmp_path / "half"), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, r = _json(server, "POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 8, "steps": 2})
        assert status == 200 and len(r["choices"][0]["text"]) == 8
    finally:
        server.shutdown()
        server.server_close()


def _raw(server, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes, return everything the server answers until it closes the connection."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("head, status", [
    (b"Content-Length: -1\r\n", b"400"),
    ("Content-Length: \u00b2\r\n".encode(), b"400"),  # a digit to str.isdigit, not to int()
    (b"", b"411"),  # no Content-Length
    (b"Transfer-Encoding: chunked\r\n", b"501"),
])
def test_bodies_without_an_honest_length_are_refused(served, head, status):
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: " + _host(served) + b"\r\nContent-Type: application/json\r\n" + head +
               b"Connection: close\r\n\r\n" + b'5\r\n{"a":\r\n0\r\n\r\n')
    reply = _raw(served, request)
    assert reply.split(b"\r\n")[0].split(b" ")[1] == status, reply[:200]
    assert _json(served, "GET", "/health")[0] == 200


@pytest.mark.parametrize("body, match", [
    (b"[" * 200_000 + b"]" * 200_000, "malformed JSON (nested too deeply)"),
    (b'{"prompt": "x", "stream": "false"}', "'stream' must be true or false, got 'false'"),
    (b'{"prompt": "x", "n": 2}', "'n' is not supported by this server"),
    (b'{"prompt": "x", "stop": ["\\n"]}', "'stop' is not supported by this server"),
    (b'{"prompt": "x", "logprobs": 3}', "'logprobs' is not supported by this server"),
    (b'{"prompt": "x", "echo": true}', "'echo' is not supported by this server"),
])
def test_fields_the_server_would_misread_get_a_400(tiny_model_dir, body, match):
    server = make_server(str(tiny_model_dir), port=0, max_body=1 << 20, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, err = _json(server, "POST", "/v1/completions", raw=body)
        assert status == 400 and err["error"]["message"] == match
        neutral = {"prompt": "x", "max_tokens": 2, "steps": 1, "n": 1, "stop": None, "logprobs": None, "echo": False}
        assert _json(server, "POST", "/v1/completions", neutral)[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_stops_reading_frees_the_server(tiny_model_dir):
    """A stream_frames client that never reads fills the socket; the write times out after --timeout, its
    generation stops and the next request is answered. A half-sent request is dropped after the timeout too."""
    server = make_server(str(tiny_model_dir), port=0, quiet=True, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stalled = socket.create_connection(server.server_address[:2])
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps({"prompt": "", "max_tokens": 250, "steps": 250, "stream_frames": True}).encode()
        stalled.sendall(_post_head(server, len(body)) + body)
        time.sleep(0.5)
        tic = time.perf_counter()
        status, _, _ = _request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "steps": 2},
                                timeout=60)
        assert status == 200 and time.perf_counter() - tic < 30
        half = socket.create_connection(server.server_address[:2], timeout=10)
        half.sendall(_post_head(server, 100) + b"{")
        tic = time.perf_counter()
        answer = b""
        while chunk := half.recv(65536):  # until the server closes the connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and 0.9 < time.perf_counter() - tic < 5, answer
        half.close()
        stalled.close()
    finally:
        server.shutdown()
        server.server_close()


def test_memory_stays_bounded_over_many_shapes_and_options(tiny_model_dir, monkeypatch):
    """50 requests of different lengths, caches and temperatures: the model's memo of compiled steps and KV caches
    stays within its entry and byte caps (lowered here), and what it answers is still right."""
    from mlx_dlm import model as model_module

    monkeypatch.setattr(model_module, "MEMO_MAX_ENTRIES", 6)
    monkeypatch.setattr(model_module, "MEMO_MAX_BYTES", 200_000)
    server = make_server(str(tiny_model_dir), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sizes = []
    try:
        for i in range(50):
            body = {"prompt": "ROMEO:", "max_tokens": 8 + 2 * i, "steps": 2, "block_length": 4 + i, "seed": i,
                    "cache": "prefix" if i % 2 else "dual", "temperature": 0.5 + i / 100}
            status, reply = _json(server, "POST", "/v1/completions", body)
            assert status == 200, reply
            sizes.append((len(server.app.model.__dict__[model_module.MEMO_ATTRIBUTE]),
                          model_module.memo_bytes(server.app.model)))
    finally:
        server.shutdown()
        server.server_close()
    assert max(n for n, _ in sizes) <= 6 and max(b for _, b in sizes) <= 200_000
    fresh, tok = mlx_dlm.load(tiny_model_dir)  # nothing memoised: built from scratch
    assert "ROMEO:" + reply["choices"][0]["text"] == mlx_dlm.generate(
        fresh, tok, "ROMEO:", max_tokens=8 + 2 * 49, steps=2, block_length=4 + 49, seed=49, cache="prefix", temp=0.99)


@pytest.mark.parametrize("headers, status", [
    ({"Host": "evil.example:8080"}, 403),  # DNS rebinding: a foreign name for this loopback server
    ({"Origin": "http://evil.example"}, 403),  # a page of another site
    ({"Content-Type": "text/plain"}, 415),  # a "simple" cross-site POST needs no preflight: refused
])
def test_foreign_hosts_origins_and_content_types_are_refused(served, headers, status):
    conn = http.client.HTTPConnection(*served.server_address[:2], timeout=60)
    body = json.dumps({"prompt": "x", "max_tokens": 2, "steps": 1})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    reply = json.loads(response.read())
    conn.close()
    assert response.status == status and reply["error"]["message"]
    assert response.getheader("X-Frame-Options") == "DENY"
    own = {"Origin": "http://%s:%d" % served.server_address[:2]}
    conn = http.client.HTTPConnection(*served.server_address[:2], timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", **own})
    assert conn.getresponse().status == 200  # the page itself
    conn.close()


def test_api_key_and_max_tokens_cap(tiny_model_dir):
    server = make_server(str(tiny_model_dir), port=0, quiet=True, api_key="s3cret", max_tokens=16)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(body, key=None):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        reply = json.loads(response.read())
        conn.close()
        return response.status, reply

    try:
        ok = {"prompt": "x", "max_tokens": 16, "steps": 2}
        assert post(ok)[0] == 401 and post(ok, "wrong")[0] == 401 and post(ok, "s3cret")[0] == 200
        status, reply = post({**ok, "max_tokens": 17}, "s3cret")
        assert status == 400 and "between 1 and 16" in reply["error"]["message"]
        status, reply = post({"prompt": "x", "steps": 2}, "s3cret")  # no max_tokens: the default, within the cap
        assert status == 200 and reply["usage"]["completion_tokens"] == 16
        assert _json(server, "GET", "/health") == (200, {"status": "ok", "api_key_required": True})  # needs no key
        status, _, page = _request(server, "GET", "/")
        assert status == 200 and b'id="api_key"' in page  # the page sends the key it is given
    finally:
        server.shutdown()
        server.server_close()


def test_a_non_streaming_client_that_leaves_stops_its_generation(served):
    produced = _count_steps(served)
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 200, "steps": 200}).encode()
    sock = socket.create_connection(served.server_address[:2])
    sock.sendall(_post_head(served, len(body)) + body)
    deadline = time.time() + 30
    while not produced and time.time() < deadline:  # generation under way
        time.sleep(0.01)
    sock.close()
    while served.app.lock.locked() and time.time() < deadline:
        time.sleep(0.05)
    assert not served.app.lock.locked() and 0 < len(produced) < 200  # it stopped without running all 200 steps
    assert _json(served, "GET", "/health")[0] == 200


def test_a_generation_past_the_deadline_ends(tiny_model_dir):
    server = make_server(str(tiny_model_dir), port=0, quiet=True, deadline=0.05)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = {"prompt": "ROMEO:", "max_tokens": 200, "steps": 200}
        status, err = _json(server, "POST", "/v1/completions", body)
        assert status == 504 and err["error"]["message"] == "the generation ran past the server's --deadline of 0.05 s"
        status, _, payload = _request(server, "POST", "/v1/completions", {**body, "stream": True})
        events = [json.loads(line[6:]) for line in payload.decode().splitlines() if line.startswith("data: {")]
        assert status == 200 and events[-1]["error"]["type"] == "timeout" and b"[DONE]" not in payload
        assert _json(server, "GET", "/health")[0] == 200 and not server.app.lock.locked()
    finally:
        server.shutdown()
        server.server_close()


def test_load_with_a_stalled_and_a_slow_client(tiny_model_dir, monkeypatch):
    """200 requests from 8 clients of varied shapes while one client streams frames and never reads, and another
    sends its body a byte at a time: every well-behaved request is answered 200 or 503, the memo stays within its
    caps, and the server is healthy after."""
    from mlx_dlm import model as model_module

    monkeypatch.setattr(model_module, "MEMO_MAX_ENTRIES", 8)
    server = make_server(str(tiny_model_dir), port=0, quiet=True, timeout=2.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stalled():
        sock = socket.create_connection(server.server_address[:2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps({"prompt": "", "max_tokens": 250, "steps": 250, "stream_frames": True}).encode()
        sock.sendall(_post_head(server, len(body)) + body)
        return sock  # never read

    def slow():
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            body = json.dumps({"prompt": "x", "max_tokens": 4, "steps": 2}).encode()
            sock.sendall(_post_head(server, len(body)))
            for byte in body:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
            return sock.recv(65536).split(b" ")[1]

    def one(i):
        body = {"prompt": "ROMEO:", "max_tokens": 4 + i % 13, "steps": 2, "temperature": 0.5 + i % 5 / 10}
        return _json(server, "POST", "/v1/completions", body)[0]

    try:
        held = stalled()
        with ThreadPoolExecutor(9) as pool:
            slow_status = pool.submit(slow)
            statuses = list(pool.map(one, range(200)))
        # While the stalled stream holds the lock (until its write times out) the queue fills and the rest get a
        # clean 503; the queued ones are answered once the stall is dropped.
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1
        assert slow_status.result() in (b"200", b"503")
        assert len(server.app.model.__dict__[model_module.MEMO_ATTRIBUTE]) <= 8
        # The other requests may all be answered (many with 503) before the stalled write times out (2 s): the
        # lock must be freed by then, not at once.
        deadline = time.monotonic() + 10
        while server.app.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _json(server, "GET", "/health") == (200, {"status": "ok", "api_key_required": False})
        assert not server.app.lock.locked() and one(0) == 200
        held.close()
    finally:
        server.shutdown()
        server.server_close()
