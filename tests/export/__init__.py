"""Tests of ``squeezer.export``. A package, so that pytest imports its modules as ``export.test_*``
(basenames may repeat across test folders) with the tests folder on ``sys.path``."""
