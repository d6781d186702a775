"""The benchmark scripts run end to end at tiny sizes (so they do not rot
between the GPU sessions that record their figures)."""

from __future__ import annotations

import json


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_bench_gpu_smoke(capsys):
    from ziggurat.scripts.bench_gpu import main

    assert main(["--smoke", "--reps", "1", "--workloads", "decode1", "prefill", "offline_gen"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["roofline"]["bandwidth_gb_s"] > 0
    assert res["workloads"]["decode1"]["tok_s"] > 0 and 0 < res["workloads"]["prefill"]["mfu"]
    assert res["workloads"]["offline_gen"]["total_tok_s"] > 0


def test_bench_offline_smoke(llama_dir, capsys):
    from ziggurat.scripts.bench_offline import main

    assert main(["--model", str(llama_dir), "--num-seqs", "4", "--max-input-len", "120", "--max-output-len", "110",
                 "--hf", "--hf-batch", "2"]) == 0
    res = last_json(capsys.readouterr().out)
    ours, hf = res["results"]
    assert ours["output_tokens"] == hf["output_tokens"] == res["output_tokens"]
    assert res["speedup_vs_hf"] > 0


def test_bench_step_prep_smoke(llama_dir, capsys):
    from ziggurat.scripts.bench_step_prep import main

    assert main(["--model", str(llama_dir), "--requests", "16"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["prepare_us"] > 0 and res["sampling_batch_us"] > 0


def test_serving_sweep_policies_and_histogram_quantiles():
    import pytest

    from ziggurat.scripts.bench_serving_sweep import histogram_quantiles, policy_settings

    assert policy_settings("default") == {}
    assert policy_settings("decode_first:1024@60") == {"schedule_policy": "decode_first", "max_prefill_tokens": 1024,
                                                      "target_step_ms": 60.0}
    for bad in ("lifo", "fcfs@60", "decode_first:x", "decode_first@fast"):
        with pytest.raises(SystemExit, match="policy"):
            policy_settings(bad)

    def text(counts):  # cumulative buckets 0.01 / 0.1 / +Inf of two series
        return "\n".join(f'h_bucket{{replica="{r}",le="{le}"}} {c}' for r in "01"
                         for le, c in zip(("0.01", "0.1", "+Inf"), counts)) + "\n"

    q = histogram_quantiles(text((10, 10, 10)), text((10, 60, 110)), "h")  # per series: 50 in (0.01, 0.1], 50 above
    assert q["count"] == 200
    assert q["p50"] == pytest.approx(0.1)  # half the new observations at or below 0.1
    assert q["p90"] == pytest.approx(0.1)  # above the last finite bucket: its edge, not a guess
    assert histogram_quantiles(text((1, 1, 1)), text((1, 1, 1)), "h") is None  # nothing new


def test_every_kernel_variant_compiles_for_hopper(tmp_path):
    """scripts/compile_check.py: the Triton kernels' launches at the 8B's shapes (bf16 and FP8 weights,
    16-bit and FP8 KV caches) compile for sm_90 with Triton's own ptxas, on this CPU."""
    import os
    import pathlib
    import subprocess
    import sys

    import pytest

    triton = pytest.importorskip("triton")
    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("Triton's CUDA backend tools are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, "-m", "ziggurat.scripts.compile_check", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed"] == 0 and len(res["variants"]) >= 14
    assert all(v["regs"] > 0 for v in res["variants"])
