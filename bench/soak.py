"""Soak: `valora serve` under mixed load with faults injected, checked for lost work and leaks.

  python bench/soak.py --minutes 20 --out bench/results/soak_cpu

Starts `valora serve` (the embedded default model and adapter, or --model / --adapter) on a
loopback port and for --minutes runs --clients client threads, each drawing one action at a time:
  chat        a chat completion: streamed or not, the base model or a loaded adapter, an image or not
  cancel      a streamed chat whose client closes the stream after the first chunk
  disconnect  a whole-answer chat whose client gives up after 50 ms
  bad         a malformed request (must be answered 4xx)
beside one adapter thread that loads copies of the adapter under fresh names, unloads them
(retrying while requests use them: 409) and tries a copy whose scale is NaN (must be 400).
At the end, the server idle, it checks: no 5xx; no accepted chat lost (a response or stream that
never completed) or duplicated (an id seen twice); the requests /metrics counts as finished are
the chats answered or cancelled, plus at most the disconnected ones; no KV pages held, no
adapter slot used beyond the adapters loaded, nothing queued or running, no traceback in the
server's log. Writes OUT.json and OUT.md; exits 1 when a check fails.
"""

import argparse
import base64
import collections
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = {"chat": 0.55, "cancel": 0.15, "disconnect": 0.15, "bad": 0.15}
BAD_BODIES = [b"{", json.dumps({"messages": "hi"}).encode(), json.dumps({"model": "base", "messages": [],
                                                                          "tools": []}).encode(),
              json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}).encode()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _metric(text: str, name: str) -> float:
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(name))


class Soak:
    """The load, the faults and the tally (every counter under one lock)."""

    def __init__(self, url: str, base: str, adapter_root: Path, adapter: str, seed: int):
        self.url, self.base, self.root, self.adapter = url, base, adapter_root, adapter
        self.models = [base, adapter]            # what clients may ask for now
        self.tally, self.ids, self.errors = collections.Counter(), collections.Counter(), []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.images = [_png(seed + i) for i in range(4)]

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.tally[key] += n

    def note(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def _body(self, rng: random.Random, stream: bool) -> dict:
        content = [{"type": "text", "text": f"describe {rng.randrange(10 ** 6)}"}]
        if rng.random() < 0.3:
            content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(self.images)}})
        with self.lock:
            model = rng.choice(self.models)
        return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream,
                "max_tokens": rng.randint(1, 12), "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(100)}

    def _answered(self, kind: str, status: int, rid: str | None = None) -> None:
        if status >= 500:
            self.count("5xx")
            self.note(f"{kind}: {status}")
        elif status == 200:
            self.count(f"{kind} answered")
            if rid is not None:
                with self.lock:
                    self.ids[rid] += 1
        else:
            self.count(f"{kind} {status}")

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                action = rng.choices(list(ACTIONS), list(ACTIONS.values()))[0]
                try:
                    getattr(self, f"_{action}")(http, rng)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    self.count("lost")
                    self.note(f"{action}: {type(e).__name__}: {e}")

    def _chat(self, http: httpx.Client, rng: random.Random) -> None:
        stream = rng.random() < 0.5
        body = self._body(rng, stream)
        if not stream:
            r = http.post("/v1/chat/completions", json=body)
            self._answered("chat", r.status_code, r.json().get("id") if r.status_code == 200 else None)
            return
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return self._answered("chat", r.status_code)
            rid, done = None, False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    rid = rid or json.loads(line[6:]).get("id")
            if done:
                self._answered("chat", 200, rid)
            else:
                self.count("lost")
                self.note(f"stream {rid} ended without [DONE]")

    def _cancel(self, http: httpx.Client, rng: random.Random) -> None:
        with http.stream("POST", "/v1/chat/completions", json={**self._body(rng, True), "max_tokens": 64}) as r:
            if r.status_code == 200:
                next(r.iter_lines(), None)             # the first chunk, then the client leaves
                self.count("cancel accepted")
            else:
                r.read()
                self._answered("cancel", r.status_code)

    def _disconnect(self, http: httpx.Client, rng: random.Random) -> None:
        try:
            r = http.post("/v1/chat/completions", json={**self._body(rng, False), "max_tokens": 64}, timeout=0.05)
            self._answered("disconnect", r.status_code, r.json().get("id") if r.status_code == 200 else None)
        except httpx.TimeoutException:
            self.count("disconnect gave up")

    def _bad(self, http: httpx.Client, rng: random.Random) -> None:
        r = http.post("/v1/chat/completions", content=rng.choice(BAD_BODIES),
                      headers={"content-type": "application/json"})
        if not 400 <= r.status_code < 500:
            self.note(f"bad request answered {r.status_code}")
        self._answered("bad", r.status_code)

    def adapters(self, seed: int) -> None:
        """Load a copy under a fresh name, let clients use it, unload it; now and then a NaN copy."""
        rng, n = random.Random(seed), 0
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.wait(rng.uniform(0.5, 2.0)):
                n += 1
                name = f"soak{n}"
                poisoned = n % 4 == 0
                meta = json.loads((self.root / self.adapter / "adapter.json").read_text())
                if poisoned:
                    first = next(iter(meta["modules"]))
                    meta["modules"][first]["scale"] = float("nan")
                shutil.copytree(self.root / self.adapter, self.root / name)
                (self.root / name / "adapter.json").write_text(json.dumps(meta))
                r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
                if poisoned:
                    self.count("poisoned adapter refused" if r.status_code == 400 else "poisoned adapter accepted")
                    if r.status_code != 400:
                        self.note(f"a NaN-scaled adapter was answered {r.status_code}")
                    continue
                self._answered("adapter load", r.status_code)
                if r.status_code != 200:
                    continue
                with self.lock:
                    self.models.append(name)
                self.stop.wait(rng.uniform(1.0, 4.0))
                with self.lock:
                    self.models.remove(name)
                self.unload(http, name)

    def unload(self, http: httpx.Client, name: str) -> None:
        deadline = time.monotonic() + 120
        while (r := http.post("/v1/unload_lora_adapter", json={"lora_name": name})).status_code == 409:
            if time.monotonic() > deadline:
                self.note(f"adapter {name} stayed in use")
                return
            time.sleep(0.2)
        self._answered("adapter unload", r.status_code)


