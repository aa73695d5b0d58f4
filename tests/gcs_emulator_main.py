"""Starts `gcp-storage-emulator` with the object generation on every download.

Real GCS answers a media download with the object's generation in the `x-goog-generation`
header; the emulator (2026.7.19) sends it only in the JSON metadata. TensorStore's GCS driver
reads the header, and without it reports every object's generation as 0, so its conditional
writes (Orbax's OCDBT checkpoints rewrite their manifest on the condition that it is unchanged)
fail with `Malformed StorageGeneration`. This launcher adds the header (and nothing else) to
the emulator's download handler, then runs the emulator's own command line:

    python tests/gcs_emulator_main.py start --host=127.0.0.1 --port=P --default-bucket=B
"""

from __future__ import annotations

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_DOWNLOAD = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except NotFound:
        pass  # the emulator's handler answers 404
    return _DOWNLOAD(request, response, storage, *args, **kwargs)


objects.download = download  # `GET .../o/NAME?alt=media` (objects.get) calls it by this name
server.HANDLERS = tuple(
    (pattern, {m: download if h is _DOWNLOAD else h for m, h in methods.items()})
    for pattern, methods in server.HANDLERS
)

if __name__ == "__main__":
    main()
