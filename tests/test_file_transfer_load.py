"""Gateway → child downloads under load: 50 children fetch one large file at once, some of
them resuming with Range, all byte-exact."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp

from tedge_firmware.shell.file_transfer import FileTransferServer

SIZE = 24 << 20
CHILDREN = 50


async def fetch(session: aiohttp.ClientSession, url: str, start: int) -> tuple[int, bytes, str]:
    headers = {"Range": f"bytes={start}-"} if start else {}
    async with session.get(url, headers=headers) as answer:
        digest = hashlib.sha256()
        async for chunk in answer.content.iter_chunked(1 << 20):
            digest.update(chunk)
        return answer.status, digest.digest(), answer.headers.get("Content-Range", "")


async def test_fifty_children_fetch_one_large_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = tmp_path / "file-transfer"
    cache.mkdir()
    content = os.urandom(SIZE)
    (cache / "FILE_ID").write_bytes(content)
    links = []
    for child in range(CHILDREN):
        link = root / f"child{child}" / "firmware_update" / "FILE_ID"
        link.parent.mkdir(parents=True)
        link.symlink_to(cache / "FILE_ID")
        links.append(f"child{child}/firmware_update/FILE_ID")
    server = FileTransferServer(root=root, cache_dir=cache, host="127.0.0.1", port=0)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}/tedge/file-transfer"
        # every fifth child resumes from a different offset, as after a cut download
        starts = [(child * 997_001) % SIZE if child % 5 == 0 and child else 0 for child in range(CHILDREN)]
        connector = aiohttp.TCPConnector(limit=CHILDREN)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(120):
            results = await asyncio.gather(
                *(fetch(session, f"{base}/{link}", start) for link, start in zip(links, starts, strict=True))
            )
        for start, (status, digest, content_range) in zip(starts, results, strict=True):
            assert digest == hashlib.sha256(content[start:]).digest()
            if start:
                assert status == 206 and content_range == f"bytes {start}-{SIZE - 1}/{SIZE}"
            else:
                assert status == 200
    finally:
        await server.stop()
