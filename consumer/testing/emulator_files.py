"""POST /upload/image and GET /view of the emulator, with ComfyUI's naming and status codes."""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
from pathlib import Path

from aiohttp import web

from consumer.testing.emulator_nodes import Dirs

_FORCE_DOWNLOAD = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}


def _same_bytes(path: Path, data: bytes) -> bool:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest == hashlib.sha256(data).hexdigest()


def _free_name(folder: Path, filename: str, data: bytes) -> tuple[str, bool]:
    """(name, duplicate): reuse a same-bytes file, else try "name (1).ext", "name (2).ext"..."""
    stem, ext = os.path.splitext(filename)  # noqa: PTH122 - ComfyUI splits exactly like this
    name, counter = filename, 1
    while (folder / name).exists():
        if _same_bytes(folder / name, data):
            return name, True
        name = f"{stem} ({counter}){ext}"
        counter += 1
    return name, False


def _store_upload(
    upload_dir: Path, subfolder: str, filename: str, data: bytes, overwrite: bool
) -> str | None:
    """Write (or reuse) the upload; its final name, or None for a path escaping the folder."""
    folder = Path(os.path.abspath(upload_dir / os.path.normpath(subfolder)))  # noqa: PTH100
    target = Path(os.path.abspath(folder / filename))  # noqa: PTH100
    if os.path.commonpath((upload_dir.resolve(), target)) != str(upload_dir.resolve()):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    name, duplicate = filename, False
    if not overwrite:
        name, duplicate = _free_name(folder, filename, data)
    if not duplicate:
        (folder / name).write_bytes(data)
    return name


async def upload_image(request: web.Request, dirs: Dirs) -> web.Response:
    post = await request.post()
    image = post.get("image")
    kind = str(post.get("type") or "input")
    upload_dir = dirs.by_type(kind)
    if upload_dir is None:
        msg = f"unknown upload type {kind!r}"
        raise ValueError(msg)  # ComfyUI crashes here too: 500
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    subfolder = str(post.get("subfolder", ""))
    overwrite = str(post.get("overwrite")) in {"true", "1"}
    data = image.file.read()
    store = (upload_dir, subfolder, image.filename, data, overwrite)
    name = await asyncio.to_thread(_store_upload, *store)
    if name is None:
        return web.Response(status=400)
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


def _view_target(request: web.Request, dirs: Dirs) -> Path | web.Response:
    query = request.rel_url.query
    if "filename" not in query:
        return web.Response(status=404)
    filename, folder = query["filename"], None
    for tag in ("output", "input", "temp"):
        if filename.endswith(f" [{tag}]"):
            filename, folder = filename[: -len(tag) - 3], dirs.by_type(tag)
    if not filename or filename[0] == "/" or ".." in filename:
        return web.Response(status=400)
    if folder is None:
        folder = dirs.by_type(query.get("type", "output"))
    if folder is None:
        return web.Response(status=400)
    folder = folder.resolve()
    if "subfolder" in query:
        full = Path(os.path.abspath(folder / query["subfolder"]))  # noqa: PTH100
        if os.path.commonpath((full, folder)) != str(folder):
            return web.Response(status=403)
        folder = full
    return folder / os.path.basename(filename)  # noqa: PTH119


async def view(request: web.Request, dirs: Dirs) -> web.StreamResponse:
    target = await asyncio.to_thread(_view_target, request, dirs)
    if isinstance(target, web.Response):
        return target
    if not await asyncio.to_thread(target.is_file):
        return web.Response(status=404)
    content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if content_type in _FORCE_DOWNLOAD:
        content_type = "application/octet-stream"
    headers = {"Content-Disposition": f'filename="{target.name}"', "Content-Type": content_type}
    return web.FileResponse(target, headers=headers)
