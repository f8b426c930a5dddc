"""Take the model home: a merged model folder (``helpers.adapters.save_merged``) to GGUF files for llama.cpp,
Ollama and LM Studio, and an Ollama ``Modelfile``:

    python -m helpers.export outputs/05_inference_eval/merged --out outputs/05_inference_eval/gguf --check 32

The converter is llama.cpp's own ``convert_hf_to_gguf.py``, of the same release as the llama.cpp that reads the
files here (the ``llama_cpp`` package), since each release adds architectures and metadata keys. It is not in the
llama-cpp-python wheel, but that version's source distribution carries it, with the ``conversion`` package it
imports and its own ``gguf-py``. On first use we run ``pip download --no-binary :all: --no-deps
llama-cpp-python==<installed version>`` (77 MB), unpack only those three (2 MB) into
``<cache>/llama-cpp-converter-<version>`` (the embedded model's cache, ``KOLAB_CACHE``) and drop the archive; an
offline machine passes an sdist it has (``sdist=``, ``--sdist``). The converter runs in a subprocess of this
Python with ``PYTHONPATH`` at its ``gguf-py`` (the PyPI ``gguf`` that transformers' GGUF loader uses may be older).
It imports torch, numpy, transformers, safetensors and pyyaml, all installed with the lab, and sentencepiece only
for a folder with a ``tokenizer.model``.

Written: ``model-f16.gguf`` and ``model-q8_0.gguf`` by the converter (``--outtype``), ``model-Q4_K_M.gguf`` by
llama.cpp's quantizer (``llama_cpp.llama_model_quantize``) from the f16 file, and a ``Modelfile``, each under a
temporary name renamed when complete. A tokenizer without a chat template gets ours (:mod:`helpers.chat_template`)
in the GGUF, through a staging folder of links, so llama.cpp's server and LM Studio prompt the model as it was
trained. :mod:`helpers.export_check` checks the files against the merged model.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from helpers.chat_template import DEFAULT_TEMPLATE, chat_template, split_answer_header
from helpers.data.prompts import TURN_SEPARATOR, prompt_templates
from helpers.export_check import check_files
from helpers.models.embedded import DEFAULT_CACHE_DIR
from helpers.outputs import atomic_write_text, megabytes, shown_path

LLAMA_CPP_PACKAGE = "llama-cpp-python"
LLAMA_CPP_TESTED = "0.3.36"  # the llama-cpp-python the lab's export and its checks were measured with
CONVERTER_TYPES = ("f16", "q8_0")  # written by the converter itself (--outtype)
QUANTIZER_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # made by llama.cpp's quantizer from the f16 file
DEFAULT_TYPES = ("f16", "q8_0", "Q4_K_M")
MODELFILE_TYPE = "q8_0"  # what the Modelfile loads: on a 270M model Q4_K_M costs visible quality, q8_0 almost none
# Inside the sdist, under llama_cpp_python-<version>/: the converter, the package it imports, its gguf-py.
CONVERTER_FILES = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/LICENSE")
CONVERTER_FOLDERS = ("vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/gguf/")
COMPLETE_MARKER = "unpacked.json"


class ExportError(RuntimeError):
    """The export cannot run or failed; the message says why and what to do."""


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


# --------------------------------------------------------------------------------------------- the converter

def llama_cpp_version() -> str:
    try:
        return version(LLAMA_CPP_PACKAGE)
    except PackageNotFoundError:
        raise ExportError("GGUF export needs llama.cpp's Python package: "
                          f"pip install {LLAMA_CPP_PACKAGE}=={LLAMA_CPP_TESTED} "
                          "(it builds llama.cpp from source: 10-20 minutes on two cores)") from None


def converter_dir(cache_dir: str | Path | None = None, sdist: str | Path | None = None, verbose: bool = True) -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` of the installed llama.cpp version, unpacked once from its sdist."""
    release = llama_cpp_version()
    folder = Path(cache_dir or DEFAULT_CACHE_DIR) / f"llama-cpp-converter-{release}"
    if (folder / COMPLETE_MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".converter-") as scratch:
        archive = Path(sdist) if sdist else _download_sdist(release, Path(scratch), verbose)
        staged = Path(scratch) / "unpacked"
        _unpack_converter(archive, staged)
        (staged / COMPLETE_MARKER).write_text(json.dumps({LLAMA_CPP_PACKAGE: release, "sdist": archive.name}))
        shutil.rmtree(folder, ignore_errors=True)  # an older, incomplete unpacking
        try:
            os.replace(staged, folder)
        except OSError:  # another process unpacked it meanwhile
            if not (folder / COMPLETE_MARKER).exists():
                raise
    return folder


