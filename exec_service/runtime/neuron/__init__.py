"""The ``neuron`` backend on TorchNeuron, and the part of its compiler that is verified without it.

TorchNeuron (torch-neuronx 2.13.3.x for torch 2.13.0) compiles a graph with
``torch.compile(backend="neuron")``: Dynamo fullgraph capture -> AOTAutograd (input mutations kept in
the graph) -> torch-mlir's FX importer -> StableHLO -> neuronx-cc -> NEFF. Modules, one concern each:

* ``sdk``: the SDK's environment (caches, compile-only mode, cores per rank, compiler flags) and
  versions, assembled as plain data before ``import torch`` — no SDK needed to build or test it;
* ``backend``: ``NeuronBackend`` (``torch.compile(backend="neuron")`` per graph spec on the
  ``neuron`` device; the ``"neuron"`` process group); its hardware-only calls are few and isolated;
* the front half, run here on CPU with the public torch-mlir wheel: ``capture`` (Dynamo +
  AOTAutograd, cache writes as aliased outputs), ``trace_group`` (rank graphs of tp > 1 traced in
  one process), ``collective_legalize`` (``_c10d_functional`` collectives -> StableHLO collectives),
  ``lowering`` (torch-mlir -> StableHLO + the checks), ``op_allowlist`` (the StableHLO ops a
  lowered graph may contain, each with its reason) and ``stablehlo_export`` (every graph of every
  rank to ``DIR/rank-{r:05d}/{graph}.mlir`` + ``report.json``).
"""
