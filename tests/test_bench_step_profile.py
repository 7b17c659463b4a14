"""bench/step_profile.py off the GPU: kernels are read from a trace's GPU processes, grouped by
kind, and a step's busy time counts overlapping kernels once."""

from bench import step_profile as bench
from bench.step_floor import StepShape


def _trace():
    meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
    kernel = lambda pid, ts, dur, name: {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": name}
    return {"traceEvents": [
        meta(1, "/host:CPU"), meta(7, "/device:GPU:0 (stream 2)"),
        kernel(1, 0, 500, "PjitFunction(step)"),                      # host: not a kernel
        kernel(7, 10, 40, "atmm_shrink"), kernel(7, 60, 100, "nvjet_tst_128x64_64x4_1x2_h_bz_TNN"),
        kernel(7, 100, 20, "loop_multiply_fusion"),                    # overlaps the GEMM
        kernel(7, 200, 30, "decode_attention"), kernel(7, 240, 10, "input_reduce_fusion"),
        kernel(7, 260, 10, "DeviceRadixSortOnesweepKernel"), kernel(7, 280, 5, "mystery")]}


def test_kernels_come_from_the_gpu_processes_and_are_grouped_by_kind():
    kernels = bench.gpu_kernels(_trace())
    assert [name for _, _, name in kernels][:2] == ["atmm_shrink", "nvjet_tst_128x64_64x4_1x2_h_bz_TNN"]
    assert len(kernels) == 7
    summary = bench.summarize(kernels, steps=2)
    assert summary["launches"] == 3.5
    assert summary["busy_ms"] == (40 + 100 + 30 + 10 + 10 + 5) / 2 / 1e3      # the fusion inside the GEMM counts once
    assert summary["span_ms"] == (285 - 10) / 2 / 1e3
    kinds = summary["kinds"]
    assert kinds["GEMM"] == {"ms": 0.05, "launches": 0.5}
    assert set(kinds) == {"ATMM (LoRA)", "GEMM", "other fusion", "decode attention", "reduction fusion",
                          "sort / top-p", "other"}


def test_an_empty_trace_summarizes_to_zero():
    summary = bench.summarize([], steps=3)
    assert summary["launches"] == 0 and summary["busy_ms"] == 0 and summary["kinds"] == {}


def test_a_tiny_run_reports_every_row(tmp_path):
    shapes = [StepShape("decode full x 16 keys, unmerged", "unmerged", rows=-1, keys=16)]
    result = {"command": "python bench/step_profile.py", "device": "cpu", "jax": "0", "xla_flags": "",
              **bench.measure("tiny", 2, tmp_path, shapes)}
    record, = result["records"]
    assert record["wall_ms"] > 0 and record["floor_ms"] > 0 and record["rows"] == 32
    assert list(tmp_path.rglob("perfetto_trace.json.gz"))
    assert "| decode full x 16 keys, unmerged |" in bench.report(result)
