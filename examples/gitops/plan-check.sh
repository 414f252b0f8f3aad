#!/usr/bin/env bash
# The shell part of the pull-request check (pull-request-check.yaml): checks
# the license manifests under DIR, then plans them against the license
# platform with --prune (as Argo CD and Flux prune), and writes what a
# reviewer should read to OUT (markdown): the plan, or the validation errors.
#
#   plan-check.sh DIR [OUT]        (OUT: plan.md by default)
#
# The backend, account, token and instance come from the environment
# (LICENSOR_BACKEND, LICENSOR_ACCOUNT, LICENSOR_TOKEN, LICENSOR_INSTANCE);
# LICENSOR names the binary (default: licensor on PATH).
# Exit codes are licensor plan's: 0 nothing to change, 2 changes (both pass
# the check), 1 invalid manifests, a refusal or an error (fails it).
set -uo pipefail
dir=${1:?usage: plan-check.sh DIR [OUT]}
out=${2:-plan.md}
licensor=${LICENSOR:-licensor}

if ! errors=$("$licensor" validate -f "$dir" 2>&1); then
  {
    echo "### licensor: the license manifests are not valid"
    echo
    echo '```'
    echo "$errors"
    echo '```'
  } >"$out"
  echo "$errors" >&2
  exit 1
fi
"$licensor" plan --prune -f "$dir" -o markdown >"$out"
code=$?
if [ "$code" -ne 0 ] && [ "$code" -ne 2 ] && [ ! -s "$out" ]; then
  echo "### licensor: the plan failed (exit $code); see the job's log" >"$out"
fi
exit "$code"
