"""A small stand-in for the Hugging Face Hub, served on 127.0.0.1 for the download tests.

It speaks the part of the Hub's protocol that huggingface_hub's own client uses to fetch
model files, so the tests run the real client against it (no mocks):

- ``GET /api/models/{repo}/revision/{rev}``: repo info JSON with ``sha`` and ``siblings``;
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Size`` and ``Range`` support (so an interrupted transfer can resume);
- errors the way the Hub reports them: 404 with ``X-Error-Code`` RepoNotFound /
  RevisionNotFound / EntryNotFound, 401 for a private repo without a valid token, 403
  GatedRepo for a gated one.

Every request is logged, so a test can assert which files were fetched and whether a
request carried a Range header.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    """One repo: commits (sha -> {path: bytes}) and refs (branch/tag -> sha)."""

    repo_id: str
    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    token: str | None = None  # private: requests need "Authorization: Bearer <token>"
    gated: bool = False  # gated: any request without the token gets 403 GatedRepo
    error_code_on_401: bool = True  # the Hub tags a 401 on a private repo as RepoNotFound

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class CutOff:
    """Close the connection after `after` bytes of the next GET of `filename`.

    With `times` > 1 the following attempts are cut off too, before sending any byte, so
    the client gives up (that models a connection that stays broken).
    """

    filename: str
    after: int
    times: int = 1


@dataclass
class HubState:
    repos: dict[str, FakeRepo]
    log: list[LoggedRequest] = field(default_factory=list)
    cutoffs: list[CutOff] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def etag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    state: HubState  # set on the subclass made per server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        """Quiet: the test reads `state.log` instead."""

    # ---- helpers -------------------------------------------------------------------
    def _record(self) -> None:
        auth = self.headers.get("Authorization")
        entry = LoggedRequest(
            self.command,
            unquote(urlsplit(self.path).path),
            self.headers.get("Range"),
            auth is not None,
        )
        with self.state.lock:
            self.state.log.append(entry)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        commit: str | None = None,
        head: bool = False,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _find_repo(self, rest: str) -> tuple[FakeRepo | None, str]:
        """Split "org/name/<more>" into the longest known repo id and the remainder."""
        for repo_id in sorted(self.state.repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return self.state.repos[repo_id], rest[len(repo_id) :].lstrip("/")
        return None, rest

    def _access_denied(self, repo: FakeRepo, head: bool) -> bool:
        if repo.token is None:
            return False
        if self.headers.get("Authorization") == f"Bearer {repo.token}":
            return False
        if repo.gated:
            self._error(403, "GatedRepo", "Access to this model is restricted.", head=head)
        else:
            code = "RepoNotFound" if repo.error_code_on_401 else None
            self._error(401, code, "Invalid username or password.", head=head)
        return True

    # ---- routes ---------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._route(head=True)

    def _route(self, head: bool) -> None:
        self._record()
        path = unquote(urlsplit(self.path).path).lstrip("/")
        if path.startswith("api/models/"):
            self._api_model(path[len("api/models/") :], head)
            return
        if "/resolve/" in path:
            repo_part, _, rest = path.partition("/resolve/")
            repo = self.state.repos.get(repo_part)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head=head)
                return
            revision, _, filename = rest.partition("/")
            self._resolve(repo, revision, filename, head)
            return
        self._error(404, None, "Not found", head=head)

    def _api_model(self, rest: str, head: bool) -> None:
        repo, remainder = self._find_repo(rest)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return
        if self._access_denied(repo, head):
            return
        revision = "main"
        if remainder.startswith("revision/"):
            revision = remainder[len("revision/") :]
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return
        files = repo.commits[sha]
        info = {
            "_id": "0" * 24,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": sha,
            "private": repo.token is not None and not repo.gated,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "tags": ["gpt_neo"],
            "siblings": [
                {"rfilename": name, "size": len(data), "blobId": etag_of(data)[:40]}
                for name, data in sorted(files.items())
            ],
        }
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _resolve(self, repo: FakeRepo, revision: str, filename: str, head: bool) -> None:
        if self._access_denied(repo, head):
            return
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return
        data = repo.commits[sha].get(filename)
        if data is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist", commit=sha, head=head)
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first = range_header[len("bytes=") :].split("-", 1)[0]
            start = int(first) if first else 0
        partial = start > 0
        self.send_response(206 if partial else 200)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag_of(data)}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        payload = data[start:]
        cut = self._take_cutoff(filename)
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _take_cutoff(self, filename: str) -> int | None:
        """Bytes to send before hanging up on this GET, or None to send everything."""
        with self.state.lock:
            for cut in self.state.cutoffs:
                if cut.filename == filename and cut.times > 0:
                    cut.times -= 1
                    after = cut.after
                    cut.after = 0  # later cut-offs send nothing: the link stays broken
                    return after
        return None


class HubServer:
    """A threaded HTTP server on 127.0.0.1 with a random free port."""

    def __init__(self, repos: list[FakeRepo]) -> None:
        self.state = HubState({repo.repo_id: repo for repo in repos})
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def log(self) -> list[LoggedRequest]:
        return self.state.log

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def clear_log(self) -> None:
        with self.state.lock:
            self.state.log.clear()

    def downloaded(self) -> list[str]:
        """File names fetched with GET from a /resolve/ URL, in order."""
        names = []
        for entry in self.log:
            if entry.method == "GET" and "/resolve/" in entry.path:
                names.append(entry.path.split("/resolve/", 1)[1].split("/", 1)[1])
        return names

    def cut_off(self, filename: str, after: int, times: int = 1) -> None:
        with self.state.lock:
            self.state.cutoffs.append(CutOff(filename, after, times))


# ---- the repos the tests serve -------------------------------------------------------
def commit_id(label: str) -> str:
    """A 40-hex commit id derived from a label (stable across runs)."""
    return hashlib.sha1(label.encode()).hexdigest()


def tiny_config(**overrides: object) -> dict:
    """config.json of a 2-layer GPT-Neo small enough to build in microseconds."""
    config: dict = {
        "model_type": "gpt_neo",
        "architectures": ["GPTNeoForCausalLM"],
        "vocab_size": 259,
        "max_position_embeddings": 32,
        "hidden_size": 8,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": None,
        "window_size": 4,
        "attention_types": [[["global", "local"], 1]],
        "attention_layers": ["global", "local"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 258,
        "eos_token_id": 258,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    if "num_layers" in overrides and "attention_types" not in overrides:
        n = int(config["num_layers"])
        config["attention_types"] = [[["global", "local"], n // 2]]
        config["attention_layers"] = ["global", "local"] * (n // 2)
    return config


def gpt_neo_tensors(config: dict, seed: int = 0) -> dict:
    """Random float32 tensors with GPT-Neo's checkpoint names and shapes (numpy, no torch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h = config["hidden_size"]
    inner = config.get("intermediate_size") or 4 * h

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {
        "transformer.wte.weight": rand(config["vocab_size"], h),
        "transformer.wpe.weight": rand(config["max_position_embeddings"], h),
        "transformer.ln_f.weight": np.ones(h, np.float32),
        "transformer.ln_f.bias": np.zeros(h, np.float32),
    }
    for i in range(config["num_layers"]):
        p = f"transformer.h.{i}."
        tensors.update(
            {
                p + "ln_1.weight": np.ones(h, np.float32),
                p + "ln_1.bias": np.zeros(h, np.float32),
                p + "ln_2.weight": np.ones(h, np.float32),
                p + "ln_2.bias": np.zeros(h, np.float32),
                p + "attn.attention.q_proj.weight": rand(h, h),
                p + "attn.attention.k_proj.weight": rand(h, h),
                p + "attn.attention.v_proj.weight": rand(h, h),
                p + "attn.attention.out_proj.weight": rand(h, h),
                p + "attn.attention.out_proj.bias": rand(h),
                p + "mlp.c_fc.weight": rand(inner, h),
                p + "mlp.c_fc.bias": rand(inner),
                p + "mlp.c_proj.weight": rand(h, inner),
                p + "mlp.c_proj.bias": rand(h),
            }
        )
    return tensors


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"format": "pt"})


