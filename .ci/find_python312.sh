# Sourced by .ci/run and scripts/quickstart.sh: `find_python312` prints a working Python 3.12 or fails.
# Tries $PYTHON, python3.12, python3 and every pyenv 3.12.x (newest first); each candidate is run for real,
# because a pyenv shim can exist on the PATH and still fail ("python3.12: command not found").

NO_PYTHON312="error: no working Python 3.12 found (tried \$PYTHON, python3.12, python3, pyenv 3.12.x): install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12"

find_python312() {
  local candidates=() pyenv_bin version candidate
  [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
  candidates+=(python3.12 python3)
  pyenv_bin=$(command -v pyenv || true)
  [[ -z "$pyenv_bin" && -x "${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv" ]] && pyenv_bin="${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv"
  if [[ -n "$pyenv_bin" ]]; then
    for version in $("$pyenv_bin" versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -rV); do
      candidates+=("$(PYENV_VERSION="$version" "$pyenv_bin" which python3 2>/dev/null || true)")
    done
  fi
  for candidate in "${candidates[@]}"; do
    [[ -z "$candidate" ]] && continue
    if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
