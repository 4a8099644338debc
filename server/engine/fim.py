"""Fill-in-the-middle prompts in the model's own format, and where a completion must stop.

Qwen2.5-Coder (and the StarCoder family) infill with
``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``. Instruct models tend to write the
middle and then carry on repeating the suffix, so a FIM request also stops where the output starts
repeating the suffix's first non-blank line.

Repository-level completion puts other files of the repository before the infill, in the form
Qwen2.5-Coder was trained on::

    <|repo_name|>{name}
    <|file_sep|>{path}
    {content}
    <|file_sep|>{current path}
    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

That text before ``<|fim_prefix|>`` is the *FIM context*: Kaizen builds it from Tabby's
declarations and snippets, and finds it in Continue's multi-file template, which sends the whole
prompt ready-made; :func:`split_fim_prompt` takes such a prompt apart again so that the record
holds prefix, suffix and context separately.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"
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

    def build(self, prefix: str, suffix: str, context: str = "") -> str:
        """The model's prompt; ``context`` (a FIM context, see the module docstring) first."""
        return f"{context}{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


@dataclass(frozen=True)
class RepoFile:
    """Another file's text that the model sees before the infill (a declaration, a snippet)."""

    path: str
    body: str


def repo_context(name: str, files: Sequence[RepoFile], file_path: str | None) -> str:
    """The FIM context for ``files`` of repository ``name``, the current file last (its path
    only: its text is the prefix and suffix that follow). Empty without files, so a request
    without repository context gets the plain file-level prompt."""
    if not files:
        return ""
    parts = [f"{REPO_NAME}{name}\n"]
    parts += [f"{FILE_SEP}{f.path}\n{f.body}\n" for f in files]
    parts.append(f"{FILE_SEP}{file_path or 'untitled'}\n")
    return "".join(parts)


@dataclass(frozen=True)
class SplitPrompt:
    """A FIM prompt a client templated itself, taken apart."""

    prefix: str
    suffix: str
    context: str  # the text before <|fim_prefix|> (empty for a file-level prompt)
    repo_name: str | None  # from <|repo_name|>, when the context has one
    file_path: str | None  # the current file's path: the context's last <|file_sep|>


def split_fim_prompt(prompt: str, fim: FimFormat | None = None) -> SplitPrompt | None:
    """Prefix, suffix and FIM context of a prompt already in the model's FIM format (what
    Continue sends with no ``suffix``), or ``None`` for any other prompt.

    Only an exact, unambiguous form is split: each of the three markers once, in order, the
    prompt ending with ``<|fim_middle|>``, so that ``fim.build(prefix, suffix, context)`` gives
    the prompt back character for character and the model sees exactly what the client sent.
    """
    fim = fim or FimFormat()
    if not prompt.endswith(fim.middle) or any(prompt.count(t) != 1 for t in fim.tokens()):
        return None
    context, _, rest = prompt.partition(fim.prefix)
    prefix, _, rest = rest.partition(fim.suffix)
    suffix = rest[: -len(fim.middle)]
    if fim.middle in prefix or fim.build(prefix, suffix, context) != prompt:
        return None
    repo_name = None
    if context.startswith(REPO_NAME):
        repo_name = context[len(REPO_NAME) :].split("\n", 1)[0].split(FILE_SEP, 1)[0].strip()
    file_path = None
    if FILE_SEP in context:
        file_path = context.rsplit(FILE_SEP, 1)[1].strip() or None
    return SplitPrompt(prefix, suffix, context, repo_name or None, file_path)


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

# What begins a new top-level definition in Python. Inside an indented block, a completion that
# writes one at column 0 has finished the block and gone on to invent the next function; the
# suffix stops miss it when that function differs from the one in the suffix (seen on real
# projects: `def expand_sig_with_keywords(` before the suffix's `def expand_sig(sig):`), and
# the half-written `def` it leaves breaks the whole module.
_PYTHON_TOP_LEVEL = ("def ", "async def ", "class ", "@", "if __name__")


def block_stops(prefix: str, language: str | None) -> list[str]:
    """Stop strings at the end of the block the cursor is in, where the language says where
    that is. Python only (the IDE's ``context.language``): when the cursor is inside an
    indented block (its line is indented, or the last line before it opens or sits in one), a
    new line at column 0 that starts a definition ends the completion. Empty otherwise."""
    if (language or "").strip().lower() != "python":
        return []
    before, _, current = prefix.rpartition("\n")
    if current.strip() == "" and current:  # an indented blank line: the block's indentation
        inside = True
    elif current:  # text before the cursor on its line
        inside = current[:1] in (" ", "\t")
    else:  # column 0 of a new line: inside if the last line of code opens or sits in a block
        lines = [line for line in before.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        inside = last[:1] in (" ", "\t") or last.rstrip().endswith(":")
    return ["\n" + keyword for keyword in _PYTHON_TOP_LEVEL] if inside else []
