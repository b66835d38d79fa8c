"""The reconciler: ``loop`` plans the passes and runs the steps of ``provision``, ``snapshots``, ``upkeep`` and ``drift``, which share ``steps``."""
