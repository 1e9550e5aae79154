"""``fastgrpo train``: the sample -> score -> update loop for one GPU (see the README's Layout for
one line per module). It uses ``fastgrpo.ops`` for every log-prob and loss; nothing in ``ops``
imports it back.

Importing this package loads nothing heavy: ``fastgrpo.train.trainer.GRPOTrainer`` is the loop,
``fastgrpo.train.config`` the configuration it reads.
"""
