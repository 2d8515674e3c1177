"""``actsparse serve``: openvino-genai pipelines of an export as Ray Serve replicas behind an OpenAI-style
completions endpoint (``POST /v1/completions``, ``GET /v1/models``).

Ray is an optional extra (``pip install "actsparse[serve]"``), so it is imported only where it is used.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from . import genai_pipeline
from ._common import ActSparseError
from .backends import genai_export

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
FIELDS = {"prompt", "max_tokens", "stream", "temperature", "model", "n", "user"}


class RequestError(ValueError):
    """A request the server refuses with HTTP 400."""


def parse_request(raw: bytes, model: str, max_tokens_limit: int) -> dict:
    """The completion request in ``raw`` (JSON) as ``{"prompt", "max_tokens", "stream"}``; RequestError says why not."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(f"unsupported fields {unknown}; this server takes {sorted(FIELDS)}")
    prompt, max_tokens = body.get("prompt"), body.get("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_limit))
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"'max_tokens' must be an integer from 1 to {max_tokens_limit}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    temperature = body.get("temperature", 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != 0:
        raise RequestError("only greedy decoding is served: 'temperature' must be 0")
    if body.get("n", 1) != 1:
        raise RequestError("'n' must be 1")
    if body.get("model", model) != model:
        raise RequestError(f"model {body['model']!r} is not served here; this server serves {model!r}")
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream}


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind}}


class Completions:
    """One replica: an ``actsparse.genai_pipeline`` that runs one generation at a time (an LLMPipeline is not
    re-entrant); concurrency comes from replicas."""

    def __init__(self, output: str, model: str, device: str, max_tokens_limit: int, config: dict):
        self.pipe = genai_pipeline(output, device, **config)
        # genai's GenerationConfig, reached through the pipeline so that this module imports no runtime
        self.config_type = type(self.pipe.get_generation_config())
        self.model, self.max_tokens_limit = model, max_tokens_limit
        self.lock = threading.Lock()  # max_ongoing_requests=1 already serialises; this holds if that changes

    def generate(self, prompt: str, max_tokens: int, on_text=None) -> tuple[str, str, dict]:
        """Greedy completion of ``prompt``: (text, finish_reason, usage); ``on_text`` gets the text as it grows
        and stops the generation by returning True."""
        config = self.config_type(max_new_tokens=max_tokens, apply_chat_template=False)
        with self.lock:
            # a list prompt makes genai return DecodedResults, which carry the token counts
            result = self.pipe.generate([prompt], config, on_text) if on_text else self.pipe.generate([prompt], config)
        metrics = result.perf_metrics
        usage = {"prompt_tokens": metrics.get_num_input_tokens(), "completion_tokens": metrics.get_num_generated_tokens()}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return result.texts[0], "length" if usage["completion_tokens"] >= max_tokens else "stop", usage

    def completion(self, cid: str, text: str, finish_reason: str | None, usage: dict | None = None) -> dict:
        body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
        if usage is not None:
            body["usage"] = usage
        return body

    async def __call__(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        path, method = request.url.path.rstrip("/"), request.method
        if path not in ("/v1/completions", "/v1/models"):
            return JSONResponse(error_body(f"no route {path}", "not_found_error"), status_code=404)
        if (path, method) not in (("/v1/completions", "POST"), ("/v1/models", "GET")):
            return JSONResponse(error_body(f"{method} is not allowed on {path}"), status_code=405)
        if path == "/v1/models":
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                             "owned_by": "actsparse"}]})
        try:
            req = parse_request(await request.body(), self.model, self.max_tokens_limit)
        except RequestError as err:
            return JSONResponse(error_body(str(err)), status_code=400)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if req["stream"]:
            return StreamingResponse(self.events(cid, req["prompt"], req["max_tokens"]), media_type="text/event-stream")
        try:
            text, reason, usage = await asyncio.to_thread(self.generate, req["prompt"], req["max_tokens"])
        except Exception as err:  # a failed generation is this request's error, not the replica's
            return JSONResponse(error_body(f"{type(err).__name__}: {err}", "server_error"), status_code=500)
        return JSONResponse(self.completion(cid, text, reason, usage))

    async def events(self, cid: str, prompt: str, max_tokens: int):
        """Server-sent events: a chunk per piece of text genai's streamer gives, the finish reason, ``[DONE]``."""
        loop, pieces, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def on_text(text: str) -> bool:
            loop.call_soon_threadsafe(pieces.put_nowait, text)
            return gone.is_set()  # True stops genai once the client has gone

        def run():
            try:
                return self.generate(prompt, max_tokens, on_text)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        job = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while (text := await pieces.get()) is not None:
                yield f"data: {json.dumps(self.completion(cid, text, None))}\n\n"
            try:
                _, reason, usage = await job
            except Exception as err:  # the status line has gone out: the error becomes the last event
                yield f"data: {json.dumps(error_body(f'{type(err).__name__}: {err}', 'server_error'))}\n\n"
                return
            yield f"data: {json.dumps(self.completion(cid, '', reason, usage))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gone.set()


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ActSparseError(f"actsparse serve needs Ray Serve ({err}): pip install 'actsparse[serve]'") from None
    return ray, serve


