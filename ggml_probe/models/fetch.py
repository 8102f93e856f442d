"""GGUF files from Hugging Face model repos, through huggingface_hub's own cache.

Downloads go through `hf_hub_download`, so the Hugging Face conventions hold unchanged: the cache
under `HF_HUB_CACHE` (default `$HF_HOME/hub`), `HF_HUB_OFFLINE=1`, `HF_TOKEN`, `HF_ENDPOINT` and the
library's own progress bars (`HF_HUB_DISABLE_PROGRESS_BARS`). Nothing is copied out of the cache: the
paths returned point into its snapshots.

huggingface_hub is imported inside the functions that need it: it is slow to import, and the file name
helpers here are used by code that never touches the Hub. Offline mode, the cache folder and the
mapping of hub errors to one-line messages are ggml_probe.hub's, shared with the task loader.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .. import hub
from ..errors import HubError, ProbeError
from ..hub import hub_errors, is_unreachable

# Quant labels as they appear in GGUF file names, highest precision first (the order listings use).
# A superset of quant_types.QUANT_TYPES (the ftypes llama.cpp writes; a test checks the cover): file
# names also carry labels that are no ftype, namely the repacked Q4_0_N_M types older llama.cpp wrote
# and the community variants common on the Hub (Q4_K_L: Q4_K_M with Q8_0 embeddings and output;
# unsloth's *_K_XL). Not imported from there: that module imports gguf, and this one must stay cheap.
_QUANT_LADDER: tuple[str, ...] = (
    "F32", "F16", "BF16",
    "Q8_K_XL", "Q8_0",
    "Q6_K_XL", "Q6_K_L", "Q6_K",
    "Q5_K_XL", "Q5_K_L", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_1", "Q5_0",
    "Q4_K_XL", "Q4_K_L", "Q4_K_M", "Q4_K_S", "Q4_K", "Q4_1", "Q4_0_8_8", "Q4_0_4_8", "Q4_0_4_4", "Q4_0",
    "NVFP4", "MXFP4_MOE", "MXFP4", "IQ4_NL", "IQ4_XS",
    "Q3_K_XL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q3_K", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
    "Q2_K_XL", "Q2_K_L", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "TQ2_0", "TQ1_0", "IQ1_M", "IQ1_S", "Q1_0",
)
KNOWN_QUANTS: frozenset[str] = frozenset(_QUANT_LADDER)

# Spellings seen in file names that mean a canonical label.
_QUANT_ALIASES = {"FP16": "F16", "FP32": "F32", "BFLOAT16": "BF16"}

# unsloth's "dynamic" files carry a UD- prefix; they sit beside plain files of the same type in one
# repo, so the prefix stays part of the label.
_DYNAMIC_PREFIX = "UD-"

_QUANT_PATTERN = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:"
    + "|".join(sorted((re.escape(q) for q in (*_QUANT_LADDER, *_QUANT_ALIASES)), key=len, reverse=True))
    + r"))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT_PATTERN = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")

# Multimodal projector files (llava-style `mmproj-*.gguf`) carry a quant label too but are not
# language models; grouping them with the model file of the same type would fetch both.
_PROJECTOR_PREFIX = "mmproj"


def canonical_quant(label: str) -> str:
    """The canonical spelling of a quant label a user typed (`q4_k_m`, `Q4-K-M` → `Q4_K_M`; `fp16` → `F16`)."""
    text = label.strip().upper()
    prefix = ""
    if text.startswith(_DYNAMIC_PREFIX):
        prefix, text = _DYNAMIC_PREFIX, text[len(_DYNAMIC_PREFIX):]
    text = text.replace("-", "_")
    return prefix + _QUANT_ALIASES.get(text, text)


def quant_of_filename(name: str) -> str | None:
    """The quant label in a GGUF file name, canonical upper case, or None when it carries none.

    `Llama-3-8B-Instruct.Q4_K_M.gguf` → `Q4_K_M`; `qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf`
    → `Q4_K_M`; `ggml-model-f16.gguf` → `F16`; `Qwen3-30B-A3B-UD-Q4_K_XL.gguf` → `UD-Q4_K_XL`.
    Folders in a repo path are ignored unless the file name itself has no label. When a name holds
    several labels the one ending last wins: the type comes last in the naming conventions in use.
    """
    path = name.replace("\\", "/")
    for part in (path.rsplit("/", 1)[-1], path):
        # At each position the alternation takes the longest label (they are sorted by length), so
        # `Q4_0_4_4` is not read as `Q4_0`; labels never overlap, so the last match is the one ending last.
        matches = _QUANT_PATTERN.findall(_strip_gguf_suffix(part))
        if matches:
            return canonical_quant(matches[-1])
    return None


def _strip_gguf_suffix(name: str) -> str:
    split = _SPLIT_PATTERN.match(name)
    if split:
        return split.group("base")
    return name[:-5] if name.lower().endswith(".gguf") else name


def split_parts(name: str) -> tuple[str, int, int] | None:
    """(base, index, total) of a llama.cpp split file name `BASE-00001-of-00003.gguf`, else None.

    `base` keeps any folder prefix; index counts from 1.
    """
    match = _SPLIT_PATTERN.match(name)
    if match is None:
        return None
    index, total = int(match.group("index")), int(match.group("total"))
    if not 1 <= index <= total:
        return None
    return match.group("base"), index, total


def split_shard_names(name: str) -> list[str]:
    """Every shard of the split file `name` belongs to, first shard first; `[name]` if not split.

    The names are built from the pattern (`gguf-split` numbers shards with 5 digits), so a listing
    that lacks a shard still leads to a clear "not found" for the missing one.
    """
    parts = split_parts(name)
    if parts is None:
        return [name]
    base, _, total = parts
    return [f"{base}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def is_projector(name: str) -> bool:
    """Whether a repo file is a multimodal projector (`mmproj-*.gguf`), not a language model."""
    return name.replace("\\", "/").rsplit("/", 1)[-1].lower().startswith(_PROJECTOR_PREFIX)


def quant_sort_key(quant: str) -> tuple[int, str]:
    """Order labels from highest to lowest precision; unknown ones last, alphabetically."""
    base = quant[len(_DYNAMIC_PREFIX):] if quant.startswith(_DYNAMIC_PREFIX) else quant
    try:
        return _QUANT_LADDER.index(base), quant
    except ValueError:
        return len(_QUANT_LADDER), quant


def _file_sort_key(name: str) -> tuple[str, int]:
    parts = split_parts(name)
    return (parts[0], parts[1]) if parts else (_strip_gguf_suffix(name), 0)


@dataclass(frozen=True)
class GgufListing:
    """The GGUF files of one repo at one revision, grouped by quant label.

    `quants` maps a canonical label to its files, shards of a split file consecutive and first shard
    first. `other` holds GGUF files with no recognisable label and multimodal projectors (fetch those
    by file name). `sizes` gives bytes per file where known. `offline` is True when the Hub could not
    be reached (HF_HUB_OFFLINE=1 or no network): the listing then shows only what is in the local
    cache, at the cached commit of the revision.
    """

    repo_id: str
    revision: str
    commit: str | None
    quants: dict[str, list[str]]
    other: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    offline: bool = False

    def files(self) -> list[str]:
        """Every GGUF file in the listing."""
        return [f for group in self.quants.values() for f in group] + list(self.other)

    def total_size(self, quant: str) -> int | None:
        """Bytes of all files of a quant, or None if any size is unknown."""
        sizes = [self.sizes.get(f) for f in self.quants.get(canonical_quant(quant), [])]
        return None if not sizes or None in sizes else sum(sizes)


def group_gguf_files(names: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Group repo file names into (quant → files, unlabeled files); non-GGUF names are dropped."""
    quants: dict[str, list[str]] = {}
    other: list[str] = []
    for name in names:
        if not name.lower().endswith(".gguf"):
            continue
        quant = None if is_projector(name) else quant_of_filename(name)
        if quant is None:
            other.append(name)
        else:
            quants.setdefault(quant, []).append(name)
    ordered = {q: sorted(quants[q], key=_file_sort_key) for q in sorted(quants, key=quant_sort_key)}
    return ordered, sorted(other, key=_file_sort_key)