def tokenizer_files(with_json: bool) -> dict[str, bytes]:
    """A byte-level BPE (256 bytes, 2 merges, <|endoftext|> = 258) in the Hub's file names."""
    from gptneo_cli.tokenizer import build_gpt2_bpe, bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({"Ġt": 256, "he": 257, "<|endoftext|>": 258})
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": "#version: 0.2\nĠ t\nh e\n".encode(),
        "tokenizer_config.json": json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "add_prefix_space": False,
                "model_max_length": 32,
            }
        ).encode(),
        "special_tokens_map.json": json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        ).encode(),
    }
    if with_json:
        import tempfile
        from pathlib import Path

        from tokenizers import AddedToken

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_bytes(files["vocab.json"])
            (Path(tmp) / "merges.txt").write_bytes(files["merges.txt"])
            backend = build_gpt2_bpe(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt")
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        files["tokenizer.json"] = backend.to_str().encode()
    return files


#: Files a GPT-Neo repo on the Hub also carries, which gptneo must never download.
DECOYS = {
    "flax_model.msgpack": b"flax" * 64,
    "rust_model.ot": b"rust" * 64,
    "tf_model.h5": b"h5" * 64,
    "model.onnx": b"onnx" * 64,
    "onnx/decoder_model.onnx": b"onnx" * 64,
    "pytorch_model.bin": b"pickle" * 64,  # the repo has safetensors, so .bin is not needed
    ".gitattributes": b"*.bin filter=lfs\n",
    "README.md": b"# tiny gpt-neo\n",
}

V1 = commit_id("v1")
MAIN = commit_id("main")


def tiny_repo(repo_id: str, **kwargs: object) -> FakeRepo:
    """Two commits: v1 (window 4, vocab+merges only) and main (window 8, + tokenizer.json)."""
    v1_config = tiny_config()
    main_config = tiny_config(window_size=8)
    v1 = {
        "config.json": json.dumps(v1_config).encode(),
        "model.safetensors": safetensors_bytes(gpt_neo_tensors(v1_config, seed=1)),
        **tokenizer_files(with_json=False),
        **DECOYS,
    }
    main = {
        "config.json": json.dumps(main_config).encode(),
        "model.safetensors": safetensors_bytes(gpt_neo_tensors(main_config, seed=2)),
        **tokenizer_files(with_json=True),
        **DECOYS,
    }
    return FakeRepo(repo_id, {V1: v1, MAIN: main}, {"main": MAIN, "v1": V1}, **kwargs)


def single_commit_repo(repo_id: str, files: dict[str, bytes], **kwargs: object) -> FakeRepo:
    sha = commit_id(repo_id)
    return FakeRepo(repo_id, {sha: files}, {"main": sha}, **kwargs)


def build_repos() -> list[FakeRepo]:
    """Everything the download tests need, served from one fake Hub."""
    config = tiny_config()
    weights = gpt_neo_tensors(config, seed=3)
    names = sorted(weights)
    half = len(names) // 2
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [{k: weights[k] for k in names[:half]}, {k: weights[k] for k in names[half:]}]
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {k: shard_names[0 if k in shards[0] else 1] for k in names},
    }
    sharded = {
        "config.json": json.dumps(config).encode(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        shard_names[0]: safetensors_bytes(shards[0]),
        shard_names[1]: safetensors_bytes(shards[1]),
        "pytorch_model.bin.index.json": b"{}",
        "pytorch_model-00001-of-00001.bin": b"pickle" * 64,
        **tokenizer_files(with_json=False),
    }
    bin_only = {
        "config.json": json.dumps(config).encode(),
        "pytorch_model.bin": b"a torch pickle would be here" * 8,
        "tf_model.h5": b"h5" * 64,
        "flax_model.msgpack": b"flax" * 64,
        **tokenizer_files(with_json=False),
    }
    gpt2 = {
        "config.json": json.dumps({"model_type": "gpt2", "n_layer": 2}).encode(),
        "model.safetensors": b"x" * 4096,
        **tokenizer_files(with_json=False),
    }
    big_config = tiny_config(
        vocab_size=50257, hidden_size=64, num_layers=2, max_position_embeddings=32
    )
    big = {
        "config.json": json.dumps(big_config).encode(),
        "model.safetensors": safetensors_bytes(gpt_neo_tensors(big_config, seed=4)),
    }
    return [
        tiny_repo("tiny/gpt-neo"),
        tiny_repo("EleutherAI/gpt-neo-125M"),
        tiny_repo("tiny/private", token="secret"),
        tiny_repo("tiny/private-no-code", token="secret", error_code_on_401=False),
        tiny_repo("tiny/gated", token="secret", gated=True),
        single_commit_repo("tiny/gpt-neo-sharded", sharded),
        single_commit_repo("tiny/gpt-neo-bin", bin_only),
        single_commit_repo("tiny/gpt2", gpt2),
        single_commit_repo("tiny/big", big),
    ]
