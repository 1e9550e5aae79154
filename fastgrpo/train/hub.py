"""Hub names for ``--model`` and ``--dataset``: fail fast, in one line, when the Hugging Face Hub cannot serve them.

A name that is not a local path goes to the hub, where transformers and datasets retry each request with
backoff. Measured with the hub unreachable: a missing model took 10 "Retrying in Ns" lines and 52 s before its
error, a missing dataset 5 lines and 29 s, and a model and dataset both in the cache 45 lines and 3.5 minutes
before training began from the cache. Before loading, ``hub_source`` decides instead (each of those is now 5-6 s,
mostly imports, with no retry line):

- an offline variable is set (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``): the hub
  is not contacted; a name in the local Hugging Face cache loads from it, any other is refused at once;
- else one quick probe of the hub endpoint (``HF_ENDPOINT``, a 3 s limit, once per process): reachable,
  loading goes on as before; unreachable, a cached name loads from the cache without asking the hub, any
  other is refused in one line naming the argument.

huggingface_hub has no setting for its retry count (``max_retries`` is an argument of its internal
``http_backoff`` only), hence the probe.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

PROBE_TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's and datasets' truthy values
_PROBED: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not; one probe per process
_ANNOUNCED: set[tuple[str, str]] = set()  # (argument, name) said to load from the cache
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_model(name: str) -> bool:
    return Path(os.path.expanduser(name)).exists()


def is_hub_model(name: str) -> bool:
    """Not a local path and shaped like a hub id (``org/name``); other missing paths are refused as paths."""
    return not is_local_model(name) and not name.startswith((".", "/", "~")) and bool(_HUB_ID.match(name))


def is_local_dataset(name: str) -> bool:
    """A ``--dataset`` read from disk: an existing path, a data-file suffix, or a name written as a path."""
    path = Path(os.path.expanduser(name))
    return path.suffix.lower() in LOCAL_DATA_SUFFIXES or name.startswith((".", "/", "~")) or path.exists()


def offline_variable() -> str | None:
    """The offline variable set to a true value (``HF_HUB_OFFLINE=1``), or None."""
    for var in OFFLINE_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip().upper() in _TRUE:
            return f"{var}={value}"
    return None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _is_network_error(e: BaseException) -> bool:
    """OSError (DNS, refused, TLS, timeouts) or an httpx/requests transport error: the hub libraries would
    fail on it the same way. Anything else is not taken as "unreachable"."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"RequestError", "TransportError", "RequestException"})


def probe_hub(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One HEAD request to ``endpoint`` through huggingface_hub's own HTTP session (its proxies and
    certificates). None when any HTTP answer came back, else why not (``ConnectError: ...``). The request runs
    in a daemon thread joined with ``timeout``, so a name lookup that hangs cannot hold the run either."""
    result: list[str | None] = []

    def head() -> None:
        try:
            try:
                from huggingface_hub.utils import get_session
            except ImportError:  # pragma: no cover - an older huggingface_hub
                import urllib.request

                urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            else:
                get_session().head(endpoint, timeout=timeout)
            result.append(None)
        except Exception as e:  # an HTTP error status still means the hub answered
            if getattr(e, "code", None) is not None or getattr(e, "response", None) is not None:
                result.append(None)
            elif _is_network_error(e):
                text = " ".join(str(e).split()) or "no answer"
                result.append(f"{type(e).__name__}: {text}")
            else:
                result.append(None)  # not a network failure: let the libraries try, as before

    thread = threading.Thread(target=head, name="fastgrpo-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0] if result else f"no answer within {timeout:g} s"


def hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached (probed once per process and endpoint), or None."""
    endpoint = hub_endpoint()
    if endpoint not in _PROBED:
        _PROBED[endpoint] = probe_hub(endpoint)
    return _PROBED[endpoint]


def model_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def dataset_cache_dirs() -> list[Path]:
    import datasets

    return [Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))), model_cache_dir()]


def in_cache(name: str, kind: str) -> bool:
    """Whether the local Hugging Face cache holds ``name``: a model's ``config.json`` (as transformers finds
    it offline), a dataset prepared by ``datasets`` before (what it loads offline) or its hub files."""
    from huggingface_hub import try_to_load_from_cache

    if kind == "model":
        try:
            return isinstance(try_to_load_from_cache(name, "config.json", cache_dir=model_cache_dir()), str)
        except ValueError:  # not a valid repo id
            return False
    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    prepared = dataset_cache_dirs()[0] / "___".join([*parts[:-1], camelcase_to_snakecase(parts[-1])])
    if prepared.is_dir() and any(p.is_dir() for p in prepared.glob("*/*/*")):
        return True
    snapshots = model_cache_dir() / f"datasets--{name.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@contextlib.contextmanager
def hub_offline(on: bool = True):
    """Within it, ``datasets`` and huggingface_hub treat the hub as off (as ``HF_HUB_OFFLINE=1`` does) when
    ``on``: ``load_dataset`` then reads its cache at once instead of retrying the hub first."""
    if not on:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def hub_source(arg: str, name: str, kind: str) -> bool:
    """For a ``--model`` / ``--dataset`` name that is not a local path (``kind``: "model" or "dataset"):
    True to load it from the local cache only, False to load it as before (the hub answers).

    Raises ValueError (one line naming ``arg``) when an offline variable is set or the hub is unreachable and
    the cache holds no copy; the offline case never touches the network."""
    what = "a local file or folder" if kind == "dataset" else "a local folder"
    where = model_cache_dir() if kind == "model" else dataset_cache_dirs()[0]
    offline = offline_variable()
    if offline is not None:
        if in_cache(name, kind):
            return True
        raise ValueError(
            f"could not load {kind} {name!r} ({arg}): it is not {what}, {offline} keeps the Hugging Face Hub off, "
            f"and the local cache ({where}) holds no copy; pass {what}, or unset it to download"
        )
    why = hub_unreachable()
    if why is None:
        return False
    if in_cache(name, kind):
        if (arg, name) not in _ANNOUNCED:
            _ANNOUNCED.add((arg, name))
            print(f"{arg} {name}: the Hugging Face Hub is unreachable ({why}); using the cached copy", flush=True)
        return True
    raise ValueError(
        f"could not load {kind} {name!r} ({arg}): it is not {what}, the Hugging Face Hub ({hub_endpoint()}) is "
        f"unreachable ({why}), and the local cache ({where}) holds no copy; pass {what}, or set HF_ENDPOINT to "
        "a mirror you can reach"
    )


def check_hub_sources(cfg) -> None:
    """``hub_source`` for ``cfg``'s model and dataset names that are not local paths, before anything loads:
    a refusal costs no dataset load and no output folder."""
    # A resume may load its weights from the checkpoint alone: then only the loads by name are checked (as
    # load_model_and_tokenizer calls hub_source itself).
    model = cfg.model.model
    if model is not None and not cfg.resume_from_checkpoint and is_hub_model(model):
        hub_source("--model", model, "model")
    if cfg.dataset is not None and not is_local_dataset(cfg.dataset):
        hub_source("--dataset", cfg.dataset, "dataset")
