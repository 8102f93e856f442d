"""The Hugging Face hub, one way for every caller: offline mode, the cache folder and the endpoint as
the environment says *now*, whether the hub can be reached, and one mapping of hub and network
exceptions to one-line HubErrors. Model files (models/fetch.py) and task data (tasks/loading.py)
both go through it.

huggingface_hub reads HF_HUB_OFFLINE, HF_HUB_CACHE, HF_HOME and HF_ENDPOINT once, when it is
imported; a variable set later (a notebook, a test, a wrapper script) would be ignored. These
functions read the environment at call time and fall back to huggingface_hub's constants.

huggingface_hub is imported inside the functions: its errors module pulls in the HTTP client (about
50 ms), and the CLI's start-up and the file-name helpers must not pay for it.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

from .errors import HubError, ProbeError

_TRUE = {"1", "ON", "YES", "TRUE"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")

# What `classify` can answer; NOT_FOUND: the request names something the hub does not have.
NOT_FOUND = frozenset({"repo_not_found", "revision_not_found", "file_not_found", "invalid_id"})


def offline() -> bool:
    """Whether offline mode is asked for: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, else
    huggingface_hub's constant."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if var in os.environ:
            return os.environ[var].strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir(explicit: str | os.PathLike | None = None) -> str:
    """The hub cache folder: `explicit`, else HF_HUB_CACHE or HF_HOME/hub as set now, else huggingface_hub's."""
    if explicit is not None:
        return os.fspath(explicit)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT as set now, else huggingface_hub's."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def endpoint_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub, so that no network fails in seconds rather than after
    huggingface_hub's retries (about 25 s of backoff). Behind a proxy the direct connection
    proves nothing, so the check is skipped there."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    parts = urlsplit(url or endpoint())
    if not parts.hostname:
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_unreachable(exc: BaseException) -> bool:
    """Whether an exception means the hub could not be reached (offline mode, network down, 5xx)."""
    from huggingface_hub import errors as hf

    if isinstance(exc, (hf.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, hf.HfHubHTTPError):
        return exc.response is not None and exc.response.status_code >= 500
    # Whichever HTTP client this huggingface_hub talks through: httpx2 (2.x), httpx (1.x), requests (0.x).
    module = type(exc).__module__.split(".")[0]
    if module in ("httpx2", "httpx"):
        import importlib

        return isinstance(exc, importlib.import_module(module).TransportError)
    if module == "requests":
        import requests

        return isinstance(exc, (requests.ConnectionError, requests.Timeout))
    return False


def classify(exc: BaseException) -> str | None:
    """What went wrong, for an exception from huggingface_hub or the network; None for anything else.

    One of: gated, repo_not_found, disabled, revision_not_found, revision_not_cached, not_cached,
    file_not_found, invalid_id, unreachable, credentials, forbidden, rate_limited, http, os.
    """
    from huggingface_hub import errors as hf

    # Order matters: GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError an
    # EntryNotFoundError, and every HfHubHTTPError an OSError.
    if isinstance(exc, hf.GatedRepoError):
        return "gated"
    if isinstance(exc, hf.RepositoryNotFoundError):
        return "repo_not_found"
    if isinstance(exc, getattr(hf, "DisabledRepoError", ())):
        return "disabled"
    if isinstance(exc, hf.RevisionNotFoundError):
        return "revision_not_found"
    if isinstance(exc, getattr(hf, "RevisionResolutionError", ())):
        return "revision_not_cached"
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return "not_cached"
    if isinstance(exc, hf.EntryNotFoundError):
        return "file_not_found"
    if isinstance(exc, hf.HFValidationError):
        return "invalid_id"
    if is_unreachable(exc):
        return "unreachable"
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        # A 401 on a repo is a RepositoryNotFoundError (above): this one is a refused token.
        return {401: "credentials", 403: "forbidden", 429: "rate_limited"}.get(status, "http")
    if isinstance(exc, OSError):
        return "os"
    return None


def hub_error(
    exc: BaseException,
    repo_id: str,
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    repo_type: str = "model",
) -> HubError | None:
    """The one-line HubError for an exception from huggingface_hub or the network, else None."""
    kind = classify(exc)
    if kind is None:
        return None
    target = f"{repo_id}/{filename}" if filename else repo_id
    at = f" at revision {revision}" if revision else ""
    page = endpoint() + ("/datasets" if repo_type == "dataset" else "") + f"/{repo_id}"
    if kind == "gated":
        return HubError(
            f"{repo_id} is gated: accept its licence at {page} and log in (`hf auth login`, "
            f"formerly `huggingface-cli login`, or set HF_TOKEN)"
        )
    if kind == "repo_not_found":
        return HubError(
            f"no {repo_type} repo {repo_id} on the Hugging Face Hub"
            " (if it is private, log in with `hf auth login` or set HF_TOKEN)"
        )
    if kind == "disabled":
        return HubError(f"{repo_id} has been disabled on the Hugging Face Hub")
    if kind == "revision_not_found":
        return HubError(f"{repo_id} has no revision {revision or 'main'!r}")
    if kind == "revision_not_cached":
        return offline_error(repo_id, revision, cache_dir)
    if kind in ("not_cached", "unreachable"):
        return offline_error(target, revision, cache_dir)
    if kind == "file_not_found":
        return HubError(f"{repo_id} has no file {filename}{at}" if filename else f"{repo_id}: not found{at}")
    if kind == "invalid_id":
        return HubError(f"not a valid Hugging Face repo id: {repo_id!r} ({one_line(exc)})")
    if kind == "credentials":
        return HubError("the Hub refused your credentials (401): log in again with `hf auth login` or fix HF_TOKEN")
    if kind == "forbidden":
        return HubError(f"the Hub refused access to {target} (403): your token lacks the permission to read it")
    if kind == "rate_limited":
        return HubError(f"the Hub is rate-limiting requests for {repo_id} (429): wait and retry, or log in")
    if kind == "http":
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "an error"
        return HubError(f"the Hub answered {status} for {target}: {one_line(exc)}")
    return HubError(f"could not fetch {target}: {getattr(exc, 'strerror', None) or one_line(exc)}")


@contextmanager
def hub_errors(
    repo_id: str,
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    repo_type: str = "model",
) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions raised inside into one-line HubErrors."""
    try:
        yield
    except ProbeError:
        raise
    except Exception as exc:
        mapped = hub_error(exc, repo_id, filename=filename, revision=revision, cache_dir=cache_dir,
                           repo_type=repo_type)
        if mapped is None:
            raise
        raise mapped from exc


def offline_error(target: str, revision: str | None = None, cache: str | os.PathLike | None = None) -> HubError:
    """`target` was needed, the hub was off (or unreachable) and the cache does not have it."""
    at = f" (revision {revision})" if revision else ""
    return HubError(f"offline and {target}{at} is not in the Hugging Face cache ({offline_reason(cache)})")


def offline_reason(cache: str | os.PathLike | None = None) -> str:
    """Why only the cache was used, and which cache: for the end of an error message."""
    why = "HF_HUB_OFFLINE=1" if offline() else f"the Hub could not be reached at {endpoint()}"
    return f"{why}; cache: {cache_dir(cache)}"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (the hub's messages span several), shortened."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
