"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil

# How libraries that write files in C++ or Rust report the OS error inside their own exceptions:
# tensorstore (Orbax's arrays) "[os_error_code='28']", safetensors "(os error 28)".
_EMBEDDED_OS_ERROR = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")


class UserError(Exception):
  """A mistake in the command line, config or data that the user can fix.

  The message is printed as one line by the entry points, which exit with code 2.
  """


class RunStopped(Exception):
  """Training stopped early with everything saved; the message says why and how to go on.

  The entry points print it as one line and exit with `exit_code`.
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def os_error_of(error: BaseException | None) -> OSError | None:
  """The OS error behind a failed write (disk full, permissions), or None for any other failure:
  an OSError itself, or one that tensorstore or safetensors report inside their own exceptions;
  causes are followed too."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error
    embedded = _EMBEDDED_OS_ERROR.search(str(error))
    if embedded is not None:
      number = int(embedded.group(1) or embedded.group(2))
      return OSError(number, os.strerror(number))
    if os.strerror(errno.ENOSPC) in str(error):
      return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    error = error.__cause__ or error.__context__
  return None


def free_space(path: pathlib.Path) -> str:
  """'1.2 MiB free' on the file system holding `path` (or its nearest existing parent)."""
  while not path.exists() and path != path.parent:
    path = path.parent
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return "free space unknown"
  return f"{free / 2**30:.1f} GiB free" if free >= 2**30 else f"{free / 2**20:.1f} MiB free"


def disk_error(os_error: OSError, doing: str, directory: pathlib.Path, then: str,
               fewer_checkpoints: bool = False) -> UserError:
  """One line for a write the disk refused: what failed where, the free space, the fix, and how
  to go on."""
  reason = os_error.strerror or str(os_error) or type(os_error).__name__
  reason = reason[0].lower() + reason[1:]
  if os_error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = f"make {directory} writable"
  elif os_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, None):
    fix = "free disk space" + (" or keep fewer checkpoints with --save_total_limit"
                               if fewer_checkpoints else "")
  else:
    fix = f"check {directory} and its disk"
  return UserError(f"{reason} while {doing} to {directory} ({free_space(directory)}): {fix}, "
                   f"then {then}")
