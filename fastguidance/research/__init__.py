"""Research code: the benchmark, its bundled reference model and its training, and their reports.

Nothing here is imported when ComfyUI loads the pack (``tests/test_runtime_imports.py`` checks it);
``python -m fastguidance bench`` and the scripts in ``benchmarks/`` use it.

- :mod:`.bench`, :mod:`.bench_methods`: the benchmark (every method against CFG and a CFG window).
- :mod:`.reference`: the reference model, its prompts, the adherence classifier, their training and weights.
- :mod:`.sampling`: a small Euler / DDIM sampler that drives the engine outside ComfyUI.
- :mod:`.windows`: the fixed CFG window and guidance interval, the baselines the bench compares to.
- :mod:`.statistics`, :mod:`.report`: Fréchet distance, bootstrap intervals, the PNG grid and plot.
- :mod:`.cli`: command-line parsing that refuses bad options in one line.
"""
