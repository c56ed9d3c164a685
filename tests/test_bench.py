"""The benchmark harness (bench/): report format, speed-up semantics, the bounded loopback load generator, the
stage clock, and one real tiny ``bench/run.py --quick --only data_loading`` run. The benchmarks themselves are run
by hand (``python bench/run.py --quick``), not here."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import privacy_seeds  # noqa: E402
import run as bench_run  # noqa: E402
from footage import StageClock  # noqa: E402
from harness import Figure, markdown_table, report  # noqa: E402
from serving import Load, generate_load  # noqa: E402


def test_speed_up_is_above_one_when_better_for_throughput_and_latency():
    faster = Figure("b", "new", 300.0, "images/s", baseline="old", baseline_value=100.0)
    lower_latency = Figure("b", "new p50", 20.0, "ms", higher_is_better=False, baseline="old", baseline_value=50.0)
    alone = Figure("b", "no baseline", 5.0, "%")
    assert faster.ratio == pytest.approx(3.0)
    assert lower_latency.ratio == pytest.approx(2.5)
    assert alone.ratio is None
    table = markdown_table([faster, lower_latency, alone]).splitlines()
    assert len(table) == 5 and all(line.count("|") == 8 for line in table)
    assert "| b | new | 300 images/s | old | 100 images/s | 3.00x |" in table[2]


def test_report_writes_dated_and_latest_files(tmp_path):
    info = {"host": "h", "cpu": "CPU X", "cores": 2, "gpu": None, "torch": "t", "ray": "r", "dali": "d"}
    fig = Figure("b", "m", 2.0, "req/s", baseline="base", baseline_value=1.0)
    doc = report([fig], info, {"quick": True}, {"b": 1.0}, {"other": "RuntimeError: x"}, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "latest.json" in files and "latest.md" in files and any(f.endswith("-h.json") for f in files)
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["figures"][0]["ratio"] == 2.0 and saved == json.loads(json.dumps(doc, default=float))
    md = (tmp_path / "latest.md").read_text()
    assert "CPU X, 2 cores" in md and "| b | m | 2 req/s | base | 1 req/s | 2.00x |" in md and "- other: RuntimeError: x" in md


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "nope"])
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


def test_stage_clock_counts_the_producer_not_the_consumer():
    clock = StageClock()

    def produce():
        for i in range(3):
            time.sleep(0.05)
            yield i

    for _ in clock.wrap_iterator("decode", produce)():
        time.sleep(0.1)
    assert clock.wrap("model", lambda x: x + 1)(1) == 2
    assert 0.14 < clock.seconds["decode"] < 0.3
    assert clock.seconds["model"] < 0.05
    with clock.stage("leak audit"):  # a stage inside another counts toward the outer one only
        clock.wrap("model", time.sleep)(0.05)
    assert clock.seconds["model"] < 0.05 and clock.seconds["leak audit"] >= 0.05


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.005)
        self.send_response(200)
        self.send_header("X-Batch-Size", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_load_generator_is_bounded_by_count_and_refuses_other_hosts():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/anonymize"
        result = generate_load(url, b"png", {"Content-Type": "image/png"}, Load(concurrency=4, seconds=30.0, max_requests=40))
    finally:
        server.shutdown()
    assert result["requests"] == 40 and not result["errors"] and result["seconds"] < 10
    assert 5 <= result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["mean_batch"] == 1.0
    with pytest.raises(ValueError, match="only targets 127.0.0.1"):
        generate_load("http://10.1.2.3:8000/v1/anonymize", b"", {}, Load(1, 1.0, 1))


def test_quick_data_loading_run_writes_the_table(small_data, tmp_path):
    out = tmp_path / "results"
    doc = bench_run.main(["--quick", "--only", "data_loading", "--data", small_data, "--seconds", "0.3", "--rounds", "1",
                          "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert doc["errors"] == {}
    torch_fig, dali_fig = doc["figures"]
    assert torch_fig["name"].startswith("PyTorch DataLoader") and torch_fig["value"] > 0
    assert dali_fig["name"].startswith("DALI CPU pipeline") and dali_fig["baseline"] == torch_fig["name"]
    assert dali_fig["ratio"] == pytest.approx(dali_fig["value"] / torch_fig["value"])
    assert {r["workers"] for r in torch_fig["details"]["runs"]} >= {0, 1}
    assert f"| data_loading | {dali_fig['name']} |" in (out / "latest.md").read_text()


def test_privacy_seed_table_gives_the_worst_seed_against_each_bar():
    """Worst = the highest figure under a <= bar and the lowest under a >= bar, over the seeds only (not --model)."""

    def report(leak: float, expression: float, passed: bool) -> dict:
        attacks = [{"name": "latent-mlp", "figure": leak, "bar": 0.217, "op": "<=", "pass": leak <= 0.217},
                   {"name": "expression-attack-1", "figure": expression, "bar": 0.9, "op": ">=", "pass": expression >= 0.9}]
        rows = [{"scenario": "attack-1", "attacker": "paper-cnn", "identity_accuracy": 0.01, "expression_accuracy": expression},
                {"scenario": "attack-3", "attacker": "mlp-deep", "identity_accuracy": leak, "expression_accuracy": None}]
        return {"attacks": attacks, "rows": rows, "audit": {"passed": passed}}

    reports = {"seed 0": report(0.20, 0.95, True), "seed 1": report(0.90, 0.85, False), "main-job": report(0.99, 0.10, False)}
    lines = {line.split(" | ")[0].strip("| "): line for line in privacy_seeds.table(reports, ["seed 0", "seed 1"]).splitlines()}
    assert lines["latent-mlp"].endswith("| 20.0 % | 90.0 % FAIL | 99.0 % FAIL | 90.0 % | 55.0 % | <= 21.7 % |")
    assert lines["expression-attack-1"].endswith("| 95.0 % | 85.0 % FAIL | 10.0 % FAIL | 85.0 % | 90.0 % | >= 90.0 % |")
    assert lines["**audit**"].startswith("| **audit** | PASSED | FAILED | FAILED |")
    assert "attack-1 paper-cnn expression" in lines and "attack-3 mlp-deep identity" in lines
    assert "attack-3 mlp-deep expression" not in lines
