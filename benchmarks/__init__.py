"""Benchmarks of prefopt's recipes against their peers (see benchmarks/README.md).

A package so that generated configs can name ``benchmarks.wordtok.WordTokenizer`` as a
``_component_`` (``tune run`` puts the current directory, the repo root, on ``sys.path``).
"""
