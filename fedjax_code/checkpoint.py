"""Orbax checkpoints of the simulation's server state and a JSON meta dict (the round, a messenger's size).
Per-client state lives in the run's client store (``federated.client_store``), committed with each checkpoint.

Nothing random needs saving: every key derives from (seed, round, client), so a run restored at
round r continues exactly as the uninterrupted run would (bit-identical on the same devices).
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


LEGACY = {"clients": None}  # the empty slot stacked client states had: kept so that earlier checkpoints restore


class Checkpointer:
    """Save/restore the server state pytree plus a JSON ``meta`` dict, keeping the last few."""

    def __init__(self, directory: Path, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def all_rounds(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, round_: int, server, meta: dict) -> None:
        state = ocp.args.StandardSave({"server": server, **LEGACY})
        self._manager.save(round_, args=ocp.args.Composite(state=state, meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, round_: int, server_like):
        """(server, meta) at ``round_``; ``server_like`` gives the structure, shapes and dtypes."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"server": server_like, **LEGACY})
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(round_, args=args)
        return restored.state["server"], restored.meta

    def meta(self, round_: int) -> dict:
        """The JSON ``meta`` saved with ``round_``, without reading the arrays."""
        return self._manager.restore(round_, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self._manager.close()
