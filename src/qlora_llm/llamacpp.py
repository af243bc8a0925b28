"""llama.cpp's own tools, from one pinned source: convert to GGUF, quantize, and run greedy checks.

Debian has no llama.cpp package and the Hub is not always reachable, but the `llama-cpp-python` source
distribution on PyPI vendors one consistent llama.cpp (`vendor/llama.cpp/`): the converters
(`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`), the `gguf-py` they were written against, and the
C++ sources of `llama-quantize`, `llama-completion` and `llama-results` (the logits at every position of a
text, which is what the teacher-forced export check compares). We take that tree once into the user's cache,
run its converters with its own `gguf-py` (a newer or older `gguf` wheel silently writes other keys),
and build the two tools from it with cmake, CPU only, only those targets, once per machine. Nothing
here maps a tensor by hand: a model llama.cpp's converter does not know is refused by it, with its
message.

    tools = LlamaCpp(Path("~/.cache/qlora-llm"))
    tools.convert(Path("runs/x/merged"), Path("x-f16.gguf"), "f16")
    tools.quantize(Path("x-f16.gguf"), Path("x-q4_k_m.gguf"), "q4_k_m")

`QLORA_LLM_LLAMA_CPP=/path/to/llama.cpp` uses an existing llama.cpp checkout instead.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_dir
from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python source distribution whose vendored llama.cpp we use (one version, all tools)."""
TOOLS = ("llama-quantize", "llama-completion", "llama-results")
# Only what the tools need: no tests, examples, server (its web UI would be downloaded), HTTPS or curl.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
# Native code without AMX: on a 2-core Xeon VM whose CPU advertises AMX (and whose Linux grants the AMX
# permission ggml asks for), ggml's AMX int8 kernels died with SIGILL at their first tile instruction
# (`tilezero`) on every q8_0 model, so the export check of a q8_0 GGUF could not run at all. These tools
# only check exports; the user's own llama.cpp or Ollama is what serves them. Built into folders of their
# own, so a build from before (with AMX) is not reused.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_NAME = "no-amx"
# ggml (the kernels: where the tools spend their time) at -O3, the rest (llama's model code, `common`'s
# argument parser, chat and JSON code, cpp-httplib: 83% of the compile's CPU time) at -O1: measured here,
# the build took 215 s instead of 299 s, and llama-results and llama-completion wrote byte-identical
# outputs in the same time. cmake includes the file right after ggml's `project()`, in ggml's scope.
OPTIMIZE = ("-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG")
GGML_O3 = 'set(CMAKE_C_FLAGS_RELEASE "-O3 -DNDEBUG")\nset(CMAKE_CXX_FLAGS_RELEASE "-O3 -DNDEBUG")\n'


