"""actsparse serve: Ray Serve replicas of openvino-genai on a fused tiny Llama, over HTTP on loopback."""
import importlib.util
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import actsparse
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.runtime import extension_problem
from actsparse.serve import RequestError, init_ray, parse_request
from conftest import plan_of, skip_without_extension

PROMPTS = ["The city", "North river and", "In the early years of the", "A small school", "The king was"]
MAX_TOKENS = 8
TIMEOUT = 60  # seconds, for every HTTP call


def test_parse_request_refuses_what_it_cannot_serve():
    ok = parse_request(b'{"prompt": "hi", "max_tokens": 3, "temperature": 0.0, "model": "m"}', "m", 8)
    assert ok == {"prompt": "hi", "max_tokens": 3, "stream": False}
    for raw, message in [(b"{", "not JSON"), (b"[]", "JSON object"), (b'{"max_tokens": 3}', "'prompt'"),
                         (b'{"prompt": ["a"]}', "'prompt'"), (b'{"prompt": "a", "max_tokens": 0}', "'max_tokens'"),
                         (b'{"prompt": "a", "max_tokens": 9}', "from 1 to 8"),
                         (b'{"prompt": "a", "max_tokens": true}', "'max_tokens'"),
                         (b'{"prompt": "a", "temperature": 0.7}', "greedy"), (b'{"prompt": "a", "stream": 1}', "'stream'"),
                         (b'{"prompt": "a", "model": "x"}', "not served"), (b'{"prompt": "a", "stop": "."}', "unsupported")]:
        with pytest.raises(RequestError, match=message):
            parse_request(raw, "m", 8)


@pytest.fixture(scope="module")
def sparse_export(tiny_llama, texts, tmp_path_factory):
    skip_without_extension(extension_problem())
    out = actsparse.export(str(tiny_llama), tmp_path_factory.mktemp("serve") / "sparse",
                           sparsity={"up": 0.3, "down": 0.5}, calibration=str(texts["calibration"]),
                           calibration_samples=16, calibration_seq_len=64)
    assert plan_of(out)["passes"]["fused"]
    return out


@pytest.fixture(scope="module")
def expected(sparse_export):
    """What a single pipeline gives for each prompt, as the brief of the endpoint says."""
    import openvino_genai

    pipe = actsparse.genai_pipeline(sparse_export, **EXACT_CONFIG)
    config = openvino_genai.GenerationConfig(max_new_tokens=MAX_TOKENS, apply_chat_template=False)
    return {prompt: pipe.generate(prompt, config) for prompt in PROMPTS}


def _processes_of(session_dir: str) -> list[str]:
    """Commands of the live processes started for this Ray session (raylet, gcs_server, workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if session_dir in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.fixture(scope="module")
def server(sparse_export, expected):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'actsparse[serve]')")
    init_ray(num_cpus=2, configure_logging=False)
    import ray
    from ray import serve

    from actsparse.serve import build_app

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    try:
        assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(sparse_export, replicas=2, max_tokens_limit=32, config=EXACT_CONFIG),
                  name="actsparse", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 30
        while _processes_of(session_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not _processes_of(session_dir), _processes_of(session_dir)


def _post(url: str, body, stream: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            raw = response.read().decode()
            return response.status, raw if stream else json.loads(raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def test_concurrent_requests_get_what_one_pipeline_gives(server, expected, sparse_export):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: _post(server, {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}),
                                PROMPTS))
    for prompt, (status, body) in zip(PROMPTS, answers):
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == Path(sparse_export).name
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["text"] == expected[prompt], prompt
        assert choice["finish_reason"] in ("length", "stop")
        assert 0 < body["usage"]["completion_tokens"] <= MAX_TOKENS and body["usage"]["prompt_tokens"] > 0
    with urllib.request.urlopen(server + "/v1/models", timeout=TIMEOUT) as response:
        assert json.loads(response.read())["data"][0]["id"] == Path(sparse_export).name


def test_streaming_gives_the_same_text_in_chunks(server, expected):
    prompt = PROMPTS[2]
    status, raw = _post(server, {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}, stream=True)
    assert status == 200
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert all(e.startswith("{") for e in events[:-1]) and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert len(chunks) > 2 and "".join(c["text"] for c in chunks) == expected[prompt]
    assert chunks[-1]["finish_reason"] in ("length", "stop") and chunks[0]["finish_reason"] is None


def test_a_malformed_request_gets_a_json_400_and_the_server_keeps_serving(server, expected):
    for body in (b"{not json", {"max_tokens": 3}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "max_tokens": 99}):
        status, answer = _post(server, body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    status, body = _post(server, {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS})
    assert status == 200 and body["choices"][0]["text"] == expected[PROMPTS[0]]
