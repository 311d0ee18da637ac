"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""


class UserError(Exception):
  """A mistake in the command line, config or data that the user can fix.

  The message is printed as one line by the entry points, which exit with code 2.
  """
