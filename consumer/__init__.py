"""Style consumer: turns photos into styled images on a pool of ComfyUI servers."""

__version__ = "0.1.0"