def _download_sdist(release: str, into: Path, verbose: bool) -> Path:
    if verbose:
        print(f"downloading the {LLAMA_CPP_PACKAGE} {release} source once, for llama.cpp's converter")
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               f"{LLAMA_CPP_PACKAGE}=={release}", "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode or not archives:
        raise ExportError(f"could not download the {LLAMA_CPP_PACKAGE} {release} source "
                          f"({result.stderr.strip()[-400:]}); on an offline machine pass one you have: "
                          f"--sdist llama_cpp_python-{release}.tar.gz")
    return archives[0]


def _unpack_converter(archive: Path, into: Path):
    """Extract only the converter's files, by name (never an absolute or ``..`` path), keeping their layout:
    the converter finds ``gguf-py`` beside itself."""
    with tarfile.open(archive) as source:
        top = source.getmembers()[0].name.split("/")[0]
        for member in source.getmembers():
            inside = member.name[len(top) + 1:]
            if not member.isfile() or ".." in Path(inside).parts or not (
                    inside in CONVERTER_FILES or inside.startswith(CONVERTER_FOLDERS)):
                continue
            target = into / inside[len("vendor/llama.cpp/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.extractfile(member).read())
    if not (into / "convert_hf_to_gguf.py").exists() or not (into / "gguf-py" / "gguf").is_dir():
        raise ExportError(f"{archive.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py with its gguf-py; is it "
                          f"the {LLAMA_CPP_PACKAGE} source distribution?")


# --------------------------------------------------------------------------------------------- conversion

def check_merged_dir(merged_dir: str | Path) -> Path:
    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").is_file():
        raise ExportError(f"{shown_path(merged_dir)} is not a saved model folder (no config.json); pass the folder "
                          "that helpers.adapters.save_merged wrote")
    if not any(merged_dir.glob("*.safetensors")):
        raise ExportError(f"{shown_path(merged_dir)} has no .safetensors weights; save the merged model with "
                          "helpers.adapters.save_merged (safe_serialization=True)")
    if (merged_dir / "tokenizer.model").exists():
        try:
            import sentencepiece  # noqa: F401  (only the converter needs it, and only for this tokenizer file)
        except ImportError:
            raise ExportError("this folder has a SentencePiece tokenizer.model, which llama.cpp's converter reads "
                              "with sentencepiece: pip install sentencepiece") from None
    return merged_dir


def _has_chat_template(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    in_config = config.exists() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))
    return in_config or (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists()


def _conversion_source(merged_dir: Path, staging: Path, template: str) -> Path:
    """``merged_dir`` itself when its tokenizer has a chat template, else a folder of links to its files plus
    ours (the merged folder stays untouched: it may belong to a finished run)."""
    if _has_chat_template(merged_dir) or prompt_templates()[template].get("use_chat_template"):
        return merged_dir
    staging.mkdir(parents=True)
    for file in merged_dir.iterdir():
        if file.is_file():
            try:
                (staging / file.name).symlink_to(file.resolve())
            except OSError:  # no symlinks (Windows without developer mode): copy
                shutil.copy2(file, staging / file.name)
    (staging / "chat_template.jinja").write_text(chat_template(template), encoding="utf-8")
    return staging


def convert(source_dir: Path, out_path: Path, outtype: str, converter: Path, verbose: bool = True) -> Path:
    """Run llama.cpp's converter on ``source_dir`` into ``out_path`` (through a temporary name)."""
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(converter / "gguf-py"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(source_dir), "--outtype", outtype,
               "--outfile", str(partial)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode or not partial.exists():
        partial.unlink(missing_ok=True)
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ExportError(f"llama.cpp's converter failed on {shown_path(source_dir)} ({outtype}):\n{tail}")
    return _publish(partial, out_path, started, "llama.cpp's converter", verbose)


def quantize(source_gguf: Path, out_path: Path, gguf_type: str, verbose: bool = True) -> Path:
    """A k-quant made by llama.cpp's quantizer (what ``llama-quantize`` does) from an f16 or f32 GGUF."""
    import llama_cpp  # optional dependency: only the export needs it

    started = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[gguf_type])
    params.nthread = os.cpu_count() or 1
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    status = llama_cpp.llama_model_quantize(str(source_gguf).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's quantizer could not make {gguf_type} from {source_gguf.name} "
                          f"(status {status}; its log above says why)")
    return _publish(partial, out_path, started, "llama.cpp's quantizer", verbose)


def _publish(partial: Path, out_path: Path, started: float, made_by: str, verbose: bool) -> Path:
    os.replace(partial, out_path)
    if verbose:
        print(f"  {out_path.name}: {megabytes(out_path.stat().st_size)} in {time.perf_counter() - started:.0f} s "
              f"({made_by})")
    return out_path


def export_gguf(merged_dir: str | Path, out_dir: str | Path, types=DEFAULT_TYPES, template: str = DEFAULT_TEMPLATE,
                cache_dir: str | Path | None = None, sdist: str | Path | None = None,
                verbose: bool = True) -> dict[str, Path]:
    """GGUF files of a merged model folder, ``{type: path}``, in ``out_dir``: f16 and q8_0 by llama.cpp's
    converter, Q4_K_M by its quantizer (from the f16 file, made as an intermediate when not asked for)."""
    if unknown := [t for t in types if t not in CONVERTER_TYPES and t not in QUANTIZER_TYPES]:
        raise ExportError(f"unknown GGUF type(s) {unknown}; choose from {[*CONVERTER_TYPES, *QUANTIZER_TYPES]}")
    merged_dir = check_merged_dir(merged_dir)
    converter = converter_dir(cache_dir, sdist, verbose)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".source-") as scratch:
        source = _conversion_source(merged_dir, Path(scratch) / merged_dir.name, template)
        if verbose:
            print(f"exporting {shown_path(merged_dir)} to {shown_path(out_dir)}"
                  + (" (adding the chat template to the GGUF)" if source != merged_dir else ""))
        converted = [t for t in CONVERTER_TYPES if t in types or (t == "f16" and set(types) & set(QUANTIZER_TYPES))]
        for gguf_type in converted:
            name = gguf_name(gguf_type) if gguf_type in types else f".intermediate-{gguf_name(gguf_type)}"
            written[gguf_type] = convert(source, out_dir / name, gguf_type, converter, verbose)
    for gguf_type in (t for t in QUANTIZER_TYPES if t in types):
        written[gguf_type] = quantize(written["f16"], out_dir / gguf_name(gguf_type), gguf_type, verbose)
    if "f16" not in types and "f16" in written:
        written.pop("f16").unlink()
    return {t: written[t] for t in types}


# --------------------------------------------------------------------------------------------- Ollama

def _go_literal(text: str) -> str:
    # A JSON string is a valid Go string constant, which text/template prints as given: no literal newlines in
    # the template text, so the layout of the template cannot leak into the prompt.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _go_pattern(pattern: str, fields: dict[str, str]) -> str:
    pieces = []
    for literal, field, _, _ in string.Formatter().parse(pattern):
        pieces += [_go_literal(literal)] if literal else []
        pieces += ["{{ " + fields[field] + " }}"] if field is not None else []
    return "".join(pieces)


def ollama_template(eos_text: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The training prompt in Ollama's Go template syntax: the same rendering as :func:`chat_template` (system
    message as the first question's context, the EOS text after each earlier answer, a blank line between
    exchanges, the prompt ending at the answer header). Ollama adds the BOS token itself."""
    spec = prompt_templates()[template]
    if spec.get("use_chat_template"):
        raise ExportError(f"template {template!r} is the tokenizer's own Jinja template, which an Ollama Modelfile "
                          "cannot take; write its TEMPLATE by hand")
    question, header = split_answer_header(spec["prompt"])
    question_with_context, _ = split_answer_header(spec["prompt_with_context"])
    lines = [
        '{{- $context := "" }}{{- $first := true }}{{- $last := "" }}',
        '{{- range .Messages }}{{ if eq .Role "system" }}{{ $context = .Content }}{{ end }}{{ end }}',
        "{{- range $m := .Messages }}",
        '{{- if eq $m.Role "user" }}',
        "{{- if not $first }}" + _go_literal(TURN_SEPARATOR) + "{{ end }}",
        "{{- if and $first $context }}"
        + _go_pattern(question_with_context, {"instruction": "$m.Content", "context": "$context"})
        + "{{ else }}" + _go_pattern(question, {"instruction": "$m.Content"}) + "{{ end }}",
        "{{- $first = false }}{{- $last = $m.Role }}",
        '{{- else if eq $m.Role "assistant" }}' + _go_literal(header)
        + _go_pattern(spec.get("answer", "{output}"), {"output": "$m.Content"}) + _go_literal(eos_text)
        + "{{- $last = $m.Role }}",
        "{{- end }}{{- end }}",
        '{{- if eq $last "user" }}' + _go_literal(header) + "{{ end }}",
    ]
    return "\n".join(lines)


def modelfile_text(gguf_file: str, eos_text: str, template: str = DEFAULT_TEMPLATE) -> str:
    question_start = prompt_templates()[template]["prompt"].split("{instruction}")[0]
    stops = [eos_text, question_start.strip()]  # the EOS, and a next question the model writes itself
    return (f"# Ollama: ollama create NAME -f Modelfile   (then: ollama run NAME)\n"
            f"FROM ./{gguf_file}\n"
            f'TEMPLATE """{ollama_template(eos_text, template)}"""\n'
            + "".join(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}\n" for stop in stops))


def write_modelfile(out_dir: str | Path, gguf_path: str | Path, merged_dir: str | Path,
                    template: str = DEFAULT_TEMPLATE) -> Path:
    """``out_dir/Modelfile`` for the GGUF beside it, its EOS text read from the merged folder's tokenizer."""
    config = json.loads((Path(merged_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token")
    eos_text = eos.get("content") if isinstance(eos, dict) else eos
    if not eos_text:
        raise ExportError(f"the tokenizer in {shown_path(merged_dir)} names no eos_token; the Modelfile stops on it")
    return atomic_write_text(Path(out_dir) / "Modelfile", modelfile_text(Path(gguf_path).name, eos_text, template))


# --------------------------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m helpers.export", description="A merged model folder to GGUF "
                                     "files and an Ollama Modelfile, checked with llama.cpp against the folder.")
    parser.add_argument("merged_dir", help="the folder helpers.adapters.save_merged wrote")
    parser.add_argument("--out", required=True, help="folder for the GGUF files and the Modelfile")
    parser.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES), help="default: %(default)s")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="the prompt template the model was trained with")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="compare each file with the merged model on the first N eval questions of --data")
    parser.add_argument("--data", default="shipped", help="instruction data for --check (default: %(default)s)")
    parser.add_argument("--sdist", help="a llama-cpp-python source archive to take the converter from (offline)")
    args = parser.parse_args(argv)
    try:
        files = export_gguf(args.merged_dir, args.out, args.types, args.template, sdist=args.sdist)
        served = files.get(MODELFILE_TYPE, next(iter(files.values())))
        print(f"  {write_modelfile(args.out, served, args.merged_dir, args.template).name}: FROM ./{served.name}")
    except ExportError as error:
        raise SystemExit(f"error: {error}") from None
    if args.check:
        check_files(files, args.merged_dir, args.data, args.check, Path(args.out) / "check.json")


if __name__ == "__main__":
    main()
