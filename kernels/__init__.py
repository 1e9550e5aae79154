"""Triton kernels of fastgrpo, installed as ``fastgrpo.kernels``.

Importing a kernel module imports triton; ``TRITON_INTERPRET=1`` must be set before that to
run the kernels on CPU tensors through the Triton interpreter.
"""


def _hand_name_to_installed_package() -> None:
    """Replace this folder, imported as top-level ``kernels``, by the installed ``kernels`` package.

    With a checkout's root on ``sys.path`` (``python -m pytest``, ``python -c`` in the clone) this
    folder shadows Hugging Face's ``kernels``, which transformers (5.25+ depends on it) imports
    whenever the distribution is installed. The import system returns whatever ``sys.modules``
    holds once this body finishes, so putting the real package there hands the name over.

    Without the installed package this module stays, empty: transformers before 5.25 (5.17 on a
    GPU image, seen) finds this folder, imports it to read a version, and does not catch an
    ImportError, so raising one broke ``import transformers`` from the root. An empty module with
    no ``__version__`` is what its check reads as "kernels unavailable".
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_name_to_installed_package()
else:
    __all__ = ["linear_logprobs_triton", "poison_outputs"]

    def __getattr__(name):
        # Lazy: ``fastgrpo.kernels._gemm`` (torch only) must not pull in triton, which the
        # pure-PyTorch paths do without (triton is a Linux-only dependency).
        if name == "linear_logprobs_triton":
            from .linear_logprobs import linear_logprobs_triton

            return linear_logprobs_triton
        if name == "poison_outputs":
            from ._debug import poison_outputs

            return poison_outputs
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
