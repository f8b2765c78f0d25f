"""``imago soak``: timed mixed load with throughput, errors and memory."""

from __future__ import annotations

import json

from imago.client.cli import main
from imago.client.soak import memory_of

SCRAPE = """\
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.097152e+08
# HELP imago_worker_resident_memory_bytes Resident memory of each worker process.
# TYPE imago_worker_resident_memory_bytes gauge
imago_worker_resident_memory_bytes{worker="worker-0"} 1.048576e+09
imago_worker_resident_memory_bytes{worker="worker-1"} 5.24288e+08
"""


def test_memory_is_read_per_process_from_a_scrape():
    assert memory_of(SCRAPE) == {
        "frontend": 209715200.0,
        "worker-0": 1048576000.0,
        "worker-1": 524288000.0,
    }


def test_a_short_soak_reports_throughput_errors_and_memory_of_every_process(model_cache, capsys):
    code = main(
        [
            "soak", "--cache-dir", str(model_cache), "--duration", "4", "--concurrency", "4",
            "--mix", "caption=2,vqa=1,generate=1", "--steps", "2", "--size", "64",
            "--sample-every", "1", "--json",
        ]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    overall = report["served"]["overall"]
    assert overall["completed"] > 0 and overall["errors"] == {}
    assert overall["throughput_rps"] > 0
    assert set(report["served"]["kinds"]) == {"caption", "vqa", "generate"}
    memory = report["memory_mib"]
    assert set(memory) == {"frontend", "worker-0"}
    for figures in memory.values():
        assert figures["start"] > 10 and figures["end"] > 10
        assert figures["peak"] >= max(figures["start"], figures["end"])
    # Samples: after the warm-up, every second of the four, and at the end.
    assert report["memory_samples"] >= 4
    assert report["server_exit_code"] == 0
