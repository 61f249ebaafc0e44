r"""Trains a switchjax experiment.

  python -m switchjax.main --config experiments/switch_base.py:tiny \
      [--workdir DIR] [--config.moe.num_experts=16 ...]

Without --workdir the run goes to runs/<experiment> (runs/<experiment>-<preset>
for a preset: runs/switch_base-tiny here), and says so in its first line.
Run it again with the same --workdir to resume from the newest checkpoint.
One run per workdir: a second one is refused while the first lives.
Bad input (flags, config, workdir) and faults during the run (NaN, a full
disk, unreadable checkpoints) end with one line `error: ...` and exit 1;
SIGTERM/SIGINT save the current step and exit 0. See docs/robustness.md.
"""
import ast
import logging as std_logging
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from switchjax import config_base
# --coordinator_address, --num_processes, --process_id (imports no JAX).
from switchjax import distributed

config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/switch_base.py:tiny.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics and checkpoints go; "
                    "default runs/<experiment>[-<preset>] (from --config).")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume although the learning-rate schedule or other safe "
                  "keys (see README) differ from the run in --workdir.")
flags.DEFINE_bool("check_memory", True,
                  "Refuse, before allocating, a run whose estimated memory "
                  "per device (switchjax.plan) exceeds what the devices hold.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
  sys.exit(f"error: {' '.join(message.split())}")


def _last_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return lines[-1] if lines else type(error).__name__


def _quiet_failed_save_echoes(logs: bool) -> None:
  """Drops the echoes of a failed checkpoint save around our `error:` line.

  TensorStore callbacks call into the closed asyncio loop of orbax's writer,
  each printing a traceback from its own thread, which can land in the
  middle of our line; with `logs`, also orbax's and asyncio's log of the
  same failure. The save's cause is already in our line.
  """
  if logs:
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    logging.get_absl_logger().addFilter(
        lambda r: "_SignalingThread.run() raised" not in r.getMessage())
  # TensorStore reports them as unraisable (PyErr_WriteUnraisable).
  hook = sys.unraisablehook

  def unraisablehook(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  sys.unraisablehook = unraisablehook


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every mistake as one line instead of a trace."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # "flag --config=...: Error whilst parsing..." + a traceback: keep the
    # flag and the traceback's last line.
    first = str(e).strip().splitlines()[0]
    last = _last_line(e)
    prefix = first.split(": ")[0] + ": " if first.startswith("flag --") else ""
    _fail(last if first == last else prefix + last)
  except (AttributeError, KeyError) as e:
    # ml_collections: an override of a key the config does not have.
    text = str(e.args[0]) if e.args else str(e)
    try:
      text = ast.literal_eval(text)  # KeyError quotes its message
    except (ValueError, SyntaxError):
      pass
    key = text.splitlines()[0].strip("'\"") if text else "?"
    hint = " ".join(text.splitlines()[1:])
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a), "--config.*")
    _fail(f"{flag}: unknown config key {key!r}. {hint}")
  except OSError as e:  # the config file (read while applying overrides)
    _fail(f"--config {config_base.config_arg(argv)}: {_last_line(e)}")
  except Exception as e:  # pylint: disable=broad-except
    # Any other failure while parsing is a bad flag value too.
    _fail(_last_line(e))


def default_workdir(config_arg: str) -> str:
  """runs/<experiment>, or runs/<experiment>-<preset> for "path:preset"."""
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] or "run"
  if preset:
    name += "-" + preset.replace(os.sep, "_")
  return os.path.join("runs", name)


def _load_config():
  """The parsed config; ml_collections defers config file errors to here."""
  try:
    config = FLAGS.config
    config.keys()
    return config
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"--config {config_base.config_arg(sys.argv)}: {_last_line(e)}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  default_logs = not FLAGS["verbosity"].present
  if default_logs:
    # Orbax logs every file it writes at INFO; keep the run's own lines.
    logging.set_verbosity(logging.WARNING)
  _quiet_failed_save_echoes(logs=default_logs)
  config = _load_config()
  workdir = FLAGS.workdir or default_workdir(config_base.config_arg(sys.argv))
  try:
    # Before anything touches a device: multi-process runs join up here.
    distributed.initialize_from_flags()
  except ValueError as e:
    _fail(str(e))
  # Imported here so --help and flag errors answer without loading JAX.
  from switchjax import faults  # pylint: disable=g-import-not-at-top
  from switchjax import train  # pylint: disable=g-import-not-at-top
  from switchjax import validate  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if not FLAGS.workdir and jax.process_index() == 0:
    print(f"workdir: {workdir} (the default for this config; --workdir DIR "
          "to choose)", flush=True)
  try:
    summary = train.train_and_evaluate(
        config, workdir, allow_config_change=FLAGS.allow_config_change,
        memory_check=FLAGS.check_memory)
  except (validate.ConfigError, faults.RunError) as e:
    _fail(str(e))
  except OSError as e:  # before the loop: truncating metrics, config.json
    _fail(f"{e.strerror or _last_line(e)}: {e.filename or workdir}")
  except KeyboardInterrupt:  # Ctrl-C twice
    print("error: interrupted without saving; the same command resumes from "
          "the last checkpoint", file=sys.stderr)
    sys.exit(130)
  if summary.get("preempted") and jax.process_index() == 0:
    print("to resume: " + shlex.join([sys.executable, "-m", "switchjax.main"]
                                      + sys.argv[1:]), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