def _serve(args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--port", str(port), *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"valora serve exited: see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"valora serve did not come up: see {log_path}")
        time.sleep(0.5)


def run(minutes: float, clients: int, model: str | None, adapter_dir: Path, seed: int, work: Path) -> dict:
    root = work / "adapters"
    shutil.copytree(adapter_dir, root / adapter_dir.name)
    args = ["--adapter-root", str(root), "--adapter", f"{adapter_dir.name}={root / adapter_dir.name}"]
    proc, url = _serve(args + (["--model", model] if model else []), work / "serve.log")
    started = time.monotonic()
    try:
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        before = httpx.get(f"{url}/metrics").text
        soak = Soak(url, base, root, adapter_dir.name, seed)
        threads = [threading.Thread(target=soak.client, args=(seed + i,)) for i in range(clients)]
        threads.append(threading.Thread(target=soak.adapters, args=(seed - 1,)))
        for t in threads:
            t.start()
        time.sleep(60 * minutes)
        soak.stop.set()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 300               # what clients left behind finishes or is cancelled
        while True:
            metrics = httpx.get(f"{url}/metrics").text
            if _metric(metrics, "valora_running_requests") + _metric(metrics, "valora_queue_depth") == 0:
                break
            if time.monotonic() > deadline:
                soak.note("requests still live 300 s after the load stopped")
                break
            time.sleep(0.5)
        time.sleep(1.0)                                 # the engine thread's last metrics update
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health").json()
        loaded = len(httpx.get(f"{url}/v1/models").json()["data"]) - 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    log = (work / "serve.log").read_text(errors="replace").splitlines()
    tracebacks = [i for i, line in enumerate(log) if line.startswith("Traceback")]
    for i in tracebacks[:5]:              # each one's last line: the exception
        soak.note("server log: " + next((line for line in log[i + 1:] if line and not line.startswith(" ")), "?"))
    t = soak.tally
    finished = _metric(metrics, "valora_requests_finished_total") - _metric(before, "valora_requests_finished_total")
    settled = t["chat answered"] + t["cancel accepted"] + t["disconnect answered"]
    duplicated = sum(n - 1 for n in soak.ids.values() if n > 1)
    checks = {
        "no 5xx": t["5xx"] == 0,
        "none lost": t["lost"] == 0,
        "none duplicated": duplicated == 0,
        "finished requests counted": settled <= finished <= settled + t["disconnect gave up"],
        "no KV pages held": _metric(metrics, "valora_kv_pages_used") == 0,
        "adapter slots within the adapters loaded": _metric(metrics, "valora_adapter_slots_used") <= loaded,
        "NaN-scaled adapters refused": t["poisoned adapter accepted"] == 0,
        "healthy after": health.get("status") == "ok",
        "server exited cleanly": proc.returncode in (0, -signal.SIGTERM),
        "no tracebacks in the server log": not tracebacks,
    }
    return {"minutes": minutes, "clients": clients, "seed": seed, "wall_s": time.monotonic() - started,
            "tally": dict(sorted(t.items())), "finished_in_metrics": finished, "duplicated": duplicated,
            "checks": checks, "errors": soak.errors[:50], "health": health}


def report(result: dict) -> str:
    lines = [f"# Soak: `valora serve` under mixed load with faults, {result['device']}, {result['versions']}", "",
             f"`{result['command']}` · {result['minutes']} minutes · {result['clients']} clients · "
             f"wall {result['wall_s']:.0f} s", "", "| check | holds |", "| --- | --- |"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in result["checks"].items()]
    lines += ["", "| what | count |", "| --- | --- |"]
    lines += [f"| {name} | {n} |" for name, n in result["tally"].items()]
    lines += [f"| finished requests in /metrics | {result['finished_in_metrics']:.0f} |"]
    if result["errors"]:
        lines += ["", "Errors (first 50):", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", help="model directory (default: the embedded one)")
    ap.add_argument("--adapter", default=str(ROOT / "checkpoints" / "adapters" / "adapter0"),
                    help="adapter directory whose copies are loaded and unloaded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/soak")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="valora-soak-") as work:
        result = run(args.minutes, args.clients, args.model, Path(args.adapter), args.seed, Path(work))
    import jax

    from valora_jax.versions import stack_versions, versions_line
    result = {"command": "python " + " ".join(["bench/soak.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": jax.devices()[0].device_kind, **stack_versions(), **result}
    result["versions"] = versions_line(result)
    save_result(args.out, result, report(result))
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
