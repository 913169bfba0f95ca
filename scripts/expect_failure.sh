#!/bin/sh
# expect_failure.sh REGEX PROGRAM [ARGS...]: passes when PROGRAM exits with a failure status of its own
# (1..127: not 0, not killed by a signal such as SIGFPE or SIGABRT) and its output matches REGEX
# (grep -E). The ctest checks of the example programs' option validation use it.
regex=$1
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out" | tail -n 20
if [ "$rc" -eq 0 ] || [ "$rc" -ge 128 ]; then
  echo "expect_failure: expected a failure exit status (1..127), got $rc" >&2
  exit 1
fi
if ! printf '%s\n' "$out" | grep -Eq -- "$regex"; then
  echo "expect_failure: output does not match /$regex/" >&2
  exit 1
fi
echo "expect_failure: exit status $rc, output matches /$regex/"
