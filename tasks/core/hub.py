"""A model named by its Hugging Face Hub id (`org/name`, optionally at a revision) as a local model
directory: the one place a Hub id is told from a path, resolved to a commit and downloaded.

The revision is resolved to a commit first and everything after reads that commit's snapshot, so a
branch moved between the resolution and a worker's load changes nothing (and a workflow keys its nodes
on the commit). Only what slimmoe loads is downloaded: config, tokenizer and the safetensors files
the index names (a repository's other formats and copies of the weights are left on the Hub).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slimmoe.tasks.core.fingerprint import TOKENIZER_FILES
from slimmoe.tasks.core.safetensors_files import SAFETENSORS_INDEX

# `name` or `org/name` as the Hub spells them; a leading `.`, `/` or `~` always means a path.
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
METADATA_FILES = ("config.json", "generation_config.json", SAFETENSORS_INDEX, *TOKENIZER_FILES)
SINGLE_FILE = "model.safetensors"
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelError(ValueError):
    """A Hub model that cannot be had here, in one line with what to do; `field` is the setting at
    fault (`path` or `revision`)."""

    def __init__(self, message: str, field: str = "path"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModelSource:
    """A model as a local directory (`path`), and, for a Hub model, the id, the revision asked for and
    the commit it resolved to."""

    path: str
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    commit: Optional[str] = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def describe(self) -> str:
        if not self.is_hub:
            return self.path
        return f"{self.repo_id} at {self.revision or 'main'} (commit {self.commit}), snapshot {self.path}"

    def record(self) -> dict:
        """What a run records of where its model came from."""
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit, "path": self.path}


def is_hub_id(path: str | os.PathLike) -> bool:
    """A local path that exists wins; otherwise a string shaped like `name` or `org/name` is a Hub id."""
    text = str(path)
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()


def hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import, before a wrapper or a
    # test has set it.
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((v or "").upper() in _TRUE for v in flags) or constants.is_offline_mode()


def hub_cache_dir(workflow_cache: Optional[str | os.PathLike] = None) -> Path:
    """Where snapshots go: HF_HUB_CACHE (or HF_HOME/hub) when set, so a pre-filled cache is used; else
    a workflow's `cache_dir`/hub, the filesystem every node of its cluster mounts; else the default
    Hub cache. The environment is read now, not at huggingface_hub's import."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    if workflow_cache:
        return Path(workflow_cache).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_model(path: str | os.PathLike, revision: Optional[str] = None, *, weights: bool = True,
                  trust_remote_code: bool = False, cache_dir: Optional[str | os.PathLike] = None) -> ModelSource:
    """`path` as a local model directory. A Hub id is resolved to a commit (the Hub's answer, or offline
    the commit the cache's `refs/<revision>` names) and that commit's snapshot is downloaded into the
    Hub cache (`hub_cache_dir(cache_dir)`) unless already there: config and tokenizer, and with
    `weights` the safetensors files. Raises HubModelError with the fix. A path that is not a Hub id is
    returned as it is (whether it is a model directory is the caller's check)."""
    text = str(path)
    if not is_hub_id(text):
        if revision:
            raise HubModelError(f"revision {revision!r} picks a commit of a Hub model, but {text} is a local path: "
                                "remove the revision (or name the model by its Hub id)", field="revision")
        return ModelSource(text)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError, RevisionResolutionError)

    cache, offline = hub_cache_dir(cache_dir), hub_offline()
    asked = revision or "main"
    only = "" if weights else " config.json"  # the plan reads nothing else: no need to fetch the weights for it
    download = f"`hf download {text} --revision {asked} --cache-dir {cache}{only}`"
    code = ("*.py",) if trust_remote_code else ()  # remote code is not even fetched unless it may run
    try:
        commit = HfApi().resolve_revision(text, revision=revision, cache_dir=cache, local_files_only=offline).resolved
        snapshot = Path(snapshot_download(text, revision=commit, cache_dir=cache, local_files_only=offline,
                                          allow_patterns=[*METADATA_FILES, *code]))
        if weights:
            files = _weight_files(snapshot)
            snapshot_download(text, revision=commit, cache_dir=cache, local_files_only=offline, allow_patterns=files)
    except GatedRepoError:
        raise HubModelError(f"{text} is a gated model: accept its terms at https://huggingface.co/{text} and give a "
                            "token of that account (set HF_TOKEN, or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubModelError(f"{text} has no revision {asked!r}: name one of its branches, tags or commits",
                            field="revision") from None
    except RepositoryNotFoundError:
        raise HubModelError(f"{text} is neither a local directory nor a model on the Hub you can read: check the id, "
                            "or for a private model give a token (set HF_TOKEN, or run `hf auth login`)") from None
    except (RevisionResolutionError, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise HubModelError(f"{text} is neither a local directory nor in the Hub cache {cache} at revision {asked}, "
                            f"and {why}: download it with {download} where the Hub is reachable") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise HubModelError(f"the Hub answered {status} for {text} ({str(err).splitlines()[0]}); try again later, or "
                            f"download it with {download}") from None
    except OSError as err:  # e.g. a cache on a mount this machine lacks
        raise HubModelError(f"cannot use the Hub cache {cache} for {text} ({err}): set HF_HUB_CACHE to a writable "
                            "directory") from None
    if weights:
        missing = [f for f in [*_weight_files(snapshot), "config.json"] if not (snapshot / f).is_file()]
        if missing:
            raise HubModelError(f"the snapshot of {text} at commit {commit} in {snapshot} lacks {', '.join(missing)} "
                                f"(slimmoe reads safetensors weights only): complete it with {download}")
    elif not (snapshot / "config.json").is_file():
        raise HubModelError(f"the snapshot of {text} at commit {commit} in {snapshot} has no config.json: complete it "
                            f"with {download}")
    return ModelSource(str(snapshot), text, revision, commit)


def _weight_files(snapshot: Path) -> list[str]:
    """The safetensors files the snapshot's index names (a repository may also hold other copies of the
    weights, e.g. `consolidated.safetensors`, which `from_pretrained` does not read), or the single file."""
    index = snapshot / SAFETENSORS_INDEX
    if not index.is_file():
        return [SINGLE_FILE]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise HubModelError(f"{index} is not a safetensors index ({err})") from None
    return sorted(set(weight_map.values()))


__all__ = ["HUB_ID", "HubModelError", "ModelSource", "hub_cache_dir", "hub_offline", "is_hub_id", "resolve_model"]
