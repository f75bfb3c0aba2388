"""LangGraph on airi: ``AiriCheckpointSaver`` keeps a LangGraph graph's checkpoints in airi's
context store (``pip install 'airi-ray[langgraph]'``)."""

from airi_ray.langgraph.saver import AiriCheckpointSaver

__all__ = ["AiriCheckpointSaver"]
