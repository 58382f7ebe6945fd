"""`vlmfit serve` checked with the real client: a short SFT run on digits is served by `transformers serve` on
127.0.0.1, 50 test digits go to it as base64 image_url parts through the official openai package, and every answer
equals the one `vlmfit predict` gives on the same images (greedy); malformed requests get the server's error and it
keeps serving; a request with two images answers as vlmfit's own generation does; an adapter run is served merged.
The server stops with the test."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from rich.console import Console

QUIET = Console(quiet=True)
TEST_DIGITS = 50


@pytest.fixture(scope="module")
def fifty(tmp_path_factory):
    """Real digits as a prepared dataset: 1,000 to train on, 50 to ask about."""
    import datasets

    from vlmfit.data.builtin import load_builtin

    out = tmp_path_factory.mktemp("fifty")
    mnist = load_builtin("mnist")
    datasets.DatasetDict({"train": mnist["train"].select(range(1000)),
                          "test": mnist["test"].select(range(TEST_DIGITS))}).save_to_disk(str(out))
    (out / "prepare_report.json").write_text("{}")
    return out


def _train(tmp_path, data, name, method, steps):
    from vlmfit.config import load_config
    from vlmfit.train.sft import train_sft

    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "method": method, "data": {"source": str(data)},
                            "train": {"max_steps": steps, "batch_size": 32, "lr": 3e-3, "logging_steps": 50, "warmup_ratio": 0.05},
                            "eval": {"before": False, "after": False}, "output": {"dir": str(tmp_path), "name": name}})
    return train_sft(cfg, QUIET)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vlmfit serve TARGET` as a user starts it, in a subprocess, until the test ends."""

    def __init__(self, target, tmp_path, backend: str = "transformers"):
        self.port = _free_port()
        self.log = open(tmp_path / f"serve-{self.port}.log", "w")
        extra = ["--device", "cpu", "--dtype", "float32"] if backend == "transformers" else ["--backend", backend]
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmfit", "serve", str(target), "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait = 180 if backend == "transformers" else 600  # vLLM profiles memory and compiles before it listens
        deadline = time.time() + wait
        while time.time() < deadline:
            assert self.proc.poll() is None, self.text()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the server did not come up in {wait} s: " + self.text())

    def text(self) -> str:
        self.log.flush()
        return open(self.log.name).read()[-3000:]

    def model_name(self) -> str:
        line = next(line for line in self.text().splitlines() if "model:" in line and "base URL" in line)
        return line.split("model:")[1].strip()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes the pixels predict reads
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client, model, image, question="What digit is this?", max_tokens=8):
    content = ([{"type": "image_url", "image_url": {"url": image}}] if image is not None else []) + [{"type": "text", "text": question}]
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], temperature=0,
                                         max_tokens=max_tokens)
    return out.choices[0].message.content.strip()


def test_served_run_answers_like_vlmfit_predict_through_the_openai_client(tmp_path, fifty):
    import datasets
    import openai

    from vlmfit.evaluate.predict import predict

    run = _train(tmp_path, fifty, "full", "full", 300)
    expected = predict(str(run), [], str(fifty), None, None, 8, 8, "test", TEST_DIGITS, QUIET)
    assert len({r["answer"] for r in expected}) > 1  # the model says different things: agreement is not trivial
    test = datasets.load_from_disk(str(fifty))["test"]
    server = Server(run, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = server.model_name()
        assert model in [m.id for m in client.models.list().data]  # the name vlmfit serve prints is the served one
        t0 = time.perf_counter()
        answers = [_ask(client, model, _data_url(test[i]["images"][0])) for i in range(TEST_DIGITS)]
        seconds = time.perf_counter() - t0
        agree = sum(a == e["answer"] for a, e in zip(answers, expected))
        print(json.dumps({"agreement": f"{agree}/{TEST_DIGITS}", "seconds": round(seconds, 1)}))
        assert agree == TEST_DIGITS, [(a, e["answer"]) for a, e in zip(answers, expected) if a != e["answer"]]
        # malformed requests: the server's own error response, and it keeps serving
        with pytest.raises(openai.APIError):
            _ask(client, model, "data:image/png;base64,bm90IGFuIGltYWdl")  # "not an image"
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
        assert _ask(client, model, _data_url(test[0]["images"][0])) == expected[0]["answer"]
        # two images in one message (Qwen2-VL takes several): the same answers vlmfit's own generation gives
        pairs = [(test[i]["images"][0], test[i + 1]["images"][0]) for i in range(0, 8, 2)]
        served = [client.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(a)}}, {"type": "image_url", "image_url": {"url": _data_url(b)}},
            {"type": "text", "text": "Which digits are these?"}]}]).choices[0].message.content.strip() for a, b in pairs]
        assert served == _own_answers(run, pairs, "Which digits are these?")
    finally:
        server.stop()
    assert server.proc.returncode is not None


def _own_answers(run, image_groups, question: str) -> list[str]:
    """vlmfit's greedy generation (predict's path) on examples with several images each."""
    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.chat.schema import chat_example
    from vlmfit.evaluate.classification import generate_answers
    from vlmfit.evaluate.predict import load_target

    model, processor, family = load_target(str(run))
    model.eval()
    examples = [chat_example(question, "", list(group)) for group in image_groups]
    return [a.strip() for a in generate_answers(model, VisionChatCollator(processor, family), examples, 1, 8)]


def test_an_adapter_run_is_served_merged_and_answers_like_predict(tmp_path, fifty):
    import datasets
    import openai

    from vlmfit.evaluate.predict import predict

    run = _train(tmp_path, fifty, "lora", "lora", 20)  # what it answers matters less than that the merge serves it
    expected = predict(str(run), [], str(fifty), None, None, 8, 8, "test", 8, QUIET)
    test = datasets.load_from_disk(str(fifty))["test"]
    server = Server(run, tmp_path)
    try:
        assert "merged into tiny:qwen2_vl" in server.text() and (run / "served" / "config.json").is_file()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answers = [_ask(client, server.model_name(), _data_url(test[i]["images"][0])) for i in range(8)]
        assert answers == [e["answer"] for e in expected]
    finally:
        server.stop()


def test_serve_refusals_are_one_message(vlmfit, tmp_path):
    code, out, err = vlmfit("serve", tmp_path, "--dry-run")
    assert code == 2 and "neither a run directory nor a model directory" in " ".join((out + err).split())
    code, out, err = vlmfit("serve", "tiny:qwen2_vl", "--backend", "sglang", "--dry-run")
    assert code == 2 and "unknown backend 'sglang'" in out + err
    code, out, err = vlmfit("serve", "tiny:qwen2_vl", "--dry-run", "--port", "8123")
    assert code == 0 and "base URL: http://127.0.0.1:8123/v1" in out and "transformers serve" in out.replace("/transformers serve", " transformers serve")


def test_the_served_merge_is_reused_only_while_its_inputs_are_the_same(tmp_path, fifty):
    import os

    from vlmfit.rundir import RunDir
    from vlmfit.serve import merged_for_serving

    run = RunDir.open(_train(tmp_path, fifty, "lora", "lora", 4))
    out = merged_for_serving(run)
    made = (out / "config.json").stat().st_mtime_ns
    assert merged_for_serving(run) == out and (out / "config.json").stat().st_mtime_ns == made  # reused
    weights = run.weights_path("adapter") / "adapter_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the adapter rewritten
    merged_for_serving(run)
    assert (out / "config.json").stat().st_mtime_ns != made  # merged again
