"""Acceptance on Neuron hardware (``bench/neuron_acceptance.py``): SmolLM2 token parity with cpu at
tp 1 and 2, compile time, start time with a graph set, TTFT, TPOT. Skipped, with the reason, where
there is no Neuron SDK or device — every CI machine of this project."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.neuron_acceptance import skip_reason

pytestmark = pytest.mark.neuron
REASON = skip_reason()


@pytest.mark.skipif(REASON is not None, reason=f"needs Neuron hardware: {REASON}")
def test_smollm2_on_neuron_is_token_exact_with_cpu_at_tp_1_and_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.neuron_acceptance", "--tp", "1,2"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SKIP" not in proc.stdout and "| True" in proc.stdout
