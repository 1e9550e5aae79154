"""Importing this module installs fastgrpo's ``linear_cross_entropy`` into verl, in this process.

It is what verl's external-module hooks load in each Ray worker (verl 0.9.1):
``actor_rollout_ref.model.external_lib=fastgrpo.integrations.verl_plugin`` (imported by
``HFModelConfig.__post_init__``) or ``VERL_USE_EXTERNAL_MODULES=fastgrpo.integrations.verl_plugin``
(imported by ``verl/__init__.py``). ``FASTGRPO_VERL_IMPL`` picks fastgrpo's path (default
"auto"). See ``fastgrpo.integrations.verl``.
"""

from .verl import install_from_env

PATCHED = install_from_env()
"""The modules the import patched (``fastgrpo.integrations.verl.install``'s return value)."""
