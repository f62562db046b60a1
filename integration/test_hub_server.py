"""Tests of the local Hub test double against the real huggingface_hub 2.x and transformers 5.x.

In-process tests use `patch_hf_client` (through the `hf_cache` fixture); the subprocess tests use
`LocalHub.client_env` / `HubProcess.client_env`. Both are documented in `hub_server.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from integration.hub_server import (
    LFS_THRESHOLD_BYTES,
    LocalHub,
    _RangeNotSatisfiable,
    git_blob_oid,
    parse_range,
    patch_hf_client,
    spawn_hub_process,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny-gpt2"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer GPT-2 saved by save_pretrained (config, generation config, weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def big_bin_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LFS-sized (> 10 MiB) file on disk, served by streaming."""
    path = tmp_path_factory.mktemp("big") / "blob.bin"
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, not all zeros
    with path.open("wb") as stream:
        for i in range(11):
            stream.write(bytes([i]) + block[1:])
        stream.write(b"tail")
    return path


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything in this process tries to reach a non-loopback address."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host not in ("127.0.0.1", "localhost", "::1", None):
            raise AssertionError(f"DNS lookup of {host!r} attempted during a hub test")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            assert isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1"), address
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with LocalHub().serve() as running:
        yield running


@pytest.fixture
def hf_cache(tmp_path: Path, hub: LocalHub) -> Iterator[Path]:
    """Point this process's huggingface_hub/transformers at `hub`, with a fresh cache."""
    cache = tmp_path / "hf-cache"
    with patch_hf_client(hub.endpoint, cache):
        yield cache


def assert_same_tree(snapshot: Path, source: dict[str, bytes]) -> None:
    got = {
        p.relative_to(snapshot).as_posix(): p.read_bytes()
        for p in snapshot.rglob("*")
        if p.is_file()
    }
    assert got == source


# --------------------------------------------------------------------------------------------------
# Metadata API
# --------------------------------------------------------------------------------------------------


def test_model_info_sha_and_sibling_hashes(
    hub: LocalHub, hf_cache: Path, tiny_gpt2_dir: Path
) -> None:
    sha = hub.add_repo_from_dir(REPO, tiny_gpt2_dir, pipeline_tag="text-generation")
    info = HfApi(endpoint=hub.endpoint).model_info(REPO, files_metadata=True)

    assert info.sha == sha
    assert info.pipeline_tag == "text-generation"
    assert info.config == {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "generation_config.json", "model.safetensors"}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None
    assert weights.lfs.sha256 == sha256_file(tiny_gpt2_dir / "model.safetensors")
    assert weights.size == weights.lfs.size == (tiny_gpt2_dir / "model.safetensors").stat().st_size
    config = siblings["config.json"]
    assert config.lfs is None
    assert config.blob_id == git_blob_oid((tiny_gpt2_dir / "config.json").read_bytes())
    assert [r.query for r in hub.find_requests(route="repo_info")] == ["blobs=true"]


def test_model_info_by_revision_and_tree_pagination(hub: LocalHub, hf_cache: Path) -> None:
    first = hub.add_repo(REPO, {"a.txt": b"1", "d/b.txt": b"2", "d/e/c.bin": b"3"})
    second = hub.add_repo(REPO, {"a.txt": b"1 changed"}, keep_existing=True)
    hub.create_branch(REPO, "refs/pr/1", revision=first)
    api = HfApi()  # patched module constants, no endpoint argument

    assert api.model_info(REPO).sha == second
    assert api.model_info(REPO, revision=first).sha == first
    assert api.model_info(REPO, revision="refs/pr/1").sha == first
    assert api.model_info(REPO, revision=first[:10]).sha == first
    assert Path(hf_hub_download(REPO, "a.txt", revision="refs/pr/1")).read_bytes() == b"1"
    assert Path(hf_hub_download(REPO, "a.txt")).read_bytes() == b"1 changed"
    expanded = api.model_info(REPO, expand=["siblings", "sha"])
    assert expanded.sha == second and len(expanded.siblings) == 3 and expanded.tags is None

    hub.tree_page_size = 2
    tree = list(api.list_repo_tree(REPO, recursive=True, revision=first, expand=True))
    assert [e.path for e in tree] == ["d", "d/e", "a.txt", "d/b.txt", "d/e/c.bin"]
    assert len(hub.find_requests(route="tree")) == 3  # followed the Link header twice
    by_path = {e.path: e for e in tree}
    assert by_path["d/e/c.bin"].lfs.sha256 == hashlib.sha256(b"3").hexdigest()
    assert by_path["a.txt"].last_commit.oid == first

    top = [e.path for e in api.list_repo_tree(REPO, path_in_repo="d")]
    assert top == ["d/e", "d/b.txt"]
    latest = {e.path: e for e in api.list_repo_tree(REPO, expand=True)}
    assert latest["a.txt"].last_commit.oid == second
    assert latest["d"].last_commit.oid == first  # unchanged directory keeps its old commit


