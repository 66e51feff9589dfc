"""`vllm-compat bench` helpers that need no engine: the head matmul timings behind the fp32-head
theory, and the report's formatting of the head and update figures."""
import torch

from vllm_compat.tools import bench


def test_head_matmul_timings_run_with_torch_and_vllm_kernels():
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in (False, True):
            seconds = bench._head_matmul_seconds(4, 64, 256, dtype, reps=2, vllm_kernel=kernel)
            assert 0 < seconds < 5


def test_report_prints_every_head_and_update_figure():
    report = {"date": "2026-12-01", "machine": "x86_64, 2 cores", "vllm": "0.32.0", "torch": "2.13.0",
              "throughput": {"rounds": 1,
                             "decode_tokens_per_s": {"stock_v1": 500.0},
                             "fp32_head_tokens_per_s": {"shim_fp32_head_tied": 900.0},
                             "prompt_tokens_per_s": {"raw_stock_v1": 2000.0},
                             "fp32_head_extra_seconds": {"measured": 1.5, "measured_tied": 1.6,
                                                         "theoretical_matmul": 1.4,
                                                         "theoretical_matmul_vs_vllm_bf16_kernel": 1.45},
                             "ratios": {"fp32 head extra time: measured / theoretical matmul (target <= 1.10)": 1.07}},
              "weight_update": {"model_bytes": 176e6, "repeats": 3,
                                "median_seconds": {"update_from_file: pause_rpc_resume": 0.0023},
                                "unavailable": {}, "ratios": {"update_from_file / bare_reload_weights": 0.71},
                                "throughput_MB_per_s": {"file_transport": 1800.0}}}
    text = bench.format_report(report)
    for line in ("fp32_head: shim_fp32_head_tied", "fp32 head extra time: measured tied",
                 "fp32 head extra time: theoretical matmul vs vllm bf16 kernel",
                 "measured / theoretical matmul (target <= 1.10)", "update_from_file: pause_rpc_resume",
                 "update_from_file / bare_reload_weights"):
        assert line in text, line
    assert "1.600 s" in text and "2.3 ms" in text and "0.71 x" in text


def test_sampling_table_says_what_bounds_each_configuration():
    """Every sampling configuration has its measured bound, printed next to its fraction of greedy
    (a configuration under the 0.90 target says why in the bench's own output)."""
    assert set(bench.SAMPLING_BOUNDS) == set(bench.SAMPLING_CONFIGS)
    table = {n: {"stock_v1": 0.5, "shim": 0.95, "shim / stock_v1": 1.9} for n in bench.SAMPLING_CONFIGS}
    report = {"date": "2026-12-02", "machine": "x86_64, 2 cores", "vllm": "0.32.0", "torch": "2.13.0",
              "sampling": {"workload": {"prompts": 32, "max_tokens": 128, "rounds": 2, "iterations": 3},
                           "fraction_of_greedy": table, "bounded_by": dict(bench.SAMPLING_BOUNDS),
                           "tokens_per_s": {"stock_v1": {"greedy": 1500.0}, "shim": {"greedy": 1500.0}}}}
    lines = bench.format_report(report).splitlines()
    for name, bound in bench.SAMPLING_BOUNDS.items():
        assert any(line.lstrip().startswith(name) and line.rstrip().endswith(bound) for line in lines), name


def test_throughput_section_computes_the_head_figures(monkeypatch, tmp_path):
    """The section's arithmetic on canned tokens/s (no engine): the head's extra seconds, untied and tied,
    and the measured / theory ratio."""
    monkeypatch.setattr(bench, "build_bench_model", lambda out, *a, **k: out)
    monkeypatch.setattr(bench, "_head_matmul_seconds", lambda b, h, v, dtype, reps=50, vllm_kernel=False:
                        {torch.float32: 0.016, torch.bfloat16: 0.009 if not vllm_kernel else 0.008}[dtype])
    canned = {"stock_v1": 500.0, "shim_without_fp32_head": 1000.0, "shim_bf16_head": 2048.0,
              "shim_fp32_head": 1024.0, "shim_bf16_head_tied": 2048.0, "shim_fp32_head_tied": 512.0,
              "raw_stock_v1": 2000.0, "processed_shim": 1900.0}
    monkeypatch.setattr(bench, "_compare", lambda configs, rounds, log: {n: canned[n] for n in configs})
    out = bench._throughput(tmp_path, 512, 4, 32000, 1, None, log=lambda s: None)
    e = out["fp32_head_extra_seconds"]
    tokens = 32 * 128
    assert e["measured"] == tokens / 1024 - tokens / 2048 and e["measured_tied"] == tokens / 512 - tokens / 2048
    assert abs(e["theoretical_matmul"] - 128 * 0.007) < 1e-12
    assert abs(e["theoretical_matmul_vs_vllm_bf16_kernel"] - 128 * 0.008) < 1e-12
    ratio = out["ratios"]["fp32 head extra time: measured / theoretical matmul (target <= 1.10)"]
    assert abs(ratio - e["measured"] / e["theoretical_matmul"]) < 1e-12
    assert "fp32 head extra time" in bench.format_report({"date": "", "machine": "", "vllm": "", "torch": "",
                                                          "throughput": out})
