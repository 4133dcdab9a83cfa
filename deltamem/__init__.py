"""δ-mem: a tiny online memory for frozen LLMs (arXiv 2605.12357).

from deltamem import DeltaMemConfig, attach_delta_mem, load_adapter
model = attach_delta_mem(model, DeltaMemConfig(rank=8, write_mode="TSW", branches=("q", "o")))
state = model.write_memory(history_ids)
out = model.generate(question_ids, memory=state)
model.save_adapter("adapters/tsw")
session = MemorySession(model, tokenizer)   # speaks the adapter's training chat format
"""

from .adapter import adapter_digest, load_adapter, read_adapter_config, save_adapter
from .attach import attach_delta_mem, detach_delta_mem, write_memory
from .chat import ChatFormat, ChatSettings
from .config import DeltaMemConfig
from .session import MemorySession, encode_messages, format_message
from .state import MemoryState

__all__ = [
    "ChatFormat",
    "ChatSettings",
    "DeltaMemConfig",
    "MemorySession",
    "MemoryState",
    "adapter_digest",
    "attach_delta_mem",
    "detach_delta_mem",
    "encode_messages",
    "format_message",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
    "write_memory",
]
__version__ = "0.1.0"
