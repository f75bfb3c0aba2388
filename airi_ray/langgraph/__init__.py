"""LangGraph on airi (``pip install 'airi-ray[langgraph]'``): ``AiriCheckpointSaver`` keeps a
LangGraph graph's checkpoints in airi's context store, and ``AiriChatModel`` makes its model
calls through airi's call path, under the run's identity."""

from airi_ray.langgraph.chat_model import AiriChatModel
from airi_ray.langgraph.saver import AiriCheckpointSaver

__all__ = ["AiriChatModel", "AiriCheckpointSaver"]
