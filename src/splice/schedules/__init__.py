"""Training schedules that act on the adapter during a run, one file each. Importing this
package registers them with the trainer (`schedule: {name: ...}` in a training config)."""

from splice.schedules.dmep import DMEP

__all__ = ["DMEP"]
