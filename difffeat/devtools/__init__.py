"""Development tools, not part of the runtime library: the benchmarks behind ``difffeat bench``
(:mod:`difffeat.devtools.bench`, :mod:`difffeat.devtools.bench_real`) and the trainer of the shipped shapes model
(``python -m difffeat.devtools.train_shapes``). Nothing in the library imports them; the ``bench`` command does,
inside the command."""
