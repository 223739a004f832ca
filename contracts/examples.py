"""Example messages, published in the JSON Schemas and checked against the models by the tests."""

from __future__ import annotations

from typing import Any

_USER = "user-42"
_PHOTO = "https://images.example.com/u/42/beach.jpg"
_UPLOAD = "https://bucket.s3.example.com/out/order-1001.png?X-Amz-Signature=abc123"
_CREATED = "2026-01-15T09:30:00Z"
_META: dict[str, Any] = {"order_id": 1001, "source": "mobile"}

TRANSFORM_REQUEST: list[dict[str, Any]] = [
    {"user_id": _USER, "image_url": _PHOTO, "style_type": "anime"},
    {
        "schema_version": 1,
        "task_id": "order-1001",
        "user_id": _USER,
        "image_url": _PHOTO,
        "style_type": "watercolor",
        "custom_prompt": "soft pastel colours, morning light",
        "negative_prompt": "text, watermark",
        "strength": 0.65,
        "seed": 123456789,
        "output": {"upload_url": _UPLOAD},
        "metadata": _META,
    },
]

BATCH_TRANSFORM_REQUEST: list[dict[str, Any]] = [
    {
        "schema_version": 1,
        "batch_id": "album-7",
        "user_id": _USER,
        "image_urls": [_PHOTO, "https://images.example.com/u/42/hike.png"],
        "style_type": "anime",
        "strength": 0.5,
        "metadata": {"album": "summer"},
    }
]

CANCEL_REQUEST: list[dict[str, Any]] = [
    {"task_id": "order-1001", "user_id": _USER},
    {"batch_id": "album-7", "user_id": _USER},
]

_EVENT_BASE: dict[str, Any] = {
    "schema_version": 1,
    "task_id": "order-1001",
    "user_id": _USER,
    "batch_id": None,
    "batch_index": None,
    "style_type": "watercolor",
    "style_version": "3f9a1c2b7d4e",
    "attempt": 1,
    "seed": 123456789,
    "instance": "gpu-a",
    "output_image_url": None,
    "output_image_urls": None,
    "error": None,
    "timings_ms": None,
    "metadata": _META,
    "created_at": _CREATED,
}

TASK_EVENT: list[dict[str, Any]] = [
    _EVENT_BASE
    | {
        "event": "started",
        "event_id": "6f1c2b1e-3f0a-4c55-9d8e-1a2b3c4d5e01",
        "status": "processing",
        "progress": 0,
        "timestamp": "2026-01-15T09:30:01.250Z",
    },
    _EVENT_BASE
    | {
        "event": "completed",
        "event_id": "6f1c2b1e-3f0a-4c55-9d8e-1a2b3c4d5e02",
        "status": "completed",
        "progress": 100,
        "output_image_url": "https://bucket.s3.example.com/out/order-1001.png",
        "output_image_urls": ["https://bucket.s3.example.com/out/order-1001.png"],
        "timings_ms": {
            "queued": 1250,
            "download": 180,
            "execute": 7400,
            "upload": 95,
            "total": 8925,
        },
        "timestamp": "2026-01-15T09:30:08.925Z",
    },
    _EVENT_BASE
    | {
        "event": "failed",
        "event_id": "6f1c2b1e-3f0a-4c55-9d8e-1a2b3c4d5e03",
        "task_id": "album-7-1",
        "batch_id": "album-7",
        "batch_index": 1,
        "style_type": "anime",
        "style_version": "7bccd04d5544",
        "status": "failed",
        "progress": 0,
        "instance": None,
        "seed": None,
        "error": {
            "code": "image_download_failed",
            "message": "GET https://images.example.com/u/42/hike.png answered 404",
            "retriable": False,
        },
        "metadata": {"album": "summer"},
        "timestamp": "2026-01-15T09:30:02Z",
    },
]

BATCH_COMPLETED_EVENT: list[dict[str, Any]] = [
    {
        "schema_version": 1,
        "event": "batch.completed",
        "event_id": "0b7e9a52-7d0c-4b8e-8f53-2f6f1d0c9a10",
        "batch_id": "album-7",
        "user_id": _USER,
        "style_type": "anime",
        "task_ids": ["album-7-0", "album-7-1"],
        "completed": 1,
        "failed": 1,
        "cancelled": 0,
        "metadata": {"album": "summer"},
        "timestamp": "2026-01-15T09:30:12Z",
    }
]
