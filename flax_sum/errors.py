"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""


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
