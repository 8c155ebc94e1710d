"""Load benchmark: ai-edge-inference against the Python peer (peer.py), one mosquitto,
the same model file, threads and frames, in alternating rounds.

Each round starts each stack fresh, warms it up with a few frames, then drives it with N
cameras publishing raw JPEG snapshots (QoS 1), either as a window of frames in flight (each
from a different camera; the next one goes out as soon as an answer comes back) or at a
fixed total rate. Measured per run: throughput, latency from publish to result received
(p50/p90/p99), answers by kind (results, and error answers by reason), CPU time per frame
(the stack's process, user + system) and its peak RSS (VmHWM). Prints a table and JSON.

    python3 tests/load/harness.py --model yolov12n --ours target/release/ai-edge-inference \
        --ours-config models/yolov12n.yaml --window 4 --frames 200 --rounds 3
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["yolov12n", "efficientnet-lite0"], required=True)
p.add_argument("--ours", default=os.path.join(ROOT, "target/release/ai-edge-inference"))
p.add_argument("--ours-config", help="model config for ai-edge-inference (default models/<model>.yaml; "
               "`embedded`: none, the build's embedded default model)")
p.add_argument("--ours-env", action="append", default=[], help="KEY=VALUE for ai-edge-inference (repeatable)")
p.add_argument("--ours-label", default="ours", help="name of our stack in the table")
p.add_argument("--onnx", help="the ONNX file (default models/.cache/<model>.onnx)")
p.add_argument("--peer-threads", type=int, default=2, help="the peer's intra-op threads (the same as our config's)")
p.add_argument("--stacks", default="ours,python", help="which stacks to run, comma-separated (ours, python)")
p.add_argument("--image", action="append", help="JPEG frames to send, in turn (default tests/fixtures/rocket-1080p.jpg)")
p.add_argument("--cameras", type=int, default=16)
p.add_argument("--window", type=int, default=4, help="frames in flight (0: use --rate)")
p.add_argument("--rate", type=float, default=0, help="frames per second in all (with --window 0)")
p.add_argument("--frames", type=int, default=100, help="frames per run, after warm-up")
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--json", help="also write the runs as JSON to this file")
args = p.parse_args()
onnx = args.onnx or os.path.join(ROOT, "models/.cache", args.model + ".onnx")
ours_config = args.ours_config or os.path.join(ROOT, "models", args.model + ".yaml")
if ours_config == "embedded":
    ours_config = ""
frames = [open(f, "rb").read() for f in (args.image or [os.path.join(ROOT, "tests/fixtures/rocket-1080p.jpg")])]
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Load:
    """The cameras and the result subscriber, on one paho client."""

    def __init__(self, port):
        self.lock = threading.Condition()
        self.pending = {}  # camera -> [publish times]
        self.latencies = []
        self.kinds = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"load-{port}")
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.on_message = self.on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("edge-ai/bench/+/+/ai/#", qos=1)
        self.c.subscribe("edge-ai/services/+/ai/errors", qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def on_message(self, client, userdata, msg):
        now = time.perf_counter()
        v = json.loads(msg.payload)
        if v.get("message_type") == "inference_error":
            camera = v.get("source", {}).get("topic", "").split("/")[3:4]
            kind = "error:" + v.get("error", "?") + ":" + v.get("reason", "").split(":")[0]
        else:
            camera = msg.topic.split("/")[3:4]
            kind = "result"
        with self.lock:
            q = self.pending.get(camera[0] if camera else None)
            if not q:
                return
            self.latencies.append(now - q.pop(0))
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.lock.notify_all()

    def publish(self, camera, i):
        with self.lock:
            self.pending.setdefault(camera, []).append(time.perf_counter())
        self.c.publish(f"edge-ai/bench/site/{camera}/camera/snapshots", frames[i % len(frames)], qos=1)

    def answered(self):
        return len(self.latencies)

    def run(self, n, window, rate, cameras, timeout=600):
        """Sends n frames; returns (seconds from first publish to last answer)."""
        with self.lock:
            self.latencies, self.kinds = [], {}
        t0 = time.perf_counter()
        names = [f"cam-{k:03d}" for k in range(cameras)]
        if window:
            free = list(names)
            sent = 0
            with self.lock:
                while self.answered() < n:
                    busy = {c for c, q in self.pending.items() if q}
                    free = [c for c in names if c not in busy]
                    while sent < n and sent - self.answered() < window and free:
                        c = free.pop(0)
                        self.lock.release()
                        try:
                            self.publish(c, sent)
                        finally:
                            self.lock.acquire()
                        sent += 1
                    if not self.lock.wait(timeout):
                        raise SystemExit(f"no answer for {timeout} s ({self.answered()} of {n})")
        else:
            for k in range(n):
                due = t0 + k / rate
                time.sleep(max(0.0, due - time.perf_counter()))
                self.publish(names[k % cameras], k)
            with self.lock:
                while self.answered() < n:
                    if not self.lock.wait(timeout):
                        raise SystemExit(f"no answer for {timeout} s ({self.answered()} of {n})")
        return time.perf_counter() - t0


def start_stack(name, port):
    log = tempfile.TemporaryFile()
    if name == "python":
        cmd = [sys.executable, os.path.join(ROOT, "tests/load/peer.py"), "--model", args.model, "--onnx", onnx,
               "--port", str(port), "--threads", str(args.peer_threads),
               "--labels", os.path.join(ROOT, "models/imagenet-labels.txt")]
        env = dict(os.environ)
        ready = b"ready"
    else:
        cmd = [args.ours]
        env = dict(os.environ, MODEL_CONFIG_PATH=ours_config, AIO_BROKER_HOSTNAME="127.0.0.1",
                   AIO_BROKER_TCP_PORT=str(port), AIO_MQTT_CLEAN_START="true", HTTP_ADDR="", HTTP_ADMIN_ADDR="",
                   MODEL_WATCH_S="0", RUST_LOG="info", AIO_MQTT_CLIENT_ID=f"aei-bench-{port}")
        env.update(kv.split("=", 1) for kv in args.ours_env)
        ready = b"MQTT connected"
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    end = time.time() + 120
    while True:
        log.seek(0)
        if ready in log.read():
            return proc, log
        if proc.poll() is not None or time.time() > end:
            log.seek(0)
            raise SystemExit(f"{name} did not start:\n{log.read().decode(errors='replace')}")
        time.sleep(0.05)


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    port = free_port()
    work = tempfile.mkdtemp()
    conf = os.path.join(work, "mosquitto.conf")
    open(conf, "w").write(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 0\n")
    broker = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    load = Load(port)
    stacks = args.stacks.split(",")
    runs = []
    mode = f"window {args.window}" if args.window else f"{args.rate:g} frames/s"
    print(f"# {args.model}, {mode}, {args.cameras} cameras, {args.frames} frames per run, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, frames {[os.path.basename(f) for f in (args.image or ['rocket-1080p.jpg'])]}",
          flush=True)
    try:
        for r in range(args.rounds):
            order = stacks if r % 2 == 0 else stacks[::-1]
            for name in order:
                proc, log = start_stack(name, port)
                try:
                    load.run(args.warmup, 1, 0, args.cameras)
                    cpu0 = cpu_seconds(proc.pid)
                    secs = load.run(args.frames, args.window, args.rate, args.cameras)
                    cpu = cpu_seconds(proc.pid) - cpu0
                    lat = [x * 1000 for x in load.latencies]
                    run = {
                        "round": r + 1,
                        "stack": args.ours_label if name == "ours" else name,
                        "frames": args.frames,
                        "throughput_fps": args.frames / secs,
                        "p50_ms": quantile(lat, 0.5),
                        "p90_ms": quantile(lat, 0.9),
                        "p99_ms": quantile(lat, 0.99),
                        "answers": dict(load.kinds),
                        "cpu_ms_per_frame": cpu * 1000 / args.frames,
                        "peak_rss_mb": peak_rss_mb(proc.pid),
                    }
                    runs.append(run)
                    drops = {k: v for k, v in run["answers"].items() if k != "result"}
                    print(f"round {r + 1} {run['stack']:>8}: {run['throughput_fps']:6.2f} frames/s  "
                          f"p50 {run['p50_ms']:7.1f}  p90 {run['p90_ms']:7.1f}  p99 {run['p99_ms']:7.1f} ms  "
                          f"cpu {run['cpu_ms_per_frame']:6.1f} ms/frame  peak RSS {run['peak_rss_mb']:6.1f} MB  "
                          f"errors {drops or 0}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait()
    finally:
        load.c.loop_stop()
        broker.terminate()
    names = [args.ours_label if s == "ours" else s for s in stacks]
    print("\n| stack | throughput (frames/s) | p50 ms | p90 ms | p99 ms | CPU ms/frame | peak RSS MB | errors |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for s in names:
        rs = [x for x in runs if x["stack"] == s]
        m = {k: statistics.median(x[k] for x in rs) for k in
             ["throughput_fps", "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_frame", "peak_rss_mb"]}
        m["errors"] = sum(v for x in rs for k, v in x["answers"].items() if k != "result")
        med[s] = m
        print(f"| {s} (median of {len(rs)}) | {m['throughput_fps']:.2f} | {m['p50_ms']:.1f} | {m['p90_ms']:.1f} | "
              f"{m['p99_ms']:.1f} | {m['cpu_ms_per_frame']:.1f} | {m['peak_rss_mb']:.1f} | {m['errors']} |")
    if len(names) == 2:
        a, b = med[names[0]], med[names[1]]
        print(f"\n{names[0]} / {names[1]}: throughput {a['throughput_fps'] / b['throughput_fps']:.2f}x, "
              f"p50 latency {a['p50_ms'] / b['p50_ms']:.2f}x, CPU per frame {a['cpu_ms_per_frame'] / b['cpu_ms_per_frame']:.2f}x, "
              f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    out = {"model": args.model, "mode": mode, "cameras": args.cameras, "runs": runs, "medians": med}
    print(json.dumps(out))
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


main()
