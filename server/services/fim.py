"""Fill-in-the-middle prompts in the model's own format, and where a completion must stop.

Qwen2.5-Coder (and the StarCoder family) infill with
``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``. Instruct models tend to write the
middle and then carry on repeating the suffix, so a FIM request also stops where the output starts
repeating the suffix's first non-blank line.
"""

from __future__ import annotations

import re
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
BLOCK_END = "\n\n"
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
    """Stop strings that catch the model running into the suffix.

    Three forms, most specific first (vLLM stops at whichever matches first):

    - exact: the suffix up to the end of its first non-blank line, leading newlines and
      indentation included, so the cut lands exactly where the suffix begins;
    - loose: that line without its indentation, for a model that re-indents;
    - head: a new line that starts like the suffix's first line (``"\nprint("`` for
      ``print(add(1, 2))``), for a model that goes on to write similar code rather than repeat the
      suffix verbatim.

    The loose and head forms are used only when at least four characters long: shorter ones
    (``}``, ``end``) occur too often in code to stop on. A blank suffix (the cursor at the end of
    the file) gives nothing to run into, so the completion stops at the first blank line instead:
    the end of the block being written.
    """
    stops: list[str] = []
    offset = 0
    for line in suffix.splitlines(keepends=True):
        if line.strip():
            body = line.rstrip("\r\n")
            stops.append(suffix[: offset + len(body)])
            loose = body.strip()
            indent = body[: len(body) - len(body.lstrip())]
            head = _HEAD.match(loose)
            candidates = [loose]
            if head:
                candidates.append("\n" + indent + head.group(0))
            for candidate in candidates:
                if len(candidate.strip()) >= MIN_LOOSE_MARKER and candidate not in stops:
                    stops.append(candidate)
            break
        offset += len(line)
    return stops or [BLOCK_END]


# The start of a line of code up to its first bracket or space: "print(", "return ", "self.x ".
_HEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*[(\[ ]")
