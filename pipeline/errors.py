"""Every error a user can fix (bad params, missing inputs, ...): ``wsss`` prints it in one line and exits with 2."""


class UserError(Exception):
    """An error caused by the user's input or set-up, not by a bug; ``wsss`` exits with code 2 on it."""


class ConfigError(UserError, ValueError):
    """A params file that cannot be used."""


class DatasetError(UserError, ValueError):
    """A prepared dataset, CAM store or pseudo-label folder that is missing or inconsistent."""


class ModelError(UserError, ValueError):
    """A model directory that is missing, incomplete, or not loadable by this code (names the stage that makes it)."""


class PretrainedError(UserError, ValueError):
    """Pretrained weights that cannot be found or loaded."""


class SegModelError(UserError, ValueError):
    """A segmentation model that cannot be built or loaded."""


class CheckpointError(UserError, ValueError):
    """A resumable checkpoint that cannot be read or resumed (the message says to delete it or pass another path)."""


class DownloadError(UserError, ValueError):
    """A download that failed or did not verify."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, an impossible device or batch set-up)."""


class DistributedError(UserError, RuntimeError):
    """The processes of a ``torchrun`` launch cannot share a stage's work (e.g. they see different images)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
