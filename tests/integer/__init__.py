"""Tests of ``squeezer.integer``. A package, so that pytest imports its modules as
``integer.test_*`` (basenames may repeat across test folders) with the tests folder on ``sys.path``
(``tiny_bert``)."""
