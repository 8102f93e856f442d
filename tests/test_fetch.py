"""ggml_probe.models.fetch against a real Hugging Face cache folder built in tmp.

No network and no stand-ins for huggingface_hub: the cache has the hub layout (refs/, blobs/,
snapshots/ with symlinks), holds real GGUF files written with gguf-py, and offline mode makes
`hf_hub_download` resolve every request from it the way it does on a user's machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggml_probe.errors import HubError, ProbeError
from ggml_probe.hub import hub_error, hub_errors
from ggml_probe.models import fetch
from ggml_probe.models.fetch import (
    cached_gguf_files,
    canonical_quant,
    fetch_gguf,
    group_gguf_files,
    list_repo_gguf,
    quant_of_filename,
    split_parts,
    split_shard_names,
)

REPO = "test-org/Tiny-GGUF"
MAIN_COMMIT = "a" * 40
OLD_COMMIT = "b" * 40
LABEL_KEY = "ggml_probe.test.file"  # each test GGUF records its own file name under this key

# The main revision: three complete quants (one split in two shards), one split with a shard missing
# (an interrupted download), a multimodal projector, a file stored in a subfolder, and a non-GGUF file.
MAIN_FILES = [
    "Tiny-F16.gguf",
    "Tiny-Q8_0.gguf",
    "Tiny-Q4_K_M-00001-of-00002.gguf",
    "Tiny-Q4_K_M-00002-of-00002.gguf",
    "Tiny-Q3_K_M-00001-of-00002.gguf",
    "mmproj-Tiny-f16.gguf",
    "extra/Tiny-IQ4_XS.gguf",
]
OLD_FILES = ["Tiny-Q4_0.gguf", "Tiny-Q8_0.gguf"]


# -- building a Hugging Face cache -----------------------------------------------------------------


def write_tiny_gguf(path: Path, name: str) -> bytes:
    """A real GGUF file (a few KV pairs, one small tensor); returns its bytes."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny")
    writer.add_string(LABEL_KEY, name)
    split = split_parts(name)
    if split:  # the keys llama.cpp's gguf-split writes into every shard
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, split[1] - 1)
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split[2])
        writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, split[2])
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    writer.add_tensor("token_embd.weight", np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def add_snapshot(
    hub: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",), repo_type="model", copies=()
) -> Path:
    """Lay files out as huggingface_hub does: blobs named by their hash, snapshot entries as relative
    symlinks to them (or plain copies, as on file systems without symlinks), refs naming the commit."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = snapshot / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        if name in copies:
            entry.write_bytes(data)
        else:
            entry.symlink_to(os.path.relpath(blob, entry.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def gguf_bytes(tmp: Path, names) -> dict[str, bytes]:
    out = {}
    for name in names:
        scratch = tmp / "scratch" / name.replace("/", "_")
        scratch.parent.mkdir(parents=True, exist_ok=True)
        out[name] = write_tiny_gguf(scratch, name.rsplit("/", 1)[-1])
    return out


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> dict:
    """A hub cache folder: REPO at two revisions, plus a dataset repo holding a GGUF file."""
    root = tmp_path_factory.mktemp("hf")
    hub = root / "home" / "hub"  # the default $HF_HOME/hub layout, for the environment test
    main_data = gguf_bytes(root, MAIN_FILES)
    main_data["README.md"] = b"# Tiny\n"
    main = add_snapshot(hub, REPO, MAIN_COMMIT, main_data, copies=("Tiny-F16.gguf",))
    old_data = gguf_bytes(root, OLD_FILES)
    old = add_snapshot(hub, REPO, OLD_COMMIT, old_data, refs=("v1.0",))
    add_snapshot(hub, "test-org/data", "c" * 40, gguf_bytes(root, ["Data-Q8_0.gguf"]), repo_type="dataset")
    return {"root": root, "hub": hub, "main": main, "old": old, "main_data": main_data, "old_data": old_data}


def without_hub_env(monkeypatch) -> None:
    """ggml_probe.hub reads these variables before huggingface_hub's constants: a test that sets the
    constants must not see the ones of the shell it runs in."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 with the cache above. huggingface_hub reads these variables once, at import,
    into `huggingface_hub.constants`, which its functions consult at call time: set both."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache["hub"]))
    return hub_cache["hub"]


def label_of(path: Path) -> str:
    """The file name a test GGUF recorded in itself: proves which file a path really is."""
    return gguf.GGUFReader(path).fields[LABEL_KEY].contents()


# -- file names --------------------------------------------------------------------------------------

NAMES = [
    ("Llama-3-8B-Instruct.Q4_K_M.gguf", "Q4_K_M"),
    ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "Q4_K_M"),
    ("qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf", "Q4_K_M"),
    ("model-IQ4_XS.gguf", "IQ4_XS"),
    ("ggml-model-f16.gguf", "F16"),
    ("Meta-Llama-3.1-8B-Instruct-bf16.gguf", "BF16"),
    ("Mistral-7B-Instruct-v0.3.fp16.gguf", "F16"),
    ("ggml-model-f32.gguf", "F32"),
    ("tinyllama-1.1b-chat-v1.0.Q8_0.gguf", "Q8_0"),
    ("Meta-Llama-3-70B-Instruct-IQ2_XXS.gguf", "IQ2_XXS"),
    ("Phi-3.5-mini-instruct-Q4_0_4_4.gguf", "Q4_0_4_4"),
    ("Phi-3.5-mini-instruct-Q4_0.gguf", "Q4_0"),
    ("gemma-2-9b-it-Q6_K_L.gguf", "Q6_K_L"),
    ("Qwen3-30B-A3B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
    ("Q4_K_M/DeepSeek-R1-Q4_K_M-00003-of-00009.gguf", "Q4_K_M"),
    ("IQ1_S/DeepSeek-R1-00001-of-00003.gguf", "IQ1_S"),  # label only in the folder
    ("gpt-oss-20b-mxfp4.gguf", "MXFP4"),
    ("llama-2-7b-chat.Q3_K_S.gguf", "Q3_K_S"),
    ("model_q5_k_s.gguf", "Q5_K_S"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("BitNet-b1.58-2B-TQ2_0.gguf", "TQ2_0"),
    ("Qwen2.5-0.5B-Instruct-Q2_K.gguf", "Q2_K"),
    ("Meta-Llama-3-8B-Instruct-Q8_0-f16.gguf", "F16"),  # two labels: the last one is the file's type
    ("Phi-3-mini-4k-instruct-q4.gguf", None),  # "q4" alone is no llama.cpp type
    ("model.gguf", None),
    ("llama-7b.q8_0x.gguf", None),  # a label must end at a separator or the end
]


@pytest.mark.parametrize("name, quant", NAMES)
def test_quant_of_filename(name, quant):
    assert quant_of_filename(name) == quant


def test_every_llama_file_type_is_recognised():
    """File names cover each ftype of the quantize registry (gguf-py's LlamaFileType), in either case."""
    from ggml_probe.models.quant_types import QUANT_TYPES

    assert len(QUANT_TYPES) > 30
    for label in QUANT_TYPES:
        assert quant_of_filename(f"Some-Model-7B.{label.lower()}.gguf") == label
        assert quant_of_filename(f"Some-Model-7B-{label}-00002-of-00004.gguf") == label


def test_canonical_quant():
    assert [canonical_quant(q) for q in ("q4_k_m", " Q8_0 ", "fp16", "ud-q4_k_xl", "q4-k-m")] == [
        "Q4_K_M", "Q8_0", "F16", "UD-Q4_K_XL", "Q4_K_M"]


def test_split_parts_and_shard_names():
    assert split_parts("m-Q4_K_M-00002-of-00003.gguf") == ("m-Q4_K_M", 2, 3)
    assert split_parts("dir/m-00001-of-00001.GGUF") == ("dir/m", 1, 1)
    assert split_parts("m-Q4_K_M.gguf") is None
    assert split_parts("m-00004-of-00003.gguf") is None  # index past the count
    assert split_parts("m-0001-of-0003.gguf") is None  # gguf-split writes five digits
    assert split_shard_names("d/m-00002-of-00003.gguf") == [
        "d/m-00001-of-00003.gguf", "d/m-00002-of-00003.gguf", "d/m-00003-of-00003.gguf"]
    assert split_shard_names("m.gguf") == ["m.gguf"]


def test_grouping_orders_quants_and_shards():
    quants, other = group_gguf_files([
        "m-Q4_K_M-00002-of-00002.gguf", "README.md", "m-Q8_0.gguf", "m-Q4_K_M-00001-of-00002.gguf",
        "m-IQ2_XS.gguf", "mmproj-m-f16.gguf", "m-f16.gguf", "m.gguf", "m-UD-Q4_K_XL.gguf",
    ])
    assert quants == {
        "F16": ["m-f16.gguf"],
        "Q8_0": ["m-Q8_0.gguf"],
        "UD-Q4_K_XL": ["m-UD-Q4_K_XL.gguf"],
        "Q4_K_M": ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"],
        "IQ2_XS": ["m-IQ2_XS.gguf"],
    }
    assert list(quants) == ["F16", "Q8_0", "UD-Q4_K_XL", "Q4_K_M", "IQ2_XS"]
    assert other == ["m.gguf", "mmproj-m-f16.gguf"]


# -- listing ------------------------------------------------------------------------------------------


def test_list_from_cache_when_offline(offline, hub_cache):
    listing = list_repo_gguf(REPO)
    assert listing.offline and listing.commit == MAIN_COMMIT and listing.revision == "main"
    assert listing.quants == {
        "F16": ["Tiny-F16.gguf"],
        "Q8_0": ["Tiny-Q8_0.gguf"],
        "Q4_K_M": ["Tiny-Q4_K_M-00001-of-00002.gguf", "Tiny-Q4_K_M-00002-of-00002.gguf"],
        "IQ4_XS": ["extra/Tiny-IQ4_XS.gguf"],
        "Q3_K_M": ["Tiny-Q3_K_M-00001-of-00002.gguf"],
    }
    assert listing.other == ["mmproj-Tiny-f16.gguf"]
    data = hub_cache["main_data"]
    assert listing.sizes == {name: len(data[name]) for name in MAIN_FILES}
    assert listing.total_size("q4_k_m") == len(data[MAIN_FILES[2]]) + len(data[MAIN_FILES[3]])
    assert set(listing.files()) == set(MAIN_FILES)


def test_list_other_revisions_from_cache(offline):
    tagged = list_repo_gguf(REPO, revision="v1.0")
    assert tagged.commit == OLD_COMMIT and tagged.quants == {"Q8_0": ["Tiny-Q8_0.gguf"], "Q4_0": ["Tiny-Q4_0.gguf"]}
    assert list_repo_gguf(REPO, revision=OLD_COMMIT).quants == tagged.quants
    with pytest.raises(HubError, match=r"^offline and test-org/Tiny-GGUF@v9 is not in the Hugging Face cache"):
        list_repo_gguf(REPO, revision="v9")


def test_list_missing_repo_offline(offline):
    with pytest.raises(HubError) as err:
        list_repo_gguf("nobody/Nothing-GGUF")
    message = str(err.value)
    assert message.startswith("offline and nobody/Nothing-GGUF is not in the Hugging Face cache (HF_HUB_OFFLINE=1")
    assert str(offline) in message and "\n" not in message


def test_invalid_repo_id(offline):
    with pytest.raises(HubError, match="not a valid Hugging Face repo id: 'not a repo'"):
        list_repo_gguf("not a repo")


# -- fetching -----------------------------------------------------------------------------------------


def test_fetch_quants_resolve_through_hf_hub_download(offline, hub_cache):
    paths = fetch_gguf(REPO, quants=["q8_0", "Q4_K_M", "F16", "Q8_0"])  # case and a repeat
    main = hub_cache["main"]
    assert paths == [main / "Tiny-Q8_0.gguf", main / "Tiny-Q4_K_M-00001-of-00002.gguf", main / "Tiny-F16.gguf"]
    assert [label_of(p) for p in paths] == ["Tiny-Q8_0.gguf", "Tiny-Q4_K_M-00001-of-00002.gguf", "Tiny-F16.gguf"]
    # the blob behind the link is byte for byte the file written into the cache
    assert paths[0].read_bytes() == hub_cache["main_data"]["Tiny-Q8_0.gguf"]
    assert paths[0].is_symlink() and paths[0].resolve().parent.name == "blobs"


def test_fetch_split_needs_every_shard(offline):
    """Q3_K_M's second shard never arrived: the fetch names it instead of returning a half model."""
    with pytest.raises(HubError) as err:
        fetch_gguf(REPO, quants=["Q3_K_M"])
    assert str(err.value).startswith(
        "offline and test-org/Tiny-GGUF/Tiny-Q3_K_M-00002-of-00002.gguf is not in the Hugging Face cache")


def test_fetch_by_file(offline, hub_cache):
    main = hub_cache["main"]
    assert fetch_gguf(REPO, filename="mmproj-Tiny-f16.gguf") == [main / "mmproj-Tiny-f16.gguf"]
    assert fetch_gguf(REPO, filename="extra/Tiny-IQ4_XS.gguf") == [main / "extra" / "Tiny-IQ4_XS.gguf"]
    # naming any shard fetches the whole split and returns the first shard
    first = fetch_gguf(REPO, filename="Tiny-Q4_K_M-00002-of-00002.gguf")
    assert first == [main / "Tiny-Q4_K_M-00001-of-00002.gguf"]
    # a quant and a file together; the same file twice is fetched once
    both = fetch_gguf(REPO, quants=["F16"], filename="Tiny-F16.gguf")
    assert both == [main / "Tiny-F16.gguf"]


def test_fetch_at_revision(offline, hub_cache):
    old = hub_cache["old"]
    assert fetch_gguf(REPO, quants=["Q4_0"], revision="v1.0") == [old / "Tiny-Q4_0.gguf"]
    assert fetch_gguf(REPO, filename="Tiny-Q8_0.gguf", revision=OLD_COMMIT) == [old / "Tiny-Q8_0.gguf"]
    assert label_of(old / "Tiny-Q4_0.gguf") == "Tiny-Q4_0.gguf"
    with pytest.raises(HubError, match="cached quants: F16, Q8_0, Q4_K_M, IQ4_XS, Q3_K_M"):
        fetch_gguf(REPO, quants=["Q4_0"])  # only the old revision has it


def test_uncached_file_offline(offline):
    with pytest.raises(HubError) as err:
        fetch_gguf(REPO, filename="Tiny-Q5_K_M.gguf")
    message = str(err.value)
    assert message.startswith("offline and test-org/Tiny-GGUF/Tiny-Q5_K_M.gguf is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_missing_repo_offline(offline):
    for call in (lambda: fetch_gguf("nobody/Nothing-GGUF", quants=["Q4_K_M"]),
                 lambda: fetch_gguf("nobody/Nothing-GGUF", filename="x-Q4_K_M.gguf")):
        with pytest.raises(HubError, match=r"^offline and nobody/Nothing-GGUF(/x-Q4_K_M\.gguf)? is not in the"):
            call()


def test_quant_not_offered_lists_offered(offline):
    with pytest.raises(HubError) as err:
        fetch_gguf(REPO, quants=["Q4_K_M", "Q5_K_M"])
    assert str(err.value) == (
        f"offline and {REPO} has no Q5_K_M file in the Hugging Face cache; cached quants: "
        f"F16, Q8_0, Q4_K_M, IQ4_XS, Q3_K_M (HF_HUB_OFFLINE=1; cache: {offline})"
    )
    with pytest.raises(HubError, match=r"Q4_K_MM is not a llama.cpp quant name"):
        fetch_gguf(REPO, quants=["Q4_K_MM"])


def test_online_quant_not_offered_message():
    listing = fetch.GgufListing(REPO, "main", MAIN_COMMIT, {"Q8_0": ["m-Q8_0.gguf"], "F16": ["m-f16.gguf"]})
    message = str(fetch._quant_not_offered(listing, "Q2_K", None))
    assert message == f"{REPO} offers no Q2_K GGUF file; it offers: Q8_0, F16"


def test_nothing_to_fetch(offline):
    with pytest.raises(ProbeError, match="nothing to fetch"):
        fetch_gguf(REPO)


# -- the cache as a whole -------------------------------------------------------------------------


def test_cached_gguf_files(offline, hub_cache):
    found = cached_gguf_files()
    main, old = hub_cache["main"], hub_cache["old"]
    # every model GGUF once, sorted by name in the repo; Tiny-Q8_0.gguf is in both revisions and comes
    # from the one `main` points at; the dataset repo's GGUF is no model and is left out
    by_name = {name: main / name for name in MAIN_FILES} | {"Tiny-Q4_0.gguf": old / "Tiny-Q4_0.gguf"}
    assert found == [(REPO, by_name[name]) for name in sorted(by_name)]
    assert cached_gguf_files(offline.parent / "no-such-cache") == []


def test_store_lists_hub_cache(offline, hub_cache, monkeypatch, tmp_path):
    """store.list_local_models picks the cache files up through cached_gguf_files."""
    from ggml_probe.models.store import list_local_models

    monkeypatch.setenv("GGML_PROBE_MODELS", str(tmp_path / "empty"))
    hub = {m.name: m.size for m in list_local_models() if m.source == "hf-cache"}
    # each file once (Tiny-Q8_0 from the revision main points at), with the size of the bytes written into the cache
    written = {f"{REPO}/{Path(name).name}": len(data) for name, data in hub_cache["main_data"].items()
               if name.endswith(".gguf")}
    written[f"{REPO}/Tiny-Q4_0.gguf"] = len(hub_cache["old_data"]["Tiny-Q4_0.gguf"])
    assert hub == written


def test_environment_variables_in_a_fresh_process(hub_cache):
    """HF_HOME (no HF_HUB_CACHE) and HF_HUB_OFFLINE as a user sets them, read by a fresh import."""
    script = (
        "import json; from ggml_probe.models.fetch import fetch_gguf, list_repo_gguf, cached_gguf_files\n"
        f"l = list_repo_gguf({REPO!r})\n"
        f"p = fetch_gguf({REPO!r}, quants=['Q4_K_M'])\n"
        "print(json.dumps([l.offline, list(l.quants), [str(x) for x in p], len(cached_gguf_files())]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hub_cache["root"] / "home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    offline_flag, quants, paths, n_cached = json.loads(done.stdout.strip().splitlines()[-1])
    assert offline_flag is True
    assert quants == ["F16", "Q8_0", "Q4_K_M", "IQ4_XS", "Q3_K_M"]
    assert paths == [str(hub_cache["main"] / "Tiny-Q4_K_M-00001-of-00002.gguf")]
    assert n_cached == len(MAIN_FILES) + 1


# -- errors from the Hub, as huggingface_hub raises them --------------------------------------------


def raised_for(status: int, error_code: str | None = None, url: str = f"https://huggingface.co/api/models/{REPO}",
               message: str | None = None):
    """The exception huggingface_hub's own response check raises for a Hub answer."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    headers = {"X-Error-Code": error_code} if error_code else {}
    if message:
        headers["X-Error-Message"] = message
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as exc:  # noqa: BLE001 - the point is to catch what the library raises
        return exc
    raise AssertionError(f"hf_raise_for_status let {status} through")


def test_hub_error_mapping(monkeypatch):
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    without_hub_env(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")  # whatever HF_ENDPOINT says
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    from huggingface_hub.utils import validate_repo_id

    file_url = f"https://huggingface.co/{REPO}/resolve/main/x.gguf"
    gated = raised_for(403, "GatedRepo")
    missing = raised_for(404, "RepoNotFound")
    assert type(gated) is hf.GatedRepoError and type(missing) is hf.RepositoryNotFoundError
    try:
        validate_repo_id("bad repo!")
    except hf.HFValidationError as exc:
        invalid = exc

    cases = [
        (gated, None, None, f"{REPO} is gated: accept its licence at https://huggingface.co/{REPO} and log in"),
        (missing, None, None, f"no model repo {REPO} on the Hugging Face Hub (if it is private"),
        (raised_for(401, "RepoNotFound"), None, None, f"no model repo {REPO}"),
        (raised_for(404, "RevisionNotFound"), None, "v9", f"{REPO} has no revision 'v9'"),
        (raised_for(404, "EntryNotFound", file_url), "x.gguf", None, f"{REPO} has no file x.gguf"),
        (raised_for(404, "EntryNotFound", file_url), "x.gguf", "v1.0", f"{REPO} has no file x.gguf at revision v1.0"),
        (raised_for(403, message="Access to this resource is disabled."), None, None, f"{REPO} has been disabled"),
        (raised_for(401), None, None, f"no model repo {REPO}"),  # the Hub answers 401 for private repos
        (raised_for(401, message="Invalid credentials in Authorization header"), None, None,
         "the Hub refused your credentials (401): log in again"),
        (raised_for(403), "x.gguf", None, f"the Hub refused access to {REPO}/x.gguf (403)"),
        (raised_for(429), None, None, f"the Hub is rate-limiting requests for {REPO} (429)"),
        (raised_for(500), "x.gguf", None, f"offline and {REPO}/x.gguf is not in the Hugging Face cache (the Hub could"),
        (raised_for(400), None, None, f"the Hub answered 400 for {REPO}: Bad request:"),
        (hf.LocalEntryNotFoundError("Cannot find the files"), "x.gguf", None, f"offline and {REPO}/x.gguf is not"),
        (hf.OfflineModeIsEnabled("offline"), "x.gguf", None, f"offline and {REPO}/x.gguf is not"),
        (httpx2.ConnectError("Name or service not known"), None, None, f"offline and {REPO} is not in"),
        (httpx2.ReadTimeout("timed out"), None, None, f"offline and {REPO} is not in"),
        (invalid, None, None, f"not a valid Hugging Face repo id: '{REPO}'"),
        (OSError(28, "No space left on device"), "x.gguf", None, f"could not fetch {REPO}/x.gguf: No space left on"),
    ]
    for exc, filename, revision, start in cases:
        mapped = hub_error(exc, REPO, filename=filename, revision=revision)
        assert isinstance(mapped, HubError), (exc, mapped)
        assert str(mapped).startswith(start), (type(exc).__name__, str(mapped))
        assert "\n" not in str(mapped)
    assert hub_error(ValueError("a bug"), REPO) is None
    # Task data goes through the same mapping, as a dataset repo (tasks/loading.py).
    assert str(hub_error(missing, "org/data", repo_type="dataset")).startswith("no dataset repo org/data on the")
    assert "https://huggingface.co/datasets/org/data and log in" in str(hub_error(gated, "org/data", repo_type="dataset"))


def test_hub_errors_context():
    with pytest.raises(HubError, match=f"{REPO} is gated") as err:
        with hub_errors(REPO):
            raise raised_for(403, "GatedRepo")
    assert type(err.value.__cause__).__name__ == "GatedRepoError"
    with pytest.raises(KeyError):  # a bug stays a bug, with its traceback
        with hub_errors(REPO):
            raise KeyError("x")


# -- the online path, against a Hub stand-in on 127.0.0.1 ------------------------------------------
#
# huggingface_hub runs unchanged (its HTTP client, response checks, download, cache writes); only the
# server end is local. It answers the requests the library makes, with the headers it reads: JSON for
# `model_info`, X-Repo-Commit / ETag / Content-Length for the HEAD before a download, and the Hub's
# X-Error-Code values (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound) for failures.


class LocalHub:
    def __init__(self):
        import http.server
        import threading

        self.repos: dict[str, dict] = {}  # repo_id -> {"sha", "files": {name: bytes}, "gated"}
        self.downloads: list[str] = []  # paths of file GETs, in order
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add(self, repo_id: str, sha: str, files: dict[str, bytes], gated: bool = False):
        self.repos[repo_id] = {"sha": sha, "files": files, "gated": gated}

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _send(handler, status: int, headers: dict, body: bytes, with_body: bool):
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if with_body:
            handler.wfile.write(body)

    def _error(self, handler, status: int, code: str, with_body: bool, commit: str | None = None):
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(handler, status, headers, json.dumps({"error": code}).encode(), with_body)

    def _answer(self, handler, body: bool):
        from urllib.parse import unquote, urlsplit

        parts = [unquote(p) for p in urlsplit(handler.path).path.split("/")[1:]]
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        repo = self.repos.get(repo_id)
        if repo is None:  # what the Hub says to an anonymous client about a missing or private repo
            return self._error(handler, 401, "RepoNotFound", body)
        if api:  # /api/models/ORG/NAME[/revision/REV]
            revision = rest[1] if rest[:1] == ["revision"] else "main"
            if revision not in ("main", repo["sha"]):
                return self._error(handler, 404, "RevisionNotFound", body)
            siblings = [{"rfilename": n, "size": len(d)} for n, d in repo["files"].items()]
            info = {"id": repo_id, "sha": repo["sha"], "gated": "manual" if repo["gated"] else False,
                    "siblings": siblings}
            return self._send(handler, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        # /ORG/NAME/resolve/REV/PATH
        revision, name = rest[1], "/".join(rest[2:])
        if repo["gated"]:
            return self._error(handler, 403, "GatedRepo", body)
        if revision not in ("main", repo["sha"]):
            return self._error(handler, 404, "RevisionNotFound", body)
        if name not in repo["files"]:
            return self._error(handler, 404, "EntryNotFound", body, commit=repo["sha"])
        data = repo["files"][name]
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        if body:
            self.downloads.append(name)
        self._send(handler, 200, headers, data, body)


ONLINE_SHA = "d" * 40


@pytest.fixture
def online(hub_cache, tmp_path, monkeypatch):
    """huggingface_hub online, pointed at a LocalHub serving REPO's main files and a gated repo,
    with an empty cache of its own."""
    from huggingface_hub import constants

    hub = LocalHub()
    files = {n: d for n, d in hub_cache["main_data"].items() if not n.startswith("Tiny-Q3_K_M")}
    hub.add(REPO, ONLINE_SHA, files)
    hub.add("test-org/Gated-GGUF", "e" * 40, {"Gated-Q8_0.gguf": files["Tiny-Q8_0.gguf"]}, gated=True)
    cache = tmp_path / "hub"
    without_hub_env(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    hub.cache = cache
    hub.files = files
    yield hub
    hub.close()


def test_online_listing(online):
    listing = list_repo_gguf(REPO)
    assert not listing.offline and listing.commit == ONLINE_SHA
    assert list(listing.quants) == ["F16", "Q8_0", "Q4_K_M", "IQ4_XS"]
    assert listing.sizes == {n: len(d) for n, d in online.files.items() if n.endswith(".gguf")}
    assert online.downloads == []  # listing downloads nothing


def test_online_fetch_downloads_into_the_cache_then_works_offline(online, monkeypatch):
    from huggingface_hub import constants

    paths = fetch_gguf(REPO, quants=["Q4_K_M"])
    snapshot = online.cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ONLINE_SHA
    assert paths == [snapshot / "Tiny-Q4_K_M-00001-of-00002.gguf"]
    assert online.downloads == ["Tiny-Q4_K_M-00001-of-00002.gguf", "Tiny-Q4_K_M-00002-of-00002.gguf"]
    for shard in online.downloads:
        assert (snapshot / shard).read_bytes() == online.files[shard]
    assert label_of(paths[0]) == "Tiny-Q4_K_M-00001-of-00002.gguf"
    assert (snapshot.parent.parent / "refs" / "main").read_text() == ONLINE_SHA
    assert fetch_gguf(REPO, quants=["Q4_K_M"]) == paths and len(online.downloads) == 2  # cached: no GET

    # the same request later, offline: answered from what was just downloaded
    online.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch_gguf(REPO, quants=["Q4_K_M"]) == paths
    assert list_repo_gguf(REPO).quants == {"Q4_K_M": online.downloads}
    assert cached_gguf_files() == [(REPO, snapshot / n) for n in online.downloads]


def test_online_errors(online):
    with pytest.raises(HubError, match=r"^test-org/Gated-GGUF is gated: accept its licence at http://127\.0\.0\.1:\d+/test-org/Gated-GGUF"):
        fetch_gguf("test-org/Gated-GGUF", quants=["Q8_0"])
    with pytest.raises(HubError, match=r"^no model repo nobody/Nothing-GGUF on the Hugging Face Hub"):
        list_repo_gguf("nobody/Nothing-GGUF")
    with pytest.raises(HubError, match=r"^no model repo nobody/Nothing-GGUF"):
        fetch_gguf("nobody/Nothing-GGUF", filename="x.gguf")
    with pytest.raises(HubError, match=f"^{REPO} has no revision 'v9'$"):
        list_repo_gguf(REPO, revision="v9")
    with pytest.raises(HubError, match=f"^{REPO} has no revision 'v9'$"):
        fetch_gguf(REPO, filename="Tiny-Q8_0.gguf", revision="v9")
    with pytest.raises(HubError, match=f"^{REPO} has no file Tiny-Q5_K_M.gguf$"):
        fetch_gguf(REPO, filename="Tiny-Q5_K_M.gguf")
    with pytest.raises(HubError, match=f"^{REPO} offers no Q2_K GGUF file; it offers: F16, Q8_0, Q4_K_M, IQ4_XS$"):
        fetch_gguf(REPO, quants=["Q2_K"])
    assert online.downloads == []


def test_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch):
    """Network down (a closed port), HF_HUB_OFFLINE unset: the cached files still serve."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    without_hub_env(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache["hub"]))
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    listing = list_repo_gguf(REPO)
    assert listing.offline and listing.commit == MAIN_COMMIT and "Q4_K_M" in listing.quants
    assert fetch_gguf(REPO, quants=["Q8_0"]) == [hub_cache["main"] / "Tiny-Q8_0.gguf"]
    # a file the listing promised but the cache lacks fails at once (no ~20 s of retries)
    missing_shard = r"^offline and .*/Tiny-Q3_K_M-00002-of-00002\.gguf is not in the Hugging Face cache \(the Hub"
    with pytest.raises(HubError, match=missing_shard):
        fetch_gguf(REPO, quants=["Q3_K_M"])


def test_cli_fetch_lists_and_resolves_offline(offline, hub_cache):
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["fetch", REPO])
    assert res.exit_code == 0, res.output
    assert "offline" in res.output and "Q4_K_M" in res.output and "Tiny-Q4_K_M-00002-of-00002.gguf" in res.output
    res = runner.invoke(cli, ["fetch", REPO, "--quant", "q8_0"])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip().splitlines()[-1])
    assert label_of(path) == "Tiny-Q8_0.gguf"
    res = runner.invoke(cli, ["fetch", REPO, "--quant", "Q2_K"])
    assert res.exit_code == 2 and "Q8_0" in res.output and "Traceback" not in res.output
