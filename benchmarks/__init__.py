"""Benchmarks of fastgrpo, installed as ``fastgrpo.benchmarks`` (run as ``fastgrpo bench ...``)."""
