"""``/v1/datasets``: the datasets under the data root, as their manifests summarise them,
and those whose first rows are still pending (a dataset's directory appears with its first
shard)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, status

from distillcache.shared.manifest import DatasetError, find_manifest, read_manifest

from .deps import Ready, State, dataset_name
from .index import dataset_names
from .protocol import DatasetSummary
from .runtime import Runtime

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get("", response_model=list[DatasetSummary])
async def list_datasets(rt: Ready, state: State) -> list[DatasetSummary]:
    names = await asyncio.to_thread(_names, rt, state)
    return [await asyncio.to_thread(_summary, rt, state, n) for n in names]


@router.get("/{name}", response_model=DatasetSummary)
async def get_dataset(name: str, rt: Ready, state: State) -> DatasetSummary:
    name = dataset_name(name, "name")
    if name not in await asyncio.to_thread(_names, rt, state):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"name: no dataset {name!r}")
    return await asyncio.to_thread(_summary, rt, state, name)


def _names(rt: Runtime, state: State) -> list[str]:
    return sorted({*dataset_names(state.data_root), *rt.store.pending_datasets()})


def _summary(rt: Runtime, state: State, name: str) -> DatasetSummary:
    unpublished = rt.store.pending_datasets().get(name)
    if unpublished is not None and find_manifest(state.data_root / name) is None:
        return DatasetSummary(name=name, pending_rows=rt.store.pending_rows(name), info=unpublished)
    try:
        manifest = read_manifest(state.data_root / name)
    except DatasetError as e:
        return DatasetSummary(name=name, error=str(e))
    return DatasetSummary.of(name, manifest, rt.store.pending_rows(name))
