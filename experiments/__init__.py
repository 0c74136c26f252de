"""Experiments: measuring, drawing and recording the attention paths (see experiments/README.md).

Library modules, one job each: ``settings`` (what is measured), ``methods`` (the compared calls),
``analytic`` (exact bytes and counts), ``memory`` (measured peaks), ``timing`` (measured times),
``analysis`` (fits and comparisons of rows), ``lattices`` and ``ring`` (views of the semantics and the
ring schedule), ``plots``, ``tables``, ``result_files``, ``env`` (the environment record) and ``cli``
(what the command-line tools share). Every other module with a ``__main__`` is a command-line tool,
``python -m experiments.<tool> --help``. Benchmark suites: ``experiments/benchmarks``; this package's
own tests: ``experiments/tests``.
"""
