"""Starts `gcp-storage-emulator` with two answers of real GCS that it lacks and the tests need.

1. The object generation on every download (`x-goog-generation`). The emulator (2026.7.19)
   sends it only in the JSON metadata; TensorStore's GCS driver reads the header, and without
   it takes every generation for 0, so its conditional writes (Orbax's OCDBT checkpoints
   rewrite their manifest on the condition that it is unchanged) fail with `Malformed
   StorageGeneration`.
2. `startOffset` / `endOffset` in object listings. The emulator ignores them and lists the
   whole bucket; TensorStore deletes a key range (`delete_existing=True` of the latent store's
   arrays) by listing the range and deleting what comes back, so it would delete everything.

This launcher wraps the emulator's two handlers (and changes nothing else), then runs the
emulator's own command line:

    python tests/gcs_emulator_main.py start --host=127.0.0.1 --port=P --default-bucket=B
"""

from __future__ import annotations

import json

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_DOWNLOAD, _LS = objects.download, objects.ls


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except NotFound:
        pass  # the emulator's handler answers 404
    return _DOWNLOAD(request, response, storage, *args, **kwargs)


def ls(request, response, storage, *args, **kwargs):
    _LS(request, response, storage, *args, **kwargs)
    start = request.query.get("startOffset", [""])[0]
    end = request.query.get("endOffset", [None])[0]
    if (start or end) and response._content:
        listing = json.loads(response._content)
        listing["items"] = [
            item
            for item in listing.get("items") or []
            if item["name"] >= start and (end is None or item["name"] < end)
        ]
        response.json(listing)


objects.download = download  # `GET .../o/NAME?alt=media` (objects.get) calls it by this name
_REPLACED = {_DOWNLOAD: download, _LS: ls}
server.HANDLERS = tuple(
    (pattern, {m: _REPLACED.get(h, h) for m, h in methods.items()})
    for pattern, methods in server.HANDLERS
)

if __name__ == "__main__":
    main()