def list_repo_gguf(
    repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> GgufListing:
    """The GGUF files a Hugging Face model repo offers, grouped by quant label.

    Online this asks the Hub (one `model_info` call, with file sizes). With HF_HUB_OFFLINE=1, or when
    the Hub cannot be reached, it falls back to the files of the repo's cached snapshot and sets
    `offline=True`. Raises HubError (one line) for a missing, gated or disabled repo, an unknown
    revision, or a repo that is neither reachable nor cached.
    """
    from huggingface_hub import HfApi, constants

    rev = revision or constants.DEFAULT_REVISION
    with hub_errors(repo_id, revision=revision, cache_dir=cache_dir):
        _validate_repo_id(repo_id)
        if not hub.offline():
            try:
                info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
            else:
                siblings = info.siblings or []
                quants, other = group_gguf_files(s.rfilename for s in siblings)
                sizes = {s.rfilename: s.size for s in siblings if s.size is not None}
                sizes = {name: size for name, size in sizes.items() if name.lower().endswith(".gguf")}
                return GgufListing(repo_id, rev, info.sha, quants, other, sizes)
        return _cached_listing(repo_id, rev, cache_dir)


def _cached_listing(repo_id: str, revision: str, cache_dir: str | os.PathLike | None) -> GgufListing:
    """The listing from the local cache: the snapshot `refs/<revision>` points at (or the commit)."""
    storage = _repo_cache_folder(repo_id, cache_dir)
    if _COMMIT_PATTERN.fullmatch(revision):
        commit = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            what = repo_id if revision == "main" else f"{repo_id}@{revision}"
            raise HubError(f"offline and {what} is not in the Hugging Face cache ({hub.offline_reason(cache_dir)})")
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    names: list[str] = []
    sizes: dict[str, int] = {}
    if snapshot.is_dir():
        for path in snapshot.rglob("*"):
            if path.name.lower().endswith(".gguf") and path.is_file():  # is_file follows the blob symlink
                name = path.relative_to(snapshot).as_posix()
                names.append(name)
                sizes[name] = path.stat().st_size
    quants, other = group_gguf_files(names)
    return GgufListing(repo_id, revision, commit, quants, other, sizes, offline=True)


def fetch_gguf(
    repo_id: str,
    quants: Sequence[str] = (),
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Download (or find in the Hugging Face cache) GGUF files of a repo; return their local paths.

    Each requested quant resolves through the repo's listing to its files; `filename` names a repo
    file directly. Every shard of a split file is fetched, and the path returned for it is its first
    shard (what llama.cpp loads). One path per distinct model file, in request order.

    Offline (HF_HUB_OFFLINE=1 or no network) cached files are returned as they are. With the network
    down and HF_HUB_OFFLINE unset, huggingface_hub retries an uncached `filename` for about 20 s
    before the error. Raises HubError with a one-line message on any failure; ProbeError when neither
    quants nor filename is given (call `list_repo_gguf` to show what a repo offers).
    """
    from huggingface_hub import hf_hub_download

    wanted: list[str] = []
    # Offline mode (read now), or once the listing has found the Hub unreachable: resolve from the
    # cache alone; huggingface_hub otherwise retries a missing file with backoff for ~20 s.
    cache_only = hub.offline()
    if quants:
        listing = list_repo_gguf(repo_id, revision=revision, cache_dir=cache_dir)
        cache_only = cache_only or listing.offline
        for label in dict.fromkeys(canonical_quant(q) for q in quants):
            files = listing.quants.get(label)
            if not files:
                raise _quant_not_offered(listing, label, cache_dir)
            wanted.extend(files)
    if filename is not None:
        wanted.append(filename.replace("\\", "/").lstrip("/"))
    if not wanted:
        raise ProbeError(f"nothing to fetch from {repo_id}: name a quant or a file")

    firsts: list[Path] = []
    done: set[str] = set()
    for name in wanted:
        shards = split_shard_names(name)
        if shards[0] in done:
            continue
        paths = []
        for shard in shards:
            with hub_errors(repo_id, filename=shard, revision=revision, cache_dir=cache_dir):
                local = hf_hub_download(
                    repo_id, shard, revision=revision, cache_dir=hub.cache_dir(cache_dir), local_files_only=cache_only
                )
                paths.append(Path(local))
        done.update(shards)
        firsts.append(paths[0])
    return firsts


def _quant_not_offered(listing: GgufListing, label: str, cache_dir) -> HubError:
    offered = ", ".join(listing.quants) or "none"
    unknown = "" if _strip_dynamic(label) in KNOWN_QUANTS else f" ({label} is not a llama.cpp quant name)"
    if listing.offline:
        return HubError(
            f"offline and {listing.repo_id} has no {label} file in the Hugging Face cache{unknown};"
            f" cached quants: {offered} ({hub.offline_reason(cache_dir)})"
        )
    if not listing.quants:
        return HubError(f"{listing.repo_id} offers no GGUF file with a quant label{unknown}")
    return HubError(f"{listing.repo_id} offers no {label} GGUF file{unknown}; it offers: {offered}")


def _strip_dynamic(label: str) -> str:
    return label[len(_DYNAMIC_PREFIX):] if label.startswith(_DYNAMIC_PREFIX) else label


def cached_gguf_files(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(repo_id, path) of every GGUF file in the local Hugging Face cache, sorted.

    Each repo file appears once, from the revision `main` points at if it has it, else from another
    referenced revision, else from the most recent one. Every shard of a split file is listed.
    Returns [] when the cache folder does not exist. A repo whose snapshot holds a dangling link
    (a blob deleted by hand) is left out whole: scan_cache_dir reports it as corrupted.
    """
    from huggingface_hub import scan_cache_dir

    # scan_cache_dir's own default is bound at import time; read the environment now instead.
    root = Path(hub.cache_dir(cache_dir)).expanduser()
    if not root.is_dir():
        return []
    found: dict[tuple[str, str], Path] = {}
    for repo in scan_cache_dir(root).repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" not in r.refs, not r.refs, -r.last_modified))
        for rev in revisions:
            for info in rev.files:
                if not info.file_name.lower().endswith(".gguf") or not info.file_path.is_file():
                    continue
                key = (repo.repo_id, info.file_path.relative_to(rev.snapshot_path).as_posix())
                found.setdefault(key, info.file_path)
    return [(repo_id, found[(repo_id, name)]) for repo_id, name in sorted(found)]


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)


def _repo_cache_folder(repo_id: str, cache: str | os.PathLike | None) -> Path:
    from huggingface_hub import constants

    root = Path(hub.cache_dir(cache)).expanduser()
    return root / ("models" + constants.REPO_ID_SEPARATOR + repo_id.replace("/", constants.REPO_ID_SEPARATOR))
