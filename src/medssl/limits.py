"""Resource limits checked before anything is allocated, in one place.

Every limit is a field of :class:`Limits`. The defaults fit any real CT/MRI study (a 512x512x2000
CT is 0.5 G voxels) and refuse inputs that would exhaust a workstation. Raise one where a study
needs it:

- in a benchmark, fine-tuning or pretraining YAML: a ``limits:`` section, e.g.
  ``limits: {voxels_per_volume: 1500000000}``, or on the command line ``limits.voxels_per_volume=1.5e9``;
- for any command (``data check``, ``data ingest``, ``export``, the config file itself):
  ``medssl --limit voxels_per_volume=1500000000 <command> ...``. The command line passes these into
  the ``limits`` of every config it builds (pretrain, finetune, cka, a benchmark and through it each of
  its runs): a run in a spawned worker or under torchrun reads its limits from its config, never from
  this module's state in the process that started it.

Limits never change what a run computes, so they are left out of config hashes and run ids.
A limit that is hit raises ``MedsslInputError`` naming the file and the limit's setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from medssl.errors import MedsslInputError


class Limits(BaseModel):
    """The settings; each refuses an input before memory is allocated for it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    yaml_bytes: int = Field(1 << 20, ge=1, description="size of a config YAML file")
    yaml_nodes: int = Field(100_000, ge=1, description="YAML nodes after expanding aliases (alias bombs)")
    json_bytes: int = Field(64 << 20, ge=1, description="size of a dataset.json / manifest / splits file")
    labels: int = Field(1000, ge=2, description="labels declared in a task's dataset.json")
    label_value: int = Field(1000, ge=1, description="largest label value (the network has max+1 outputs)")
    voxels_per_volume: int = Field(1 << 29, ge=1, description="voxels of one volume, from its header")
    voxels_after_resampling: int = Field(1 << 29, ge=1, description="voxels of one volume after resampling")
    archive_member_bytes: int = Field(4 << 30, ge=1, description="bytes of one member of an .inv3 archive")
    batch_size: int = Field(
        1024,
        ge=1,
        description="crops per training step (schedule.batch_size): every crop of a step, its views and their "
        "activations are in memory at once (1,024 crops of 96^3 are 3.6 GB of float32 input alone)",
    )
    model_bytes: int = Field(
        4 << 30, ge=1, description="weights and buffers of a network, from the encoder a checkpoint or config declares"
    )


_active = Limits()


def limits() -> Limits:
    """The limits in force in this process."""
    return _active


def set_limits(new: Limits | dict | None) -> Limits:
    """Put ``new`` in force for this process (None: the defaults); returns the previous limits."""
    global _active
    previous = _active
    _active = new if isinstance(new, Limits) else Limits.model_validate(new or {})
    return previous


def exceeded(source: object, what: str, value: int | float, setting: str, why: str | None = None) -> MedsslInputError:
    """The one-line error for a hit limit: what was too large, why it is limited (when ``why`` is
    given) and which setting to raise."""
    bound = getattr(_active, setting)
    reason = f": {why}" if why else ""
    return MedsslInputError(
        str(source),
        f"{what} {value:,.0f} exceeds the limit {bound:,}{reason} (limits.{setting}; raise it in the config's "
        f"'limits:' section or with 'medssl --limit {setting}=N')",
    )


def check(source: object, what: str, value: int | float, setting: str, why: str | None = None) -> None:
    """Raise :func:`exceeded` when ``value`` is above the limit ``setting``."""
    if value > getattr(_active, setting):
        raise exceeded(source, what, value, setting, why)


def check_batch_size(batch_size: int, source: object = "schedule.batch_size") -> None:
    """Refuse a training batch beyond ``limits.batch_size`` before any crop is drawn (the command line
    checks it at the door; the training loop again, in the run's own process, under the run's limits)."""
    why = "every crop of a step, its views and their activations are held in memory at once"
    check(source, "schedule.batch_size", batch_size, "batch_size", why)
