"""Resuming reads DeepSpeed checkpoints with torch's weights-only unpickler: a planted pickle payload in a run's
checkpoints cannot run code on the workers, while DeepSpeed's own ZeRO-1 states still load."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apollo_ray.train.loop import weights_only_checkpoints


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint carries: a call made at load time
        return (os.mkdir, (self.marker,))


def test_a_planted_payload_is_refused(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}, bad)
    with weights_only_checkpoints(), pytest.raises(pickle.UnpicklingError, match="mkdir"):
        TorchCheckpointEngine().load(str(bad))
    assert not marker.exists()
    # outside the block DeepSpeed's own loader is back (and would have run it: that is what the block prevents)
    TorchCheckpointEngine().load(str(bad))
    assert marker.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_zero1_states_still_load(tmp_path):
    """A real ZeRO-1 save (model, optimizer with its loss scaler and fragment addresses), resumed weights-only, in a
    one-process gloo group of its own."""
    script = textwrap.dedent(f"""
        import os, torch, deepspeed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}", RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        from apollo_ray.train.loop import deepspeed_config, weights_only_checkpoints
        torch.distributed.init_process_group("gloo")
        def build(seed):
            torch.manual_seed(seed)
            m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
            opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
            cfg = deepspeed_config({{"micro_batch_size": 2, "grad_accum": 1, "zero_stage": 1, "precision": "fp32",
                                    "grad_clip": 1.0}})
            return deepspeed.initialize(model=m, optimizer=opt, config=cfg)[0]
        a = build(0)
        for _ in range(2):
            a.backward(a(torch.ones(2, 8)).sum()); a.step()
        a.save_checkpoint({str(tmp_path)!r}, tag="ds")
        b = build(1)
        with weights_only_checkpoints():
            b.load_checkpoint({str(tmp_path)!r}, tag="ds")
        same = all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
        print("RESUMED", same, b.global_steps)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert "RESUMED True 2" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])