def check_export(output: str | os.PathLike) -> Path:
    """``output`` as an absolute path, once it is known to be an OpenVINO export openvino-genai can read: this
    fails here, in one line, rather than in every replica."""
    folder = Path(output).resolve()
    genai_export(folder)
    return folder


def build_app(output: str | os.PathLike, replicas: int = 1, device: str = "CPU", max_tokens_limit: int = 1024,
              model: str | None = None, cpus_per_replica: float = 1, config: dict | None = None):
    """The Ray Serve application for an OpenVINO export (``serve.run(build_app(...))``): ``replicas`` replicas,
    each an ``actsparse.genai_pipeline(output, device, **config)``; ``model``: the name clients send (default:
    the folder's name). ``output`` must be readable at the same path on every node that runs a replica."""
    folder = check_export(output)
    _, serve = _import_ray()
    deployment = serve.deployment(Completions, name="actsparse", num_replicas=replicas,
                                  max_ongoing_requests=1,  # the router sends a replica one generation at a time
                                  ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind(str(folder), model or folder.name, device, max_tokens_limit, dict(config or {}))


def app_builder(args: dict):
    """``build_app`` for ``serve run actsparse.serve:app_builder output=OUT replicas=N ...``, whose values
    arrive as strings (``config`` as JSON)."""
    try:
        return build_app(args["output"], replicas=int(args.get("replicas", 1)), device=args.get("device", "CPU"),
                         max_tokens_limit=int(args.get("max_tokens_limit", 1024)), model=args.get("model"),
                         cpus_per_replica=float(args.get("cpus_per_replica", 1)),
                         config=json.loads(args.get("config", "{}")))
    except (KeyError, ValueError) as err:
        raise ActSparseError(f"serve run actsparse.serve:app_builder output=OUT [replicas=N ...]: {err!r}") from None


def init_ray(address: str | None = None, **kwargs):
    """Connect to the Ray cluster at ``address`` or, without one, start a local instance on loopback only
    (call it before anything imports ray)."""
    if address is None and "ray" not in sys.modules:
        # on Linux Ray gives its servers the machine's address unless it takes itself for a one-machine (macOS) install
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray, _ = _import_ray()
    if address is None and ray._private.ray_constants.ENABLE_RAY_CLUSTER:
        raise ActSparseError("ray was imported before actsparse.serve.init_ray, so it would not stay on loopback: "
                             "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray")
    try:
        return ray.init(address=address, include_dashboard=False, **kwargs)
    except ConnectionError as err:
        raise ActSparseError(f"cannot join the Ray cluster at {address}: {err}") from None


def run(output: str | os.PathLike, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
        address: str | None = None, **app_options) -> None:
    """Serve ``output`` over HTTP on ``host:port`` until Ctrl-C (or SIGTERM), then shut Serve and Ray down;
    ``address``: a Ray cluster to join (``"auto"``), else a local Ray instance on loopback."""
    folder = check_export(output)  # before Ray starts
    init_ray(address)
    ray, serve = _import_ray()
    for sig in (signal.SIGINT, signal.SIGTERM):  # also where a shell started us with SIGINT ignored
        signal.signal(sig, signal.default_int_handler)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(folder, replicas, **app_options), name="actsparse", route_prefix="/")
        except RuntimeError as err:
            raise ActSparseError(f"the replicas did not start: {str(err).strip().splitlines()[-1]}") from None
        print(f"actsparse serve: {replicas} replica(s) of {folder} on http://{host}:{port}/v1 (Ctrl-C stops)",
              file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("actsparse serve: stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
