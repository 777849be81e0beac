"""Every kernel the model launches compiles for the H100/H200 (sm_90), also on a machine without a GPU.

The interpreter runs the kernels' arithmetic but none of a GPU compile's checks. ``bench/compile_audit.py``
compiles, in its own process (Triton's interpreter off), each kernel specialisation that the v1 and
face-parsing models launch in train (forward + backward) and eval, for bf16 and fp32, at each autotuned
kernel's first GPU config that survives pruning; ``--configs all`` (by hand, see bench/results/) compiles
every config.
On a GPU machine the compiled test suite covers this, so the test is skipped there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_tools() -> bool:
    """Triton's NVIDIA backend with the ``ptxas``/``cuobjdump`` its wheel ships."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the compiled test suite covers this")
@pytest.mark.skipif(not _nvidia_tools(), reason="triton has no NVIDIA backend with ptxas here")
def test_model_kernels_compile_for_sm90(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "bench" / "compile_audit.py"), "--quick", "--dtypes", "bf16,fp32",
           "--configs", "first", "--json", str(out), "--md", str(tmp_path / "audit.md")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    audit = json.loads(out.read_text())
    variants = audit["variants"]
    kernels = {v["kernel"] for v in variants}
    # every fused op of the model was reached: conv+BN (fwd, BN pass, both bwd passes), attention,
    # upsample+add, attend+residual, head conv/upsample/argmax and their backward kernels
    for name in ("conv_bn_fwd_kernel", "bn_stats_kernel", "partials_reduce_kernel", "bn_act_kernel",
                 "bn_act_bwd_reduce_kernel", "bn_bwd_coef_kernel",
                 "bn_act_bwd_kernel", "_bn_attention_fwd_kernel", "_bn_attention_bwd_kernel",
                 "_mlp_attention_fwd_kernel", "_mlp_attention_bwd_kernel", "_attend_add_upsample_kernel",
                 "_attend_add_upsample_bwd_kernel", "_attend_residual_kernel", "_attend_residual_bwd_kernel",
                 "_head_conv1x1_kernel", "_upsample_logits_kernel", "_upsample_bwd_w_kernel",
                 "_upsample_bwd_h_kernel", "_head_dx_kernel", "_head_dw_kernel", "_max_pool_kernel",
                 "_max_pool_bwd_kernel",
                 "_ce_fwd_kernel", "_ce_bwd_kernel", "_head_ce_fwd_kernel", "_head_ce_bwd_w_kernel"):
        assert name in kernels, f"{name} was never launched by the audit's workloads"
    assert all(v["error"] is None for v in variants)
    assert all(v["registers"] > 0 and v["shared_bytes"] <= 227 * 1024 for v in variants)
    # the implicit-GEMM conv runs on Hopper tensor cores (wgmma) in every 4-warp config and dtype, and
    # its K loop never spills
    convs = [v for v in variants if v["kernel"] == "conv_bn_fwd_kernel" and v["config"]["num_warps"] == 4]
    assert convs and all("wgmma" in v["mma"] and v["mma_loop"] for v in convs)
    assert all(v["loop_spills"] == 0 for v in variants if v["kernel"] == "conv_bn_fwd_kernel")
    assert {d for v in convs for d in v["dtypes"]} >= {"bfloat16", "float32"}
    # the head's low-res logits have whole, aligned rows: stored and read back as 16-byte vectors only
    ups = [v for v in variants if v["kernel"] == "_upsample_logits_kernel"]
    assert ups and all(k == "ld16" for v in ups for k in v["global_access"] if k.startswith("ld"))
    heads = [v for v in variants if v["kernel"] == "_head_conv1x1_kernel"]
    assert heads and all("st16" in v["global_access"] for v in heads)
    assert all(k == "st16" for v in heads for k in v["global_access"] if k.startswith("st"))
