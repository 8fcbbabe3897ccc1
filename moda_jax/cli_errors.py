"""The user's mistakes as one line, our bugs as tracebacks: the rule every command line program follows.

What counts as the user's mistake (printed as `error: <message>` on stderr, exit status 2, no traceback):
  - a `UserError`, raised anywhere by code that checks what the user gave (flags, config fields, paths,
    workdirs); its message names the flag or field, the value, and what was expected;
  - a flag that absl cannot parse (an unknown flag, a value of the wrong type, a missing required flag);
  - a ValueError, NotImplementedError or OSError raised inside `checking_inputs()`: the phase in which a
    program reads and checks its inputs (configs, the model description, data files, checkpoints'
    configs) before any work starts. Library code keeps raising plain ValueError naming the argument
    (the house rule); the phase, not the exception type, makes it a user error.
Everything else is a bug and keeps its traceback, including a ValueError raised after the checking phase,
during the work itself. Ctrl-C outside a training loop (which saves first, see train/interrupts.py)
prints `interrupted` and exits with 130, as a shell does.
"""

import contextlib
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_INPUT_ERRORS = (ValueError, NotImplementedError, OSError)


class UserError(ValueError):
  """A mistake in what the user gave; the message names the flag or field, the value and the expectation."""


@contextlib.contextmanager
def checking_inputs(*errors: type[Exception]):
  """Inside: ValueError / NotImplementedError / OSError (or only `errors`) are the user's: re-raised
  as UserError."""
  try:
    yield
  except UserError:
    raise
  except errors or _INPUT_ERRORS as e:
    raise UserError(_one_line(e)) from e


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
    text = f"{text}: {error.filename}"
  return text or type(error).__name__


def _unknown_config_field(error: BaseException, args) -> str:
  # ml_collections raises AttributeError from a KeyError whose text is "'<field>'\nDid you mean ...?".
  cause = error
  while cause is not None and not isinstance(cause, KeyError):
    cause = cause.__context__
  lines = str(cause.args[0] if cause is not None and cause.args else error).splitlines() or [""]
  field, hint = lines[0].strip("\"' "), " ".join(lines[1:])
  named = [a.split("=")[0] for a in args[1:] if field in a.split("=")[0].split(".")[1:]]
  return (f"{named[0] if named else repr(field)}: no such config field{f' ({hint})' if hint else ''}; "
          "configs/base.py lists every field")


def exit_with(message: str) -> None:
  """Prints `error: message` as one line on stderr and exits with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def run(main, argv=None, *, positional: bool = False) -> None:
  """`absl.app.run(main)` under the rules above (flags are defined before calling this).

  `positional`: whether `main` takes positional arguments (otherwise any is a user error)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse_flags(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      exit_with(f"{_one_line(e)} (--help lists the flags)")
    except (AttributeError, KeyError) as e:  # ml_collections: `--config.<path>` names no field
      exit_with(_unknown_config_field(e, args))

  def guarded_main(args):
    if len(args) > 1 and not positional:
      exit_with(f"unexpected arguments {args[1:]}; flags are written --name=value (--help lists them)")
    try:
      return main(args)
    except UserError as e:
      exit_with(_one_line(e))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)

  app.run(guarded_main, argv, flags_parser=parse_flags)
