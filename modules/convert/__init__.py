"""Dataset sources for the project's dataset folder (SPEC section 3), run as ``python -m modules.convert``.

* ``cli.py``: the command line (``synth``, ``asap``, ``ellipse``, ``csv`` subcommands).
* Real corpora: ``corpora.py`` (ASAP, ELLIPSE, any CSV) on the shared ``pipeline.py`` (table ->
  records -> split -> written, reloaded folder), which decodes and repairs text with ``text.py``.
* The synthetic sample dataset: ``synthetic.py`` (generator) with ``lexicon.py`` (word lists,
  rubric table), ``feedback.py`` (feedback templates), ``card.py`` (its README) and
  ``baseline.py`` (TF-IDF + ridge QWK, also used by ``benchmarks/bench_real_essays.py``).
* ``subset.py``: a seeded subset of a converted folder, the real-essay benchmark's training data.
"""
