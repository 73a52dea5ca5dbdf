"""The benchmark's dense HomoVar baseline is the same loss as ours (so the speed ratio compares like with like)."""

import pytest
import torch

from benchmarks.run import dense_homovar, step_cases, to_markdown
from paperlib.climbq import homovar_loss


def test_dense_homovar_equals_vectorised():
    g = torch.Generator().manual_seed(1)
    b, k, d = 40, 6, 5
    logits = torch.randn(b, k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (b,), generator=g)
    feats = torch.rand(b, d, generator=g, dtype=torch.float64) - 0.3
    feats = feats.clamp_min(0)  # ReLU zeros exercise the zero mask
    counts = [50, 30, 20, 12, 8, 5]
    ours = homovar_loss(logits, labels, feats, counts)
    dense = dense_homovar(logits, labels, feats, counts)
    assert torch.allclose(ours.double(), dense, rtol=1e-6)


def test_every_step_case_builds_and_steps():
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for name, build in step_cases().items():
        model, loss_fn = build()
        loss = loss_fn(model.train(), x, y)
        loss.backward()
        assert torch.isfinite(loss), name


def test_markdown_reports_missed_targets():
    res = {"machine": {"cpus": 2, "torch": "2.14.1", "device": "cpu"}, "reps": 3,
           "steps": [{"case": "CBP ter", "size": 8, "step_ms": 10, "ratio_vs_fp32": 1.5, "target": 1.15,
                      "meets_target": False}], "homovar": []}
    assert "| 8px | CBP ter | 10 | 1.5 | 1.15 | **no** |" in to_markdown(res)


def test_markdown_renders_memory_gpu_and_e2e_sections():
    res = {"machine": {"cpus": 16, "torch": "2.11", "device": "cuda", "gpu": "H100"}, "reps": 7, "steps": [],
           "homovar": [],
           "dgms_memory": [{"case": "FP32", "batch": 64, "step_ms": 15.1, "peak_mb": 1364.4, "one_Kxw_mb": None},
                           {"case": "DGMS K=16", "batch": 64, "step_ms": 315.5, "peak_mb": 1443.2,
                            "one_Kxw_mb": 681.0}],
           "gpu_fit": [{"case": "FP32", "images_per_s": 10692.2}],
           "e2e": [{"preset": "smoke", "notebook": "cbp", "wall_s": 20.5, "ok": False}]}
    md = to_markdown(res)
    assert "(H100)" in md
    assert "| DGMS K=16 | 64 | 315.5 | 1443.2 | 681.0 |" in md
    assert "| FP32 | 10692.2 |" in md
    assert "| smoke | cbp | 20.5 | **no** |" in md


def test_op_count_sees_what_one_pass_saves():
    from benchmarks.run import bench_ops, count_ops

    assert count_ops(lambda: torch.ones(3) + 1) == 2  # ones (a fill), add
    assert count_ops(lambda: torch.ones(6).view(2, 3).detach()) == 1  # views launch nothing
    rows = {r["case"]: r for r in bench_ops(batch=4)}
    assert rows["FP32"]["ratio_vs_fp32"] == 1.0 and rows["FP32"]["ops"] > 100
    assert rows["ClimbQ W4A4"]["ops"] < rows["ClimbQ W4A4 (PyTorch path, per layer)"]["ops"]
    assert "| FP32 | " in to_markdown({"machine": {"cpus": 2, "torch": "x", "device": "cpu"}, "reps": 1,
                                       "steps": [], "homovar": [], "ops": list(rows.values())})


def test_compiled_step_rows_divide_by_compiled_fp32(monkeypatch):
    """``--compile MODE``: every method (not the peer, not the per-layer duplicates) gets a compiled row whose
    baseline is FP32 compiled alike (DGMS: option-A FP32), with the method's target; the aot_eager backend stands
    in for Inductor here (no C++ builds)."""
    import benchmarks.run as br
    import paperlib.compiled as pc

    real = pc.compile_model
    monkeypatch.setattr(pc, "compile_model", lambda m, mode, **kw: real(m, mode, **{**kw, "backend": "aot_eager"}))
    cases = step_cases()
    keep = ["FP32", "FP32 (option-A shortcut)", "DGMS K=16", "torch.ao QAT 8-bit (peer)"]
    monkeypatch.setattr(br, "step_cases", lambda: {k: cases[k] for k in keep})
    rows = {r["case"]: r for r in br.bench_steps(torch.device("cpu"), [8], reps=1, batch=4, compile_mode="default")}
    assert not [r for r in rows.values() if "error" in r]
    dgms = rows["DGMS K=16 [compiled, default]"]
    assert dgms["baseline"] == "FP32 (option-A shortcut) [compiled, default]" and dgms["target"] == 1.6
    assert rows["FP32 [compiled, default]"]["ratio_vs_fp32"] == 1.0
    assert "torch.ao QAT 8-bit (peer) [compiled, default]" not in rows and rows["DGMS K=16"]["baseline"] == \
        "FP32 (option-A shortcut)"
    with pytest.raises(SystemExit):
        br.main(["--compile", "fast", "--only", "steps", "--out", "/nonexistent-never-written"])