def test_hub_errors_map_to_huggingface_hub_exceptions(hub: LocalHub, hf_cache: Path) -> None:
    sha = hub.add_repo(REPO, {"config.json": b"{}"})
    api = HfApi()

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40)
    with pytest.raises(HfHubHTTPError) as whoami:
        api.whoami(token="hf_not_a_real_token")  # without a token it never reaches the server
    assert whoami.value.response.status_code == 401

    # The EntryNotFound 404 carries X-Repo-Commit, so huggingface_hub caches the miss.
    assert (hf_cache / "models--org--tiny-gpt2" / ".no_exist" / sha / "missing.json").exists()
    statuses = {(r.route, r.status) for r in hub.requests}
    assert {("repo_info", 404), ("resolve", 404), ("whoami", 401)} <= statuses


def test_dataset_repo_and_range_requests(hub: LocalHub, hf_cache: Path) -> None:
    hub.add_repo("org/data", {"train/part-0.csv": b"a,b\n1,2\n"}, repo_type="dataset")
    path = hf_hub_download("org/data", "train/part-0.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"

    url = f"{hub.endpoint}/datasets/org/data/resolve/main/train/part-0.csv"
    response = httpx2.get(url, headers={"Range": "bytes=4-"})
    assert response.status_code == 206
    assert response.content == b"1,2\n"
    assert response.headers["Content-Range"] == "bytes 4-7/8"
    assert httpx2.get(url, headers={"Range": "bytes=8-"}).status_code == 416
    assert not any(k.lower().startswith("x-xet") for k in response.headers)


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-", 10) == (2, 9)
    assert parse_range("bytes=2-4", 10) == (2, 4)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=0-99", 10) == (0, 9)
    assert parse_range("bytes=1-2,4-5", 10) is None  # multi-range: ignored, whole file
    with pytest.raises(_RangeNotSatisfiable):
        parse_range("bytes=10-", 10)


# --------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------


def test_snapshot_download_by_sha_then_main_after_second_commit(
    hub: LocalHub, hf_cache: Path, tiny_gpt2_dir: Path
) -> None:
    source = {p.name: p.read_bytes() for p in tiny_gpt2_dir.iterdir()}
    first = hub.add_repo_from_dir(REPO, tiny_gpt2_dir)

    snapshot = Path(snapshot_download(REPO, revision=first))
    assert snapshot == hf_cache / "models--org--tiny-gpt2" / "snapshots" / first
    assert_same_tree(snapshot, source)
    assert hub.find_requests(route="repo_info") == []  # a sha needs no resolution
    assert sorted(hub.downloads(REPO)) == sorted(source)

    changed = {
        **source,
        "config.json": source["config.json"].replace(b'"n_embd"', b'"n_ctx": 32, "n_embd"'),
    }
    second = hub.add_repo(REPO, changed, message="second")
    hub.clear_requests()
    latest = Path(snapshot_download(REPO, revision="main"))
    assert latest.name == second != first
    assert_same_tree(latest, changed)
    assert (hf_cache / "models--org--tiny-gpt2" / "refs" / "main").read_text() == second
    assert hub.downloads(REPO) == ["config.json"]  # other blobs are shared with the first commit

    # The old commit stays resolvable.
    assert hub.head(REPO, first) == first
    assert HfApi().model_info(REPO, revision=first).sha == first


def test_large_file_is_streamed_and_resumes_after_dropped_connection(
    hub: LocalHub, hf_cache: Path, big_bin_file: Path
) -> None:
    hub.add_repo(REPO, {"weights/blob.bin": big_bin_file, "small.bin": b"tiny weights"})
    blob = hub.file_blob(REPO, "weights/blob.bin")
    assert blob.is_lfs and blob.data is None and blob.source == big_bin_file.resolve()
    assert blob.size > LFS_THRESHOLD_BYTES
    assert hub.file_blob(REPO, "small.bin").is_lfs  # LFS by suffix

    # huggingface_hub reads the body with iter_bytes(chunk_size=10 MiB): bytes received before a
    # drop only count in whole 10 MiB chunks. A drop inside the first chunk => full restart (200).
    hub.set_faults(path_glob="weights/*.bin", drop_after_bytes=3 * 1024 * 1024, times=1)
    path = hf_hub_download(REPO, "weights/blob.bin")
    assert sha256_file(path) == sha256_file(big_bin_file) == blob.sha256
    gets = hub.find_requests(method="GET", filename="weights/blob.bin")
    assert [(g.status, g.dropped, g.range) for g in gets] == [(200, True, None), (200, False, None)]
    assert hub.faults.fired == 1

    # A drop after the first 10 MiB chunk => resume with a Range request (206).
    hub.clear_requests()
    cut, chunk = 10 * 1024 * 1024 + 12345, 10 * 1024 * 1024
    hub.set_faults(path_glob="weights/*.bin", drop_after_bytes=cut, times=1)
    path = hf_hub_download(REPO, "weights/blob.bin", force_download=True)
    assert sha256_file(path) == blob.sha256
    gets = hub.find_requests(method="GET", filename="weights/blob.bin")
    assert [(g.status, g.dropped, g.bytes_sent, g.range) for g in gets] == [
        (200, True, cut, None),
        (206, False, blob.size - chunk, f"bytes={chunk}-"),
    ]


def test_changed_source_file_is_a_500_not_silent_new_content(
    hub: LocalHub, hf_cache: Path, big_bin_file: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.bin"
    shutil.copyfile(big_bin_file, copy)
    hub.add_repo(REPO, {"blob.bin": copy})
    with copy.open("r+b") as stream:
        stream.truncate(1024)

    with pytest.raises(HfHubHTTPError) as error:
        hf_hub_download(REPO, "blob.bin")
    assert error.value.response.status_code == 500
    assert "changed on disk" in str(error.value)


def test_corrupt_bytes_are_not_detected_by_huggingface_hub(hub: LocalHub, hf_cache: Path) -> None:
    content = bytes(range(256)) * 64
    hub.add_repo(REPO, {"model.safetensors": content})
    etag = hub.file_blob(REPO, "model.safetensors").etag
    hub.set_faults(path_glob="*.safetensors", corrupt=True, times=1)

    path = hf_hub_download(REPO, "model.safetensors")  # no error: size matches, no hash check
    assert Path(path).resolve().name == etag  # stored under the true etag...
    assert sha256_file(path) != etag  # ...with the wrong bytes: detectable only by hashing
    assert hub.requests[-1].faults == (f"corrupt:{len(content) // 2}",)

    fixed = hf_hub_download(REPO, "model.safetensors", force_download=True)
    assert sha256_file(fixed) == etag


def test_http_500_on_download_body_is_not_retried(hub: LocalHub, hf_cache: Path) -> None:
    hub.add_repo(REPO, {"config.json": b"{}"})
    hub.set_faults(path_glob="config.json", methods=("GET",), status_code=500)

    with pytest.raises(HfHubHTTPError) as error:
        hf_hub_download(REPO, "config.json")
    assert error.value.response.status_code == 500
    assert [(r.method, r.status) for r in hub.requests] == [("HEAD", 200), ("GET", 500)]


def test_http_500_on_head_is_retried_with_backoff(
    hub: LocalHub, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.utils._http as hf_http

    hub.add_repo(REPO, {"config.json": b"{}", "other.json": b"[]"})
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http.time, "sleep", sleeps.append)  # the server never uses time.sleep

    hub.set_faults(path_glob="config.json", methods=("HEAD",), status_code=500, times=1)
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b"{}"
    assert [r.status for r in hub.find_requests(method="HEAD")] == [500, 200]
    assert sleeps == []  # the retry is immediate (the first HEAD is the no-retry attempt)

    hub.set_faults(path_glob="other.json", methods=("HEAD",), status_code=500)  # persistent
    with pytest.raises(LocalEntryNotFoundError) as error:
        hf_hub_download(REPO, "other.json")
    assert isinstance(error.value.__cause__, HfHubHTTPError)
    assert sleeps == [1, 2, 4, 8, 8]
    assert len(hub.find_requests(method="HEAD", filename="other.json")) == 7


def test_api_faults_delay_and_status(hub: LocalHub, hf_cache: Path) -> None:
    hub.add_repo(REPO, {"config.json": b"{}"})
    api = HfApi()
    hub.set_faults(scope="api", path_glob="/api/models/*", status_code=503, delay_s=0.2, times=1)

    started = time.monotonic()
    with pytest.raises(HfHubHTTPError) as error:
        api.model_info(REPO)  # model_info does not retry
    assert time.monotonic() - started >= 0.2
    assert error.value.response.status_code == 503
    assert api.model_info(REPO).sha == hub.head(REPO)
    assert [r.faults for r in hub.requests] == [("delay:0.2", "status:503"), ()]


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------


def test_transformers_loads_tiny_gpt2_in_process(
    hub: LocalHub, hf_cache: Path, tiny_gpt2_dir: Path
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

    sha = hub.add_repo_from_dir(REPO, tiny_gpt2_dir)
    config = AutoConfig.from_pretrained(REPO, revision=sha)
    assert (config.model_type, config.n_embd, config.n_layer) == ("gpt2", 16, 1)

    model = AutoModelForCausalLM.from_pretrained(REPO)
    reference = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    for (name, got), (_, want) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name

    assert sorted(set(hub.downloads(REPO))) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert hub.downloads(REPO).count("model.safetensors") == 1
    probes = {r.filename for r in hub.find_requests(route="resolve") if r.status == 404}
    assert probes, "transformers is expected to probe optional files"
    assert probes.isdisjoint({"config.json", "model.safetensors"})
    no_exist = hf_cache / "models--org--tiny-gpt2" / ".no_exist" / sha
    assert {p.name for p in no_exist.iterdir()} <= {Path(p).name for p in probes}


def test_transformers_in_subprocess_with_client_env(
    hub: LocalHub, tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    sha = hub.add_repo_from_dir(REPO, tiny_gpt2_dir)
    code = textwrap.dedent(
        f"""
        import json, os
        from huggingface_hub import constants
        from transformers import AutoConfig, AutoModelForCausalLM
        os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # too late: read at import time
        config = AutoConfig.from_pretrained({REPO!r}, revision={sha!r})
        model = AutoModelForCausalLM.from_pretrained({REPO!r})
        print(json.dumps({{"endpoint": constants.ENDPOINT, "cache": constants.HF_HUB_CACHE,
                          "params": sum(p.numel() for p in model.parameters()),
                          "model_type": config.model_type}}))
        """
    )
    cache = tmp_path / "child-cache"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=hub.client_env(cache),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["endpoint"] == hub.endpoint
    assert report["cache"] == str(cache)
    assert report["model_type"] == "gpt2" and report["params"] > 0
    assert (cache / "models--org--tiny-gpt2" / "snapshots" / sha / "model.safetensors").is_file()
    assert "model.safetensors" in hub.downloads(REPO)
    assert not (tmp_path / "child-cache-hf-home" / "token").exists()


# --------------------------------------------------------------------------------------------------
# Hub in a separate process
# --------------------------------------------------------------------------------------------------


def test_hub_in_subprocess_with_faults_and_kill(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    with (
        spawn_hub_process({REPO: tiny_gpt2_dir}) as proc,
        patch_hf_client(proc.endpoint, tmp_path / "in-process-cache"),
    ):
        api = HfApi(endpoint=proc.endpoint)
        proc.set_faults({"scope": "api", "status_code": 503, "times": 1})
        with pytest.raises(HfHubHTTPError):
            api.model_info(REPO)
        sha = api.model_info(REPO).sha

        code = (
            "from huggingface_hub import hf_hub_download; "
            f"print(hf_hub_download({REPO!r}, 'model.safetensors', revision={sha!r}))"
        )
        child = subprocess.run(
            [sys.executable, "-c", code],
            env=proc.client_env(tmp_path / "cache"),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        downloaded = child.stdout.strip().splitlines()[-1]
        assert sha256_file(downloaded) == sha256_file(tiny_gpt2_dir / "model.safetensors")
        log = proc.requests()
        assert [r["status"] for r in log if r["route"] == "repo_info"] == [503, 200]
        assert any(r["method"] == "GET" and r["filename"] == "model.safetensors" for r in log)

        proc.kill()
        with pytest.raises(httpx2.ConnectError):
            api.model_info(REPO)


def test_cli_module_prints_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    port_file = tmp_path / "port"
    cmd = [
        sys.executable,
        "-m",
        "integration.hub_server",
        "--repo",
        f"org/cli@dev={tmp_path / 'repo'}",
    ]
    cmd += ["--port", "0", "--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert int(port_file.read_text()) == port
        url = f"http://127.0.0.1:{port}/api/models/org/cli/revision/dev"
        assert httpx2.get(url).json()["id"] == "org/cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.environ.get("HF_ENDPOINT") is None or "127.0.0.1" not in os.environ["HF_ENDPOINT"]
