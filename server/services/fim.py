"""Fill-in-the-middle prompts in the model's own format, and where a completion must stop.

Qwen2.5-Coder (and the StarCoder family) infill with
``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``. Instruct models tend to write the
middle and then carry on repeating the suffix, so a FIM request also stops where the output starts
repeating the suffix's first non-blank line.
"""

from __future__ import annotations

from dataclasses import dataclass

FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
# Tokens after which nothing useful follows in an infill (they end a file or start a new one).
FIM_END_TOKENS = (
    "<|endoftext|>",
    "<|fim_pad|>",
    "<|file_sep|>",
    "<|repo_name|>",
    "<|im_end|>",
    FIM_PREFIX,
    FIM_SUFFIX,
    FIM_MIDDLE,
)
# A loose marker shorter than this ("}", "end") occurs too often in code to stop on.
MIN_LOOSE_MARKER = 4


@dataclass(frozen=True)
class FimFormat:
    prefix: str = FIM_PREFIX
    suffix: str = FIM_SUFFIX
    middle: str = FIM_MIDDLE

    def tokens(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle

    def build(self, prefix: str, suffix: str) -> str:
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


def suffix_stops(suffix: str) -> list[str]:
    """Stop strings that catch the model repeating ``suffix``.

    The exact form is the suffix up to the end of its first non-blank line (leading newline and
    indentation included), so the cut lands exactly where the suffix begins. The loose form is
    that line without its indentation, for a model that re-indents; it is used only when long
    enough to be specific.
    """
    stops: list[str] = []
    offset = 0
    for line in suffix.splitlines(keepends=True):
        if line.strip():
            exact = suffix[: offset + len(line.rstrip("\r\n"))]
            stops.append(exact)
            loose = line.strip()
            if len(loose) >= MIN_LOOSE_MARKER and loose != exact:
                stops.append(loose)
            break
        offset += len(line)
    return stops
