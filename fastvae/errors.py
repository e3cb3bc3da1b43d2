"""The one error class that marks input a user can fix.

The command line prints a UserError (like the ValueError and OSError the library raises for bad
values and files) as one line without a traceback; any other exception escaping a command is a bug
and keeps its traceback. Library errors of other kinds that users cause (a checkpoint that cannot
be written, a diverged run, a folder in use) derive from it as well as from their own kind.
"""


class UserError(Exception):
    """Input the user can fix: a value, a file, a folder, the machine. The message says what and how."""
