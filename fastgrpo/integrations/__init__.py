"""Adapters that put fastgrpo's fused loss inside other trainers (TRL's ``GRPOTrainer``, verl).

Empty for now; the adapters arrive with their own issues. Like ``fastgrpo.train``, they use
``fastgrpo.ops`` and nothing imports them back.
"""
