"""Token methods of the engine interface over the checkpoint's Hugging Face tokenizer.

Both engines tokenise with the checkpoint's own tokenizer, so a prompt is the same token ids
whichever engine serves it (the llama.cpp engine's GGUF carries the same vocabulary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.base import EngineNotReadyError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class HfTokenMethods:
    """``tokenize``, ``apply_chat_template`` and ``special_token_id`` for an engine that sets
    ``_tokenizer`` when it starts."""

    _tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise EngineNotReadyError("The model is still loading.")
        return self._tokenizer

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    def special_token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            return None
        return int(token_id)
