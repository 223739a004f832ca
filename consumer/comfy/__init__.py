"""ComfyUI: one client per instance (HTTP + one WebSocket) and the pool that dispatches to them."""

from consumer.comfy.client import ComfyClient
from consumer.comfy.http import ClientTimeouts
from consumer.comfy.instance import Instance, InstanceStats
from consumer.comfy.messages import OutputImage
from consumer.comfy.pool import InstancePool
from consumer.comfy.run import PromptRun
from consumer.comfy.scheduling import Demand, ModelLoad, Priority

__all__ = [
    "ClientTimeouts",
    "ComfyClient",
    "Demand",
    "Instance",
    "InstancePool",
    "InstanceStats",
    "ModelLoad",
    "OutputImage",
    "Priority",
    "PromptRun",
]
