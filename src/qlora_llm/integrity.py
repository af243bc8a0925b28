"""Weight files checked before anything loads them: a damaged file or a pickle is refused, by name.

A truncated or hand-edited safetensors file makes the loaders fail deep inside with a parser message
(or, for a header that still parses, load garbage); a folder of pickle `.bin` weights runs whatever
code its author put in it when unpickled. Both are caught here, before loading, with one error that
says which file and what to do. safetensors' own reader does the checking (`safe_open` validates the
header and that the tensors cover the file exactly); nothing is parsed by hand.
"""

from __future__ import annotations

from pathlib import Path

from qlora_llm.errors import QloraError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
WEIGHT_STEMS = ("model", "pytorch_model", "adapter_model")


class DamagedFileError(QloraError, RuntimeError):
    """A weight file that must not be loaded; the message names it and says what to do."""


def check_weights(folder: Path, *, allow_pickle: bool = False) -> None:
    """Every safetensors file in `folder` is whole; pickle-only weights are refused unless allowed."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    tensors = sorted(folder.glob("*.safetensors"))
    for file in tensors:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise DamagedFileError(
                f"{file}: not a valid safetensors file ({err}); it was cut short or changed after it was "
                "written. Copy it again or re-create it (qlora-llm train / merge)."
            ) from err
    pickles = [f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name.startswith(WEIGHT_STEMS)]
    if pickles and not tensors and not allow_pickle:
        raise DamagedFileError(
            f"{folder}: its weights are pickle files ({', '.join(sorted(p.name for p in pickles))}), and "
            "unpickling runs any code the file's author put in it. Convert them to safetensors, or, if you "
            "trust their source, set model.allow_pickle=true."
        )
