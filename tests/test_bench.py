"""The benchmark's smoke mode runs end to end and reports every field (no speed is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main
from bench.host_path import CPU_PARTS


def test_smoke_run_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    main(["--smoke", "--ablate", "--json", str(out)])
    result = json.loads(out.read_text())
    for key in ("machine", "config", "flops_per_image", "matmul_gflops", "matmul_peak_gflops", "raw", "service",
                "seed_style", "unary", "ratios", "parity", "targets", "ablation"):  # fmt: skip
        assert key in result, key
    assert {"cpu", "amx", "avx512_bf16", "load_average_start", "load_average_end"} <= result["machine"].keys()
    for path in ("raw", "service", "seed_style"):
        assert result[path]["images_per_s"] > 0, path
        assert result[path]["share_of_peak"] > 0, path
    assert {"best_batch_size", "by_batch_size", "batch1_ms"} <= result["raw"].keys()
    assert result["service"]["images"] == 32 and result["service"]["peak_rss_mb"] > 0
    assert result["unary"]["p50_ms"] > 0 and result["unary"]["p99_ms"] >= result["unary"]["p50_ms"]
    assert {"service_over_raw", "service_over_seed"} <= result["ratios"].keys()
    assert result["parity"]["min_cosine"] >= 0.999
    assert all({"value", "target", "met"} <= t.keys() for t in result["targets"].values())
    assert result["ablation"][0]["name"] == "transformers as loaded, float32"
    assert all(s["min_cosine"] >= 0.999 for s in result["ablation"])


def test_flops_of_dinov2_small_is_about_12_gflop() -> None:
    from transformers import Dinov2Config

    from bench.flops import model_flops
    from server.random_model import SIZES

    config = Dinov2Config(image_size=518, patch_size=14, mlp_ratio=4, **SIZES["small"])
    assert abs(model_flops(config, 224) / 1e9 - 12.25) < 0.05
    giant = Dinov2Config(image_size=518, patch_size=14, mlp_ratio=4, **SIZES["giant"])
    assert 550 < model_flops(giant, 224) / 1e9 < 600


def test_host_path_smoke_prints_both_efficiencies(tmp_path: Path, capsys) -> None:
    out = tmp_path / "host.json"
    main(["--host-path", "--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    workers = result["config"]["decode_workers"]
    assert workers >= 1 and result["config"]["max_batch_size"] >= 1
    assert result["null_model_images_per_s"] > 0
    assert set(result["inputs"]) == {"512x512 grayscale JPEG", "64x64 grayscale PNG"}
    for name, r in result["inputs"].items():
        assert r["decode_per_thread"] > 0 and r["server"] > 0, name
        assert r["host_efficiency"] == r["server"] / (r["decode_per_thread"] * workers)
        assert f"{r['host_efficiency']:.2f}" in printed.split(name)[1].splitlines()[0]
        cpu = r["cpu_ms_per_image"]
        assert set(cpu) == set(CPU_PARTS), name
        # decoding runs in the worker processes (the default), the event loop and compute thread are named apart
        assert cpu["decode workers"] > 0 and cpu["decode workers"] > cpu["decode pool"], (name, cpu)
        assert cpu["event loop"] + cpu["compute"] > 0, (name, cpu)
        assert f"{sum(cpu.values()):.3f}" in printed.split(name)[2].splitlines()[0]
        assert r["mean_batch"] is not None and 1 <= r["mean_batch"] <= result["config"]["max_batch_size"], name
    assert {"load_average_start", "load_average_end", "cpu"} <= result["machine"].keys()


def test_overload_smoke_runs_every_part(tmp_path: Path, capsys) -> None:
    out = tmp_path / "overload.json"
    main(["--overload", "--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["bulk"]["exit"] == 0 and result["bulk"]["rows"] == 40
    burst = result["burst"]["outcomes"]
    assert set(burst) <= {"OK", "RESOURCE_EXHAUSTED"} and sum(burst.values()) == 20  # none accepted, then expired
    idle = result["idle_streams"]
    assert idle["open"] == 256 and idle["refused"] == {"RESOURCE_EXHAUSTED": 400 - 256}
    assert idle["other_embed"] == "OK" and idle["health"] == {"SERVING": 45}
    assert result["peak_rss_mb"] > 0 and result["rss_after_mb"] > 0
    assert "bulk client, default flags, 40 JPEGs: exit 0, 40 rows" in capsys.readouterr().out


def test_http_smoke_measures_http_beside_grpc_on_one_server(tmp_path: Path, capsys) -> None:
    out = tmp_path / "http.json"
    main(["--http", "--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"gRPC Embed", "HTTP JSON", "HTTP multipart"}
    for path, row in result["paths"].items():
        assert row["images_per_s"] > 0 and row["server_cpu_ms_per_image"] >= 0, path
    assert set(result["ratios_to_grpc"]) == {"HTTP JSON", "HTTP multipart"}
    assert result["identical_embeddings"] is True
    assert result["target"]["target"] == 0.9 and {"load_average_start", "load_average_end"} <= result["machine"].keys()
    assert "HTTP JSON >= 0.9 x gRPC Embed" in capsys.readouterr().out


def test_fast_fidelity_smoke_reports_each_size_and_factor(tmp_path: Path, model_dir: Path, capsys) -> None:
    from tests import images

    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(2):
        images.rgb(300, 200, seed=seed).save(photos / f"photo{seed}.png")
    out = tmp_path / "fidelity.json"
    main(["--fast-fidelity", "--photos-dir", str(photos), "--model", str(model_dir), "--rounds", "1",
          "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["photos"] == ["photo0", "photo1"] and result["server_factor"] == 2
    assert set(result["sizes"]) == {"512x512", "2 MP (1632x1224)", "12 MP (4000x3000)"}
    for size, r in result["sizes"].items():
        for factor, f in r["factors"].items():
            assert f["exact_ms_median"] > 0 and f["fast_ms_median"] > 0, (size, factor)
            assert 0.9 < f["cosine_min"] <= f["cosine_median"] <= 1.0 + 1e-6, (size, factor)
    assert result["sizes"]["512x512"]["factors"]["2"]["pixel_mad"] == 0  # below 4 x 224 a side: decoded exactly
    assert result["sizes"]["12 MP (4000x3000)"]["factors"]["2"]["pixel_mad"] > 0
    assert "12 MP (4000x3000)" in capsys.readouterr().out


def test_capacity_table_prints_the_feed_rate_of_16_cpus() -> None:
    from bench.capacity import table

    cpu = dict.fromkeys(CPU_PARTS, 0.0) | {"decode workers": 3.0, "event loop": 0.5, "compute": 2.0, "client": 9.0}
    result = {
        "machine": {"cpu": "x", "cpus": 2, "load_average_start": [1], "load_average_end": [1]},
        "cpus": 16,
        "card_rates": {"H100": 10_094},
        "inputs": {"512x512 JPEG": {"device/exact": {"cpu_ms_per_image": cpu, "server": 100.0}}},
    }
    row = table(result).split("512x512 JPEG")[1].splitlines()[0].split()
    assert row == ["device/exact", "3.00", "2.00", "3.50", "4,571"]  # 16 x 1000 / 3.5 ms


def test_pipe_frames_smoke_times_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "pipe.json"
    main(["--pipe-frames", "--smoke", "--json", str(out)])
    sizes = json.loads(out.read_text())["sizes"]
    assert set(sizes) == {"512x512", "2 MP (1632x1224)", "12 MP (4000x3000)"}
    assert sizes["12 MP (4000x3000)"]["megabytes"] == 12.0
    assert all(r["reader_ms"] >= 0 and r["writer_ms"] >= 0 for r in sizes.values())


def test_patch_tokens_smoke_compares_with_pooled_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "tokens.json"
    main(["--patch-tokens", "--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["kinds"]) == {"pooled", "patch_tokens_float16"}
    pooled, tokens = result["kinds"].values()
    assert result["throughput_ratio"] == tokens["images_per_s"] / pooled["images_per_s"]
    assert tokens["server_cpu_ms_per_image"] > 0
    side, dim = 224 // 14, 32  # the tiny model
    assert result["response_bytes_64_images"] > 64 * side * side * dim * 2
    memory = result["memory_mb"]
    assert 0 < memory["after_warmup"] <= memory["peak"] and 0 < memory["settled"] <= memory["peak"]


def test_door_smoke_runs_every_scenario(tmp_path: Path, capsys) -> None:
    out = tmp_path / "door.json"
    main(["--door", "--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"cpu", "load_average_start", "load_average_end"} <= result["machine"].keys()
    slow = result["slow"]
    for name, calls in slow["victim"].items():  # a call every 0.5 s for 2 s, each answered, refused or timed out
        assert sum(calls["outcomes"].values()) == len(calls["calls"]) == calls["latency"]["count"] == 4, name
        assert 0 < calls["latency"]["p50_s"] <= calls["latency"]["max_s"], name
    hostile = slow["hostile"]
    assert [hostile[kind]["connections"] for kind in ("slow upload", "header pad", "request line")] == [4, 10, 10]
    for kind, fate in hostile.items():
        refused = sum(fate["refused_at_connect"].values())
        assert fate["closed_after"]["count"] + fate["still_open"] + refused == fate["connections"], kind
        assert fate["answered_after"]["count"] == sum(answer["count"] for answer in fate["answered"].values()), kind
    assert min(slow["server_fds"]["before"], slow["server_fds"]["during_max"], slow["server_fds"]["after"]) > 0
    bodies = result["json64"]
    assert list(bodies) == ["[[],[],...]", '{"images": [[],[],...]}', '{"images": [31 x base64]}']
    for name, body in bodies.items():
        assert body["bytes"] >= 2**20 and body["status"] and body["seconds"] > 0, name
        assert body["idle_rss_mb"] > 0 and body["peak_rss_mb"] > 0, name
        health = body["health"]  # a body refused in a few ms may see no health check at all
        assert health["checks"] == 0 or health["max_s"] >= health["p99_s"] > 0, name
    calls = result["grpc32"]
    assert sum(calls["outcomes"].values()) == 4 and calls["request_bytes"] > 2 * 8_000_000
    for name, health in calls["health"].items():
        assert health["checks"] >= 1 and health["max_s"] >= health["p99_s"] > 0, name
    assert calls["peak_rss_mb"] > 0 and calls["rss_after_mb"] > 0
    assert "grpc32: 4 concurrent Embed calls of 2 x" in capsys.readouterr().out