class LlamaCppError(QloraError, RuntimeError):
    """A llama.cpp step failed or cannot run here; the message says what to do."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _no_amx_flags() -> list[str]:
    """cmake's compiler flags that keep AMX out of the native build, where the C++ compiler knows them
    (x86-64 GCC 11+ and clang 12+; an aarch64 compiler refuses them, and has no AMX to avoid)."""
    probe = subprocess.run(
        ["c++", *NO_AMX.split(), "-x", "c++", "-E", "-"],
        input="",
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return []
    return [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    if done.returncode != 0:
        raise LlamaCppError(f"{what} failed (exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}")
    return done.stdout + done.stderr


def _model_args(gguf: Path, context: int, lora: Path | None) -> list[str]:
    """The arguments every llama.cpp tool run here takes: the model, its context, all cores, the LoRA."""
    args = ["-m", str(gguf), "-c", str(context), "-t", str(os.cpu_count() or 2)]
    return args + (["--lora", str(lora)] if lora is not None else [])


class LlamaCpp:
    """The llama.cpp tree and tools under `<cache_dir>/llama.cpp/<version>/`, fetched and built on first use."""

    def __init__(self, cache_dir: Path, source: Path | None = None):
        override = source or os.environ.get("QLORA_LLM_LLAMA_CPP")
        if override:
            # A checkout of the user's: its tools are built inside it, since they belong to its version.
            self._source = Path(override).expanduser()
            self.root = self._source / "build-qlora-llm"
            self.version = f"llama.cpp at {self._source}"
        else:
            self.root = Path(cache_dir).expanduser() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
            self._source = self.root / "src"
            self.version = f"llama.cpp vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"

    def source(self) -> Path:
        """The llama.cpp source tree, downloaded from PyPI into the cache the first time (76 MB)."""
        if (self._source / "convert_hf_to_gguf.py").is_file():
            return self._source
        if self._source != self.root / "src":
            raise LlamaCppError(
                f"{self._source}: no convert_hf_to_gguf.py there; QLORA_LLM_LLAMA_CPP must name a llama.cpp checkout."
            )
        log.info(
            "fetching llama.cpp (vendored in llama-cpp-python %s, 76 MB, once)", LLAMA_CPP_PYTHON_VERSION
        )
        with tempfile.TemporaryDirectory(prefix="qlora-llm-sdist-") as tmp:
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                    "--dest",
                    tmp,
                ],
                f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (needs the package registry)",
            )
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            with atomic_dir(self._source) as dest, tarfile.open(sdist) as tar:
                members = []
                for member in tar.getmembers():
                    if member.name.startswith(prefix):
                        member.name = member.name[len(prefix) :]
                        members.append(member)
                tar.extractall(dest, members=members, filter="data")
        return self._source

    def _converter_env(self) -> dict[str, str]:
        # The converter imports `gguf` and its own `conversion` package: both from this tree, first.
        src = self.source()
        path = os.pathsep.join(filter(None, [str(src / "gguf-py"), str(src), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, "NO_LOCAL_GGUF": ""}

    def convert(self, model_dir: Path, out_file: Path, outtype: str) -> None:
        """An HF model folder -> one GGUF file, with llama.cpp's own converter (f16, bf16, q8_0, f32)."""
        script = self.source() / "convert_hf_to_gguf.py"
        _run(
            [sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype],
            f"llama.cpp's convert_hf_to_gguf.py on {model_dir}",
            env=self._converter_env(),
        )

    def convert_lora(self, adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16") -> None:
        """A PEFT LoRA adapter -> a GGUF adapter for llama.cpp's `--lora`, with llama.cpp's own converter."""
        script = self.source() / "convert_lora_to_gguf.py"
        _run(
            [
                sys.executable,
                str(script),
                str(adapter_dir),
                "--base",
                str(base_dir),
                "--outfile",
                str(out_file),
                "--outtype",
                outtype,
            ],
            f"llama.cpp's convert_lora_to_gguf.py on {adapter_dir}",
            env=self._converter_env(),
        )

    def tool(self, name: str) -> Path:
        """The path of a built llama.cpp tool, building all of TOOLS the first time."""
        binary = self.root / f"bin-{BUILD_NAME}" / name
        if not binary.is_file():
            self._build()
        return binary

    def _build(self) -> None:
        for program in ("cmake", "c++"):
            if shutil.which(program) is None:
                raise LlamaCppError(
                    f"building llama.cpp's {', '.join(TOOLS)} needs cmake and a C++ compiler; "
                    "install them (Debian/Ubuntu: apt-get install cmake g++) and run again."
                )
        src = self.source()
        build = self.root / f"build-{BUILD_NAME}"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        jobs = str(os.cpu_count() or 2)
        start = time.perf_counter()
        log.info("building llama.cpp's %s from source, once (a few minutes per core)...", ", ".join(TOOLS))
        build.mkdir(parents=True, exist_ok=True)
        (build / "ggml-O3.cmake").write_text(GGML_O3)
        _run(
            [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(build),
                *generator,
                *CMAKE_FLAGS,
                *OPTIMIZE,
                f"-DCMAKE_PROJECT_ggml_INCLUDE={build / 'ggml-O3.cmake'}",
                *_no_amx_flags(),
            ],
            "cmake configure of llama.cpp",
        )
        proc = subprocess.Popen(
            ["cmake", "--build", str(build), "--target", *TOOLS, "-j", jobs],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output, shown = [], -1
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            step = re.match(r"\[\s*(\d+)/(\d+)\]|\[\s*(\d+)%\]", line)
            if step:
                done = int(step[1]) * 100 // int(step[2]) if step[1] else int(step[3])
                if done // 10 > shown:  # one progress line per tenth: quiet, but alive
                    shown = done // 10
                    elapsed = time.perf_counter() - start
                    eta = (
                        f", about {elapsed * (100 - done) / max(done, 1) / 60:.0f} min left"
                        if done >= 10
                        else ""
                    )
                    log.info("building llama.cpp: %d%%%s", done, eta)
        if proc.wait() != 0:
            raise LlamaCppError(
                f"building llama.cpp failed (exit {proc.returncode}):\n{_tail(''.join(output))}"
            )
        with atomic_dir(self.root / f"bin-{BUILD_NAME}", replace=True) as out:
            for name in TOOLS:
                found = next(build.rglob(name), None)
                if found is None:
                    raise LlamaCppError(f"the llama.cpp build made no {name} (looked under {build})")
                shutil.copy2(found, out / name)
        log.info(
            "built llama.cpp's tools in %.0f s (%s)",
            time.perf_counter() - start,
            self.root / f"bin-{BUILD_NAME}",
        )

    def quantize(self, source: Path, out_file: Path, quant: str) -> None:
        """A 16-bit GGUF -> a quantized one (q4_k_m, q5_k_m, ...) with llama.cpp's `llama-quantize`."""
        _run([str(self.tool("llama-quantize")), str(source), str(out_file), quant.upper()], "llama-quantize")

    def logits(self, gguf: Path, text: str, lora: Path | None = None) -> tuple[list[int], Any]:
        """llama.cpp's logits at every position of `text`, in one teacher-forced pass (`llama-results`).

        Returns (tokens, logits[n_tokens, n_vocab] as float32 numpy). The tokens are llama.cpp's own
        tokenization of the text (BOS added as the GGUF says; special-token text such as `<|im_start|>`
        is not parsed, the tool has no switch for it), so a caller compares both models on these tokens.
        """
        import numpy as np
        from gguf import GGUFReader

        with tempfile.TemporaryDirectory(prefix="qlora-llm-logits-") as tmp:
            prompt, out = Path(tmp) / "text.txt", Path(tmp) / "results.gguf"
            prompt.write_text(text + "\n", encoding="utf-8")  # -f drops one trailing newline
            cmd = [
                str(self.tool("llama-results")),
                *_model_args(gguf, 4096, lora),
                "-f",
                str(prompt),
                "-o",
                str(out),
            ]
            _run(cmd, "llama-results")
            tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
            tokens = [int(i) for i in np.asarray(tensors["tokens"].data).reshape(-1)]
            # Written row by row (position-major) whatever the tensor's declared shape says.
            logits = np.array(tensors["logits"].data, dtype=np.float32).reshape(len(tokens), -1)
        return tokens, logits

    def complete(self, gguf: Path, prompt: str, n_predict: int, lora: Path | None = None) -> str:
        """llama.cpp's greedy continuation of `prompt` (rendered text; BOS added as the GGUF says).

        Returned as llama-completion writes it: the prompt without its special tokens, the answer, then
        " [end of text]" if it stopped. The prompt is displayed because without it the tool still echoes
        the prompt's last tokens, which cannot be told from the answer.
        """
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
            f.write(prompt)
            f.flush()
            cmd = [
                str(self.tool("llama-completion")),
                *_model_args(gguf, 2048, lora),
                "--file",
                f.name,
                "-n",
                str(n_predict),
                "--temp",
                "0",
                "--top-k",
                "1",
                "--seed",
                "0",
                "-no-cnv",
                "--simple-io",
                "--no-warmup",
            ]
            done = subprocess.run(cmd, capture_output=True, check=False, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise LlamaCppError(
                f"llama-completion failed (exit {done.returncode}):\n{_tail(done.stderr.decode(errors='replace'))}"
            )
        return done.stdout.decode("utf-8", errors="replace").removesuffix("\n\n")  # it ends with two newlines
