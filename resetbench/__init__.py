"""resetbench: reset-aware recurrent layers and the packing loader.

Stateful RNNs over packed streams of variable-length sequences, with each row's state reset
exactly where its next sequence starts (a per-sample, per-timestep reset):

- :mod:`resetbench.layouts`: the packing loader (``Packed``) and the padded layouts, NumPy only;
- :mod:`resetbench.corpus`: byte sequences in one array (``Corpus.from_sequences``);
- :mod:`resetbench.contract`: the batch they yield (``x``, ``y``, ``mask``, ``reset``);
- :mod:`resetbench.torch_layers`, :mod:`resetbench.jax_layers`, :mod:`resetbench.keras_layers`:
  the reset-aware layers (each imports its framework; import the one you use).

The benchmark that compares these layouts across frameworks lives in the project's repository
(``run.py``, ``backends/``, ``benchmarks/``); installing the package gives you the library only.
"""

__version__ = "0.2.0"
