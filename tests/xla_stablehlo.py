"""``python -m tests.xla_stablehlo DIR [--no-write-back]``: run lowered StableHLO modules on XLA's
CPU backend (jaxlib), as a chain of steps sharing state — the strongest check of a lowering short of
Neuron hardware.

DIR holds ``{graph}.mlir`` per graph, ``meta.json`` ({graphs: {name: {inputs, aliases}}, steps:
[graph name per step]}) and ``inputs.npz`` (``state:{input}`` for weights / cache / counts, and
``step{n}:{input}`` per step). Each step's aliased outputs (``tf.aliasing_output``) become the state
the next step reads, as the device reuses the input buffers; ``--no-write-back`` drops them (the
check that a lost cache write shows). Prints ``{"tokens": [...]}`` (each step's first output's first
value) as its last line. Run in its own process: jaxlib and torch-mlir each carry an MLIR build.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)  # the graphs take int64 ids
    from jax._src import xla_bridge
    from jax._src.lib import xla_client as xc

    root = Path(argv[0])
    write_back = "--no-write-back" not in argv
    meta = json.loads((root / "meta.json").read_text())
    arrays = np.load(root / "inputs.npz")
    backend = xla_bridge.get_backend("cpu")
    device = backend.devices()[0]
    executables = {}
    for name in meta["graphs"]:
        # XLA runs the module's "main"
        text = (root / f"{name}.mlir").read_text().replace(f"func.func @{name}(", "func.func @main(")
        executables[name] = backend.compile_and_load(text, xc.DeviceList((device,)), xc.CompileOptions())
    state = {k.split(":", 1)[1]: arrays[k] for k in arrays.files if k.startswith("state:")}
    tokens = []
    for n, name in enumerate(meta["steps"]):
        graph = meta["graphs"][name]
        args = [state[i] if i in state else arrays[f"step{n}:{i}"] for i in graph["inputs"]]
        outs = [np.asarray(o) for o in executables[name].execute([jax.device_put(a, device) for a in args])]
        if write_back:
            for i, o in graph["aliases"]:
                state[graph["inputs"][i]] = outs[o]
        tokens.append(int(outs[0].reshape(-1)[0]))
    print(json.dumps({"tokens": tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
