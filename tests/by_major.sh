#!/usr/bin/env bash
# `make test`: the suite in several pytest sessions at the same time (the tests wait on servers,
# kernels, browsers and Ansible about a third of the time, so more sessions than cores use the
# two cores better). With two majors or more:
#   1. the first major: every test on its clusters and the tests that need none, but tests/notebooks
#      and tests/fleet;
#   2. the first major: tests/notebooks (but the browser form tests);
#   3. tests/fleet (its hosts' clusters are of the first major);
#   4. the second major: the tests on its clusters (their ids carry "pgNN") and the browser form
#      tests (tests/notebooks/test_browser*.py);
#   and one session more per further major, its tests only.
# With one major, one session runs everything. Session 1 prints as it goes, the others when they
# end; the exit status is the first non-zero one.
set -u
bin=${1:?usage: tests/by_major.sh VENV_BIN [pytest options]}
shift
IFS=, read -ra majors <<<"${PGTLS_PG_MAJORS:-15,17}"
# tests marked `spread` run each variant on one of these majors in turn (tests/conftest.py)
export PGTLS_SPREAD_MAJORS=${PGTLS_PG_MAJORS:-15,17}
with_sigint='import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])'
scratch=$(mktemp -d -t pgtls-tests-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
first=${majors[0]}
browser=(tests/notebooks/test_browser.py tests/notebooks/test_browser_clients.py)
names=()
pids=()

# a job started with & (or from a shell that ignores SIGINT) ignores SIGINT: each session gets
# the default back before pytest starts, for the fault tests' Ctrl-C
session() {  # NAME MAJOR PYTEST-ARGS...
  local name=$1 major=$2
  shift 2
  PGTLS_PG_MAJORS=$major "$bin/python" -c "$with_sigint" "$bin/pytest" -p no:cacheprovider \
    --basetemp="$scratch/$name" "$@" >"$scratch/$name.log" 2>&1 &
  names+=("$name")
  pids+=("$!")
}

if [ "${#majors[@]}" -eq 1 ]; then
  PGTLS_PG_MAJORS=$first "$bin/python" -c "$with_sigint" "$bin/pytest" \
    --basetemp="$scratch/pg$first" "$@"
  exit $?
fi
ignore_browser=()
for path in "${browser[@]}"; do ignore_browser+=("--ignore=$path"); done
session "pg$first-notebooks" "$first" "${ignore_browser[@]}" "$@" tests/notebooks
session "fleet" "$first" "$@" tests/fleet
session "pg${majors[1]}" "${majors[1]}" -k "pg${majors[1]} or test_browser" "$@"
for major in "${majors[@]:2}"; do
  session "pg$major" "$major" -k "pg$major" "$@"
done
PGTLS_PG_MAJORS=$first "$bin/python" -c "$with_sigint" "$bin/pytest" \
  --basetemp="$scratch/pg$first" --ignore=tests/notebooks --ignore=tests/fleet "$@"
status=$?
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  code=$?
  echo "=================== session ${names[$i]} (exit $code) ==================="
  cat "$scratch/${names[$i]}.log"
  [ "$status" -ne 0 ] || status=$code
done
exit "$status"
