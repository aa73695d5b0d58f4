"""Released weights by name: `hf://OWNER/REPO/FILE[@REVISION]` or a repo id and a variant.

    ReducioVAE.from_pretrained("microsoft/Reducio-VAE", variant="ft4", cfg="configs/reducio_ft4.py")
    python -m reducio_jax eval --checkpoint hf://microsoft/Reducio-VAE/reducio-ft4-fs32-attn23.ckpt ...

The file comes through `huggingface_hub.hf_hub_download`: its cache (`HF_HOME`), revision
pinning (`@REVISION`: a branch, tag or commit), offline mode (`HF_HUB_OFFLINE=1` uses the cache
only) and endpoint (`HF_ENDPOINT`). The conversion to this package's layout runs once per
downloaded file: the converted directory is kept under `REDUCIO_JAX_CACHE` (default
`~/.cache/reducio_jax`)/converted/<the file's hub etag>/ and read from there afterwards.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from reducio_jax.errors import InputError

SCHEME = "hf://"

# variant -> the released file (microsoft/Reducio-VAE on the Hugging Face hub)
VARIANTS = {"ft4": "reducio-ft4-fs32-attn23.ckpt", "ft2": "reducio-ft2-fs32-attn23.ckpt"}


class HubError(InputError):
    """A hub name that cannot be fetched (one line: what is missing, or no network)."""


def is_hub(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEME)


def hub_name(repo_id: str, variant: str | None = None, filename: str | None = None) -> str:
    """`hf://REPO/FILE` of a repo id and a variant (or a file name)."""
    if filename is None:
        if variant not in VARIANTS:
            raise HubError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
        filename = VARIANTS[variant]
    return f"{SCHEME}{repo_id}/{filename}"


def parse(spec: str) -> tuple[str, str, str | None]:
    """`hf://OWNER/REPO/PATH/IN/REPO[@REVISION]` -> (repo id, file path, revision or None)."""
    body, _, revision = spec.removeprefix(SCHEME).partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(f"{spec} is not hf://OWNER/REPO/FILE[@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def download(spec: str) -> pathlib.Path:
    """The local (cached) copy of a hub file; `HubError` in one line when it cannot be had."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    repo_id, filename, revision = parse(spec)
    try:
        return pathlib.Path(hf_hub_download(repo_id, filename, revision=revision))
    except hub_errors.RepositoryNotFoundError:
        raise HubError(f"{spec}: no repository {repo_id} on the hub (or it is private)") from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(f"{spec}: {repo_id} has no revision {revision}") from None
    except hub_errors.LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError)
        raise HubError(
            f"{spec}: cannot reach the hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}) "
            "and the file is not in the cache (HF_HUB_OFFLINE=1 reads only the cache)"
        ) from None
    except hub_errors.EntryNotFoundError:
        raise HubError(f"{spec}: {repo_id} has no file {filename}") from None
    except (hub_errors.HfHubHTTPError, OSError) as err:
        raise HubError(f"{spec}: {' '.join(str(err).split())[:300]}") from None


def cache_root() -> pathlib.Path:
    default = pathlib.Path("~/.cache/reducio_jax").expanduser()
    return pathlib.Path(os.environ.get("REDUCIO_JAX_CACHE", default)).expanduser()


def converted_dir(local_file: pathlib.Path) -> pathlib.Path:
    """Where the conversion of a downloaded hub file is kept: keyed by the file's blob (the
    hub cache links each snapshot file to a blob named by its etag)."""
    blob = local_file.resolve().name
    return cache_root() / "converted" / blob


__all__ = ["VARIANTS", "HubError", "download", "hub_name", "is_hub", "parse"]
